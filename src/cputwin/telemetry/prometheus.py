"""CPU telemetry from Prometheus: a server's stored history, or a node_exporter live.

Both read node_exporter's `node_cpu_seconds_total{cpu, mode}` counters and turn each
interval between two readings into one row (`counters.interval_utilisation`). From a
server, the raw samples are read with a range selector (`/api/v1/query` of
`node_cpu_seconds_total{instance="…"}[…]`), never `rate()`: every row is one real
scrape interval, not an interpolation. A run ends at a gap (more than 1.5 steps), a
counter reset or a change in the set of cores. The host is the instance.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cputwin.errors import DataError
from cputwin.telemetry import schema
from cputwin.telemetry.collector import arrow_schema, file_safe, write_table
from cputwin.telemetry.counters import CounterBreak, interval_utilisation, run_starts
from cputwin.telemetry.ingest import DataWarning, check_run
from cputwin.telemetry.schema import OVERALL, RUN_COLUMN, TIMESTAMP, WORKLOAD, Schema, core_column

METRIC = "node_cpu_seconds_total"
CHUNK_SECONDS = 3600.0  # one query's range: bounds the size of each answer
Counters = dict[int, dict[str, float]]


def http_get(url: str, timeout: float, what: str) -> bytes:
    """GET a URL; any failure is one DataError line naming the URL."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (user's URL)
            return response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:200].decode("utf-8", "replace").strip().splitlines()
        raise DataError(f"{what}: HTTP {exc.code}{': ' + detail[0] if detail else ''}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"{what}: cannot reach it ({reason})") from None


# ---------------------------------------------------------------- Prometheus server

def parse_time(text: str, now: float | None = None) -> float:
    """Seconds since the epoch from `1764547200`, ISO 8601 (`2026-12-01T00:00:00Z`; no
    offset means UTC), `now` or `now-10m` (s, m, h, d)."""
    text = text.strip()
    now = time.time() if now is None else now
    relative = re.fullmatch(r"now(?:-(\d+(?:\.\d+)?)([smhd]))?", text)
    if relative:
        amount, unit = relative.groups()
        return now - (float(amount) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
                      if amount else 0.0)
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise DataError(f"time {text!r}: not a finite number of seconds")
        return seconds
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise DataError(f"time {text!r}: expected seconds since the epoch, ISO 8601 or "
                        "now-10m") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def fetch_counters(url: str, instance: str, start: float, end: float,
                   timeout: float = 30.0) -> dict[float, Counters]:
    """The raw samples of `node_cpu_seconds_total` for one instance in [start, end]:
    scrape time -> core -> mode -> seconds. Cores become 0 … n−1 in the order of their
    numbers (an offline core leaves no hole)."""
    if not end > start:
        raise DataError(f"the end ({_iso(end)}) must come after the start ({_iso(start)})")
    by_time: dict[float, Counters] = {}
    series_seen: dict[tuple[int, str], set[str]] = {}
    for chunk_end, width in _chunks(start, end):
        for series in _query_range_selector(url, instance, chunk_end, width, timeout):
            labels = series.get("metric", {})
            core, mode = _core_index(labels.get("cpu")), labels.get("mode")
            if core is None or not mode:
                continue
            series_seen.setdefault((core, mode), set()).add(labels.get("job", ""))
            for stamp, value in series.get("values", []):
                t = float(stamp)
                if start <= t <= end:
                    by_time.setdefault(t, {}).setdefault(core, {})[mode] = float(value)
    jobs = next((j for j in series_seen.values() if len(j) > 1), None)
    if jobs:
        raise DataError(f"{url}: instance {instance!r} is scraped by several jobs "
                        f"({', '.join(sorted(jobs))}); one scrape per instance is needed")
    if not by_time:
        raise DataError(f"{url}: no {METRIC} samples for instance {instance!r} between "
                        f"{_iso(start)} and {_iso(end)}")
    return by_time


def _chunks(start: float, end: float) -> Iterator[tuple[float, float]]:
    """(end, width) of consecutive query ranges covering [start, end]."""
    t = start
    while t < end:
        width = min(CHUNK_SECONDS, end - t)
        yield t + width, width
        t += width


def _query_range_selector(url: str, instance: str, at: float, width: float,
                          timeout: float) -> list[dict[str, Any]]:
    escaped = instance.replace("\\", "\\\\").replace('"', '\\"')
    query = f'{METRIC}{{instance="{escaped}"}}[{max(1, math.ceil(width * 1000))}ms]'
    api = url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode(
        {"query": query, "time": f"{at:.3f}"})
    body = http_get(api, timeout, url)
    try:
        answer = json.loads(body)
    except ValueError:
        raise DataError(f"{url}: not a Prometheus API answer (not JSON)") from None
    if not isinstance(answer, dict) or answer.get("status") != "success":
        error = answer.get("error", "no status") if isinstance(answer, dict) else "not an object"
        raise DataError(f"{url}: Prometheus refused the query ({error})")
    data = answer.get("data") or {}
    if data.get("resultType") != "matrix" or not isinstance(data.get("result"), list):
        raise DataError(f"{url}: not a Prometheus API answer (no matrix result)")
    return data["result"]


def _core_index(cpu: str | None) -> int | None:
    return int(cpu) if cpu is not None and cpu.isdigit() else None


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def thin(times: list[float], step: float | None) -> list[float]:
    """Every raw scrape, or, with `step`, the first scrape at least `step` seconds after the
    previous kept one (a quarter of a scrape interval early still counts)."""
    if step is None or len(times) < 2:
        return times
    scrape = float(np.median(np.diff(times)))
    if step < scrape * 0.75:
        raise DataError(f"step {step} s is shorter than the scrape interval ({scrape:.3g} s); "
                        "leave --step out to read every scrape")
    kept = [times[0]]
    for t in times[1:]:
        if t - kept[-1] >= step - 0.25 * scrape:
            kept.append(t)
    return kept


def counters_to_frame(by_time: dict[float, Counters], name: str, step: float | None = None
                      ) -> pl.DataFrame:
    """One row per interval between kept scrapes, with a `run` column: `name-1`, `name-2`, …
    (a run ends at a gap, a counter reset or another set of cores). Unchecked."""
    times = thin(sorted(by_time), step)
    gap_starts = run_starts(np.array(times), step)
    rows: list[dict[str, Any]] = []
    run, previous = 0, None
    for t, gap in zip(times, gap_starts, strict=True):
        current = by_time[t]
        if previous is not None and not gap:
            try:
                overall, cores = interval_utilisation(previous, current)
            except CounterBreak:
                run += 1
            else:
                rows.append({RUN_COLUMN: f"{name}-{run}", TIMESTAMP: t, OVERALL: overall,
                             **{core_column(i): v for i, v in enumerate(cores)}})
        else:
            run += 1
        previous = current
    if not rows:
        raise DataError(f"{name}: fewer than two scrapes in a row; no interval to read")
    width = max(len(r) for r in rows)
    fewer = sum(len(r) != width for r in rows)
    if fewer:  # a core offline for a while: one twin needs one core count
        warnings.warn(f"{name}: dropped {fewer} intervals of runs with fewer cores than the "
                      "others", DataWarning, stacklevel=2)
        rows = [r for r in rows if len(r) == width]
    return pl.DataFrame(rows).with_columns(pl.lit(schema.UNLABELLED).alias(WORKLOAD))


def load_prometheus(url: str, instance: str, start: float, end: float,
                    step: float | None = None) -> pl.DataFrame:
    """One instance's CPU history from a Prometheus server as `load_runs` returns it: runs
    `<instance>_<start>-<k>` with leading `run` and `host` (= instance) columns."""
    name = f"{file_safe(instance)}_{datetime.fromtimestamp(start, UTC):%Y%m%d_%H%M%S}"
    raw = counters_to_frame(fetch_counters(url, instance, start, end), name, step)
    frame = check_run(raw, f"{url} ({instance})")
    return frame.insert_column(1, pl.Series(schema.HOST, [instance] * frame.height))


def import_prometheus(url: str, instance: str, start: float, end: float, out_dir: Path,
                      step: float | None = None) -> tuple[pl.DataFrame, list[Path]]:
    """`load_prometheus`, each run written as `out_dir/<run>.parquet` in cputwin's schema
    (metadata: host, source, url, step); never over an existing file."""
    frame = load_prometheus(url, instance, start, end, step)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (run,), rows in frame.group_by(RUN_COLUMN, maintain_order=True):
        schema = Schema(n_cores=sum(c.startswith("cpu_util_core_") for c in rows.columns))
        ts = rows[TIMESTAMP].to_numpy()
        meta = {"host": instance, "source": "prometheus", "url": url, "instance": instance,
                "step_s": step if step is not None else
                (float(np.median(np.diff(ts))) if ts.size > 1 else None),
                "logical_cores": schema.n_cores, "started_at": float(ts[0])}
        table = rows.select(schema.column_order()).to_arrow().cast(arrow_schema(schema))
        path = out_dir / f"{run}.parquet"
        write_table(table, path, meta)
        paths.append(path)
    return frame, paths


# ---------------------------------------------------------------- node_exporter, live

class NodeExporterSampler:
    """A remote host's utilisation from its node_exporter, one scrape per `sample` call:
    the same interface as the collector's psutil `Sampler` (`.schema`, `.sample`).

    A URL without a query asks node_exporter for its cpu and cpufreq collectors only
    (`?collect[]=cpu&collect[]=cpufreq`), so a scrape stays cheap for the host."""

    source = "node_exporter"

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise DataError(f"{url}: not an http(s) URL of a node_exporter's /metrics")
        self.url = url
        self.scrape_url = url if parsed.query else (
            url + "?" + urllib.parse.urlencode([("collect[]", "cpu"), ("collect[]", "cpufreq")]))
        self.host = parsed.netloc
        self.timeout = timeout
        self.counters, _ = self._scrape()
        self.schema = Schema(n_cores=len(self.counters))
        self.last: list[float] | None = None

    def _scrape(self) -> tuple[Counters, dict[str, float | None]]:
        body = http_get(self.scrape_url, self.timeout, self.url)
        return parse_node_metrics(body, self.url)

    def sample(self, workload: str) -> dict[str, Any]:
        counters, freq = self._scrape()
        now = time.time()
        try:
            overall, cores = interval_utilisation(self.counters, counters)
        except CounterBreak as exc:
            if "no CPU time" not in str(exc) or self.last is None:
                raise DataError(f"{self.url}: {exc}; the run ends here") from None
            overall, *cores = self.last  # two scrapes within one clock tick: nothing new
        else:
            self.counters = counters
        self.last = [overall, *cores]
        row: dict[str, Any] = {TIMESTAMP: now, OVERALL: overall,
                               **{core_column(i): v for i, v in enumerate(cores)}}
        row.update({c: None for c in schema.OPTIONAL_COLUMNS})
        row.update(freq)
        row[WORKLOAD] = workload
        return row


def parse_node_metrics(body: bytes, url: str) -> tuple[Counters, dict[str, float | None]]:
    """node_exporter's text: the CPU counters, and the mean current/min/max frequency in MHz
    where the cpufreq collector reports them."""
    from prometheus_client.parser import text_string_to_metric_families

    counters: Counters = {}
    freq: dict[str, list[float]] = {c: [] for c in schema.FREQ_COLUMNS}
    freq_metrics = dict(zip(("node_cpu_scaling_frequency_hertz",
                             "node_cpu_scaling_frequency_min_hertz",
                             "node_cpu_scaling_frequency_max_hertz"), schema.FREQ_COLUMNS, strict=True))
    try:
        text = body.decode("utf-8")
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == METRIC:
                    core = _core_index(s.labels.get("cpu"))
                    if core is not None and s.labels.get("mode"):
                        counters.setdefault(core, {})[s.labels["mode"]] = float(s.value)
                elif s.name in freq_metrics:
                    freq[freq_metrics[s.name]].append(float(s.value) / 1e6)
    except (UnicodeDecodeError, ValueError, TypeError, IndexError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{url}: not Prometheus text format ({first})") from None
    if not counters:
        raise DataError(f"{url}: no {METRIC} in the answer (not a node_exporter with its cpu "
                        "collector?)")
    means = {c: (float(np.mean(v)) if v else None) for c, v in freq.items()}
    return counters, means
