"""Sample this machine with psutil at a fixed rate and write runs in the seed's schema.

Scheduling is drift-free: tick k is due at start + k/rate on the monotonic clock, so
sleep jitter never accumulates; a tick that is already late is skipped, not bunched.
Samples are flushed every `flush_interval` seconds as a small, complete parquet part in
`<run>.parts/` (written under a temporary name and renamed), so a collector killed
with SIGKILL leaves every sample older than a second readable; the run's metadata is
written there first (`meta.json`), so a recovered run keeps its host. A finished run is
merged into `<workload>_<YYYYmmdd_HHMMSS>.parquet` with its metadata and the parts
removed. A run never replaces a file: a name already taken (two runs in one second, two
collectors writing into one folder) gets a `-2`, `-3`, … suffix.

The sampler is psutil's for this machine (`Sampler`), or any object with the same
`.schema` and `.sample(workload)`, such as a node_exporter scraped over HTTP
(`Collector.record_from`).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from cputwin.errors import DataError, WorkloadError
from cputwin.telemetry import schema
from cputwin.telemetry.counters import MODES, CounterBreak, interval_utilisation
from cputwin.telemetry.schema import OVERALL, TIMESTAMP, UNLABELLED, WORKLOAD, Schema, core_column
from cputwin.telemetry.workloads import WORKLOADS, WorkloadFn, WorkloadProcess

METADATA_KEY = b"cputwin"
META_FILE = "meta.json"  # a run's metadata inside its parts folder, for recovery


class RowSampler(Protocol):
    """What the collector and `watch` sample: a schema and one row per call."""

    schema: Schema

    def sample(self, workload: str) -> dict[str, Any]: ...


def _freq() -> tuple[float | None, float | None, float | None]:
    try:
        f = psutil.cpu_freq()
    except (OSError, NotImplementedError, AttributeError):
        return None, None, None
    if f is None:
        return None, None, None
    return tuple(v if v else None for v in (f.current, f.min, f.max))  # type: ignore[return-value]


def _temperature() -> float | None:
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return None
    try:
        temps = [t.current for entries in read().values() for t in entries if t.current]
    except (OSError, RuntimeError):
        return None
    return sum(temps) / len(temps) if temps else None


def ticks(rate: float, n_ticks: int | None = None) -> Iterator[int]:
    """Yield tick numbers 1, 2, … at `rate` Hz, drift-free: tick k is due at start + k/rate
    on the monotonic clock; a tick already late by more than a period is skipped."""
    period = 1.0 / rate
    start = time.monotonic()
    k = 1
    while n_ticks is None or k <= n_ticks:
        delay = start + k * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        elif -delay > period:
            k += int(-delay // period)
            continue
        yield k
        k += 1


class ProcessMeter:
    """CPU use of one process and its descendants between calls, in percent of one core.

    The tree's CPU time is the sum over its live processes of each one's own time and the
    time of the children it has reaped (psutil's children_user/system). A child that exits
    between two reads, however short its life (a compiler under `make`), moves its whole
    time into its parent's term when reaped: nothing it used is lost, nothing counted
    twice. A process that leaves the tree otherwise (re-parented) takes its time with it;
    such a step is read as zero.
    """

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.last_time = time.monotonic()
        self.last_total: float | None = None
        self.read()

    def _cpu_seconds(self) -> float | None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return None
        total = 0.0
        for proc in procs:
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system + t.children_user + t.children_system
        return total

    def read(self) -> float | None:
        """Percent of one core used since the last call (None before the first interval,
        or once the process is gone)."""
        now = time.monotonic()
        total = self._cpu_seconds()
        elapsed, self.last_time = now - self.last_time, now
        previous, self.last_total = self.last_total, total
        if previous is None or total is None or elapsed <= 0:
            return None
        return 100.0 * max(0.0, total - previous) / elapsed


def _psutil_counters() -> dict[int, dict[str, float]]:
    """This machine's per-core counters in `counters`' form, with psutil's accounting kept:
    iowait counts as idle (a core waiting on a disk is not busy)."""
    out = {}
    for core, t in enumerate(psutil.cpu_times(percpu=True)):
        modes = {m: getattr(t, m) for m in MODES if hasattr(t, m) and m != "iowait"}
        modes["idle"] += getattr(t, "iowait", 0.0)
        out[core] = modes
    return out


class CoreMeter:
    """Overall and per-core utilisation since the last call, from ONE read of the per-core
    counters (`interval_utilisation`: overall is the cores' summed time, so it is the mean
    of the cores over the very same interval). Two reads (overall, then per core) cover
    intervals that drift apart by the scheduling delay between them, which a busy machine
    makes large."""

    def __init__(self) -> None:
        self.last = _psutil_counters()

    def read(self) -> tuple[float, list[float]]:
        current, previous = _psutil_counters(), self.last
        self.last = current
        try:
            overall, cores = interval_utilisation(previous, current)
        except CounterBreak:  # no clock tick passed, or the cores changed: nothing measured
            return 0.0, [0.0] * len(current)
        return round(overall, 1), [round(c, 1) for c in cores]


class Sampler:
    """One psutil sample per call: overall and per-core utilisation since the last call,
    and, given the workload's pid, the workload's own CPU use over the same interval."""

    def __init__(self, workload_pid: int | None = None) -> None:
        self.schema = Schema(n_cores=psutil.cpu_count(logical=True) or 1)
        self.meter = ProcessMeter(workload_pid) if workload_pid else None
        self.cpu = CoreMeter()

    def sample(self, workload: str) -> dict[str, Any]:
        now = time.time()
        overall, cores = self.cpu.read()
        own = self.meter.read() if self.meter else None
        cur, lo, hi = _freq()
        row: dict[str, Any] = {TIMESTAMP: now, OVERALL: float(overall)}
        for i, v in enumerate(cores):
            row[core_column(i)] = float(v)
        row.update({"cpu_freq_current_mhz": cur, "cpu_freq_min_mhz": lo, "cpu_freq_max_mhz": hi,
                    schema.TEMP_COLUMN: _temperature(), schema.WORKLOAD_CPU: own, WORKLOAD: workload})
        return row


def arrow_schema(schema: Schema) -> pa.Schema:
    fields = [pa.field(c, pa.float64()) for c in schema.column_order()[:-1]]
    return pa.schema([*fields, pa.field(WORKLOAD, pa.string())])


@dataclass
class RunResult:
    path: Path
    rows: int
    median_step: float


class Collector:
    """Records labelled runs of this machine."""

    def __init__(self, rate: float = 10.0, flush_interval: float = 0.5) -> None:
        if not 0 < rate <= 100:
            raise DataError(f"rate must be in (0, 100] Hz, got {rate}")
        self.rate = rate
        self.flush_interval = flush_interval

    def record(
        self,
        workload: str,
        seconds: float,
        out_dir: Path,
        tick: Callable[[float], None] | None = None,
        workload_fn: WorkloadFn | None = None,
    ) -> RunResult:
        """Run `workload` in a child process for `seconds` while sampling; return the run file.

        Raises WorkloadError (and keeps no run file) if the workload dies early.
        """
        if workload_fn is None:
            if workload not in WORKLOADS:
                raise DataError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
            workload_fn = WORKLOADS[workload]
        if seconds <= 0:
            raise DataError(f"seconds must be positive, got {seconds}")
        parts, final = reserve_run(out_dir, workload)
        proc = WorkloadProcess(workload_fn)
        proc.start()
        try:
            sampler = Sampler(workload_pid=proc.process.pid)
        except BaseException:
            proc.stop()
            shutil.rmtree(parts, ignore_errors=True)
            raise
        meta = {"host": socket.gethostname(), "workload": workload}
        try:
            return self._record(sampler, workload, seconds, parts, final, meta, tick, proc)
        except WorkloadError:
            shutil.rmtree(parts, ignore_errors=True)  # not a normal run of this workload
            raise
        finally:
            proc.stop()

    def record_from(
        self,
        sampler: RowSampler,
        seconds: float,
        out_dir: Path,
        label: str | None = None,
        tick: Callable[[float], None] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> RunResult:
        """Record what `sampler` reads (e.g. a remote host's node_exporter) for `seconds`;
        no workload is started. Rows carry `label`, or UNLABELLED."""
        if seconds <= 0:
            raise DataError(f"seconds must be positive, got {seconds}")
        workload = label or UNLABELLED
        host = getattr(sampler, "host", None) or socket.gethostname()
        parts, final = reserve_run(out_dir, file_safe(host) if label is None else workload)
        meta = {"host": host, "workload": workload,
                **{k: getattr(sampler, k) for k in ("source", "url") if hasattr(sampler, k)},
                **(meta or {})}
        return self._record(sampler, workload, seconds, parts, final, meta, tick, None)

    def _record(self, sampler: RowSampler, workload: str, seconds: float, parts: Path,
                final: Path, meta: dict[str, Any], tick, proc: WorkloadProcess | None
                ) -> RunResult:
        """Sample into parts (metadata first), then merge them into the run file."""
        meta = {**meta, "logical_cores": sampler.schema.n_cores, "rate_hz": self.rate,
                "package_version": _version(), "started_at": time.time(), "seconds": seconds}
        write_json_atomic(parts / META_FILE, meta)
        writer = PartWriter(parts, arrow_schema(sampler.schema))
        try:
            self._loop(sampler, workload, seconds, proc, writer, tick)
        except WorkloadError:
            raise
        except BaseException:  # Ctrl-C and the like: keep what was sampled, as parts
            writer.flush()
            raise
        if proc is not None:
            meta["workload_exit_status"] = proc.stop()
        writer.flush()
        rows = merge_parts(parts, final, meta)
        return RunResult(final, rows, self._median_step(final))

    def _loop(self, sampler, workload, seconds, proc, writer, tick) -> None:
        n_ticks = int(round(seconds * self.rate))
        next_flush = time.monotonic() + self.flush_interval
        for k in ticks(self.rate, n_ticks):
            reason = proc.died() if proc is not None else None
            if reason:
                raise WorkloadError(f"workload {workload!r} {reason}; run not saved")
            writer.add(sampler.sample(workload))
            if time.monotonic() >= next_flush:
                writer.flush()
                next_flush += self.flush_interval
            if tick:
                tick(k / n_ticks)

    @staticmethod
    def _median_step(path: Path) -> float:
        import numpy as np

        ts = pq.read_table(path, columns=[TIMESTAMP])[TIMESTAMP].to_numpy()
        return float(np.median(np.diff(ts))) if ts.size > 1 else float("nan")


class PartWriter:
    """Buffers rows and writes each flush as a complete parquet file, atomically."""

    def __init__(self, folder: Path, schema: pa.Schema) -> None:
        self.folder = folder
        self.schema = schema
        self.rows: list[dict[str, Any]] = []
        self.count = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        tmp = self.folder / f".part-{self.count:06d}.tmp"
        pq.write_table(table, tmp)
        tmp.rename(self.folder / f"part-{self.count:06d}.parquet")
        self.count += 1
        self.rows = []


def reserve_run(out_dir: Path, prefix: str) -> tuple[Path, Path]:
    """A fresh run name `<prefix>_<YYYYmmdd_HHMMSS>[-n]`: its parts folder, created here
    (atomically: the first to create it owns the name), and its run file, not yet there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = f"{prefix}_{datetime.now().strftime('%Y%m%d_%H%M%S')}"
    for n in itertools.count(1):
        stem = base if n == 1 else f"{base}-{n}"
        parts, final = out_dir / f"{stem}.parts", out_dir / f"{stem}.parquet"
        try:
            parts.mkdir()
        except FileExistsError:
            continue
        if final.exists():  # a finished run of that name: its parts are gone, its file not
            parts.rmdir()
            continue
        return parts, final
    raise AssertionError("unreachable")


def file_safe(name: str) -> str:
    """A name usable as a file name (a host such as `10.0.0.7:9100` → `10.0.0.7_9100`)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj), encoding="utf-8")
    tmp.replace(path)


def write_table(table: pa.Table, final: Path, meta: dict[str, Any]) -> None:
    """Write a run file with its metadata; never over an existing file."""
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    try:
        os.link(tmp, final)  # unlike rename, fails when the name is taken
    except FileExistsError:
        raise DataError(f"{final}: already exists; a run is never written over") from None
    finally:
        tmp.unlink()


def merge_parts(parts: Path, final: Path, meta: dict[str, Any]) -> int:
    """Merge a run's parts into one parquet file with metadata; remove the parts."""
    files = sorted(parts.glob("part-*.parquet"))
    if not files:
        shutil.rmtree(parts, ignore_errors=True)
        raise DataError(f"{parts}: no samples were recorded")
    table = pa.concat_tables(pq.read_table(f) for f in files)
    write_table(table, final, meta)
    shutil.rmtree(parts)
    return table.num_rows


def recover_parts(parts: Path) -> tuple[Path, int]:
    """Turn the parts of an interrupted run (e.g. after SIGKILL) into a run file, never
    over an existing one; return the file and its number of samples."""
    if not parts.is_dir() or parts.suffix != ".parts":
        raise DataError(f"{parts}: not a folder of run parts (<run>.parts)")
    final = parts.with_suffix(".parquet")
    if final.exists():
        raise DataError(f"{final}: already exists; move it away to recover {parts.name}")
    try:
        saved = json.loads((parts / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # parts of an older collector, or a damaged file
        saved = {}
    meta = {"package_version": _version(), **saved, "recovered": True}
    rows = merge_parts(parts, final, meta)
    return final, rows


def read_metadata(path: Path) -> dict[str, Any]:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}


def _version() -> str:
    from cputwin import __version__

    return __version__


def expand_workloads(workload: str) -> list[str]:
    """`all` is every built-in workload in turn; anything else must be a known name."""
    if workload == "all":
        return list(WORKLOADS)
    if workload not in WORKLOADS:
        raise DataError(f"unknown workload {workload!r}; known: all, {', '.join(WORKLOADS)}")
    return [workload]
