"""Read Telegraf's `cpu` input from InfluxDB line-protocol files (`.lp`, `.influx`).

The input with `percpu = true` and `totalcpu = true` writes, per gather, one line per core
(tag `cpu=cpu0`, `cpu1`, …) and one for the machine (`cpu=cpu-total`), with fields
`usage_idle`, `usage_user`, … in percent of that core over the last interval: a core's
utilisation is 100 − usage_idle. With `report_active`/`collect_cpu_time` it may also carry
`time_idle`, `time_user`, … counters in seconds; a line without `usage_idle` is read from
those (100 × (1 − Δidle / Δall) since the core's previous line). Lines of other
measurements (mem, disk, …) are skipped, so a whole Telegraf file can be given.

Timestamps are integers in ns, µs, ms or s, told apart by their size (any date after
1973). Lines may come in any order; rows are sorted. A timestamp at which some core has no
value is dropped (with a warning); a gap of more than 1.5 steps ends a run.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from pathlib import Path

import numpy as np
import polars as pl

from cputwin.errors import DataError
from cputwin.telemetry.counters import MODES, CounterBreak, interval_utilisation, run_starts
from cputwin.telemetry.ingest import DataWarning
from cputwin.telemetry.schema import (
    HOST,
    OVERALL,
    RUN_COLUMN,
    TIMESTAMP,
    UNLABELLED,
    WORKLOAD,
    core_column,
    to_seconds,
)

MEASUREMENT = "cpu"
TOTAL = "cpu-total"
_CORE_TAG = re.compile(r"^cpu(\d+)$")
_ESCAPED = re.compile(r"\\(.)")
_INTEGER = re.compile(r"-?\d+[iu]")
Fields = dict[str, float | int | str | bool]


def parse_line(line: str) -> tuple[str, dict[str, str], Fields, int | None]:
    """One line of line protocol: (measurement, tags, fields, timestamp or None).

    Raises ValueError with what is wrong."""
    key, fields_text, rest = _sections(line)
    parts = _split(key, ",")
    measurement = _unescape(parts[0])
    if not measurement:
        raise ValueError("no measurement name")
    tags = {k: _unescape(v) for k, v in (_pair(p, "tag") for p in parts[1:])}
    if not fields_text:
        raise ValueError("no fields")
    fields = {k: _field_value(v) for k, v in (_pair(p, "field") for p in
                                               _split(fields_text, ",", quotes=True))}
    stamp = None
    if rest:
        if not re.fullmatch(r"-?\d+", rest):
            raise ValueError(f"timestamp {rest!r} is not an integer")
        stamp = int(rest)
    return measurement, tags, fields, stamp


def _sections(line: str) -> tuple[str, str, str]:
    """Split at the unescaped spaces between key, field set and timestamp (a string field
    value may hold spaces)."""
    line = line.rstrip("\r\n").lstrip(" \t")
    key = _split(line, " ", max_pieces=2)
    if len(key) < 2:
        raise ValueError("expected 'measurement[,tags] fields [timestamp]'")
    fields = _split(key[1], " ", quotes=True, max_pieces=2)
    return key[0], fields[0], fields[1].strip(" \t") if len(fields) == 2 else ""


def _split(text: str, sep: str, quotes: bool = False, max_pieces: int = 0) -> list[str]:
    """Split at unescaped `sep`, keeping escapes; with `quotes`, not inside a string value
    (a double quote right after `=` opens one, the next unescaped one closes it)."""
    if "\\" not in text and not (quotes and '"' in text):  # the usual line: nothing escaped
        return text.split(sep, max_pieces - 1 if max_pieces else -1)
    pieces, current, i, quoted = [], [], 0, False
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            current.append(text[i:i + 2])
            i += 2
            continue
        if quotes and ch == '"' and (quoted or (current and current[-1] == "=")):
            quoted = not quoted
        if ch == sep and not quoted and (not max_pieces or len(pieces) < max_pieces - 1):
            pieces.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    if quoted:
        raise ValueError("unterminated string")
    pieces.append("".join(current))
    return pieces


def _unescape(text: str) -> str:
    return _ESCAPED.sub(r"\1", text) if "\\" in text else text


def _pair(text: str, what: str) -> tuple[str, str]:
    key_value = _split(text, "=", max_pieces=2)
    if len(key_value) != 2 or not key_value[0]:
        raise ValueError(f"{what} {text!r} is not key=value")
    return _unescape(key_value[0]), key_value[1]


def _field_value(text: str) -> float | int | str | bool:
    if text.startswith('"'):
        return _unescape(text[1:-1])
    if text in ("t", "T", "true", "True", "TRUE"):
        return True
    if text in ("f", "F", "false", "False", "FALSE"):
        return False
    if text[-1:] in ("i", "u") and _INTEGER.fullmatch(text):
        return int(text[:-1])
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"field value {text!r} is not a number, string or boolean") from None


def read_line_protocol(path: Path) -> pl.DataFrame:
    """A line-protocol file's `cpu` lines as one unchecked frame in cputwin's columns (no
    workload label: every row is UNLABELLED); `ingest.read_run` checks it."""
    lines = _cpu_lines(path)
    stamps = to_seconds(np.array([t for _, _, t, _ in lines], dtype=np.int64))
    hosts = {h for _, _, _, h in lines if h is not None}
    if len(hosts) > 1:
        raise DataError(f"{path}: holds {len(hosts)} hosts ({', '.join(sorted(hosts))}); "
                        "one file is one host")
    by_cpu: dict[str, dict[float, Fields]] = {}
    for (cpu, fields, _, _), t in zip(lines, stamps, strict=True):
        by_cpu.setdefault(cpu, {})[float(t)] = fields
    cores = sorted((int(m.group(1)), cpu) for cpu in by_cpu if (m := _CORE_TAG.match(cpu)))
    if not cores:
        raise DataError(f"{path}: no per-core lines (tag cpu=cpu0, …); enable percpu in "
                        "Telegraf's cpu input")
    unknown = sorted(set(by_cpu) - {c for _, c in cores} - {TOTAL})
    if unknown:
        raise DataError(f"{path}: unknown cpu tag {unknown[0]!r} (expected cpu0, cpu1, … or "
                        f"{TOTAL})")
    util = {cpu: _utilisation(series, path, cpu) for cpu, series in by_cpu.items()}
    return _frame(util, [c for _, c in cores], sorted(set(stamps.tolist())), hosts, path)


def _cpu_lines(path: Path) -> list[tuple[str, Fields, int, str | None]]:
    """(cpu tag, fields, timestamp, host tag) of every `cpu` line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read as line protocol ({exc})") from None
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            measurement, tags, fields, stamp = parse_line(line)
        except ValueError as exc:
            raise DataError(f"{path}: line {number}: {exc}") from None
        if measurement != MEASUREMENT:
            continue
        if "cpu" not in tags:
            raise DataError(f"{path}: line {number}: a cpu line without a cpu tag")
        if stamp is None:
            raise DataError(f"{path}: line {number}: no timestamp")
        lines.append((tags["cpu"], fields, stamp, tags.get(HOST)))
    if not lines:
        raise DataError(f"{path}: no '{MEASUREMENT}' measurement lines")
    return lines


def _utilisation(series: dict[float, Fields], path: Path, cpu: str) -> dict[float, float]:
    """timestamp -> utilisation of one cpu tag: 100 − usage_idle, else from time_* counters
    since the previous line of that cpu."""
    out: dict[float, float] = {}
    previous: dict[str, float] | None = None
    for t in sorted(series):
        fields = series[t]
        counters = {m: float(fields[f"time_{m}"]) for m in MODES
                    if isinstance(fields.get(f"time_{m}"), int | float)}
        idle = fields.get("usage_idle")
        if idle is not None:
            if isinstance(idle, str | bool):
                raise DataError(f"{path}: cpu {cpu!r}: usage_idle must be a number, got {idle!r}")
            if math.isfinite(float(idle)):  # NaN: no value at t, as if the field were absent
                out[t] = 100.0 - float(idle)
        elif previous is not None and "idle" in counters:
            with contextlib.suppress(CounterBreak):
                out[t] = interval_utilisation({0: previous}, {0: counters})[0]
        previous = counters if "idle" in counters else None
    return out


def _frame(util: dict[str, dict[float, float]], cores: list[str], stamps: list[float],
           hosts: set[str], path: Path) -> pl.DataFrame:
    complete = [t for t in stamps if all(t in util[c] for c in cores)]
    # counters give intervals: the first reading of a file is their baseline, not a loss
    baseline = stamps[:1] if stamps and not any(stamps[0] in util[c] for c in cores) else []
    dropped = len(stamps) - len(complete) - len(baseline)
    if dropped:
        warnings.warn(f"{path}: dropped {dropped} timestamps at which some core has no "
                      "usage_idle or time_* value", DataWarning, stacklevel=4)
    if not complete:
        raise DataError(f"{path}: no timestamp has a value for every core")
    columns = {TIMESTAMP: complete}
    total = util.get(TOTAL, {})
    columns[OVERALL] = [total[t] if t in total else float(np.mean([util[c][t] for c in cores]))
                        for t in complete]
    for i, cpu in enumerate(cores):
        columns[core_column(i)] = [util[cpu][t] for t in complete]
    frame = pl.DataFrame(columns).with_columns(_float_noise_clipped(c) for c in columns
                                               if c != TIMESTAMP)
    starts = np.cumsum(run_starts(frame[TIMESTAMP].to_numpy()))
    if starts[-1] > 1:
        frame = frame.with_columns(pl.Series(RUN_COLUMN, [f"{path.stem}-{k}" for k in starts]))
    frame = frame.with_columns(pl.lit(UNLABELLED).alias(WORKLOAD))
    return frame.with_columns(pl.lit(hosts.pop()).alias(HOST)) if hosts else frame


def _float_noise_clipped(column: str) -> pl.Expr:
    """Rounding noise just outside [0, 100] (100 − 100.0000001) clipped; anything further
    out left for the range check to report."""
    x = pl.col(column)
    return pl.when(x.is_between(-1e-6, 100 + 1e-6)).then(x.clip(0.0, 100.0)).otherwise(x)
