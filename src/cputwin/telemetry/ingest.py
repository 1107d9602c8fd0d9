"""Load telemetry runs from parquet, CSV or Telegraf line-protocol files: each file is one
run (or one per value of its `run` column), checked before anything uses it.

Every problem is reported as a one-line `DataError` naming the file; repairable
problems (unsorted or duplicated timestamps) are repaired with a warning.

Labels are optional: a run without a `workload_type` column (or with that column empty)
is one workload, `UNLABELLED` ("unlabelled"). Mixed data keeps both kinds: labelled
runs keep their labels and the unlabelled ones form their own category, which a twin
treats as any other label (a twin that never saw it treats it as an unseen workload).
"""

from __future__ import annotations

import glob as globlib
import math
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import polars as pl

from cputwin.errors import DataError
from cputwin.telemetry import schema
from cputwin.telemetry.collector import read_metadata
from cputwin.telemetry.schema import HOST, OVERALL, RUN_COLUMN, TIMESTAMP, UNLABELLED, WORKLOAD, Schema

PathLike = str | Path
ColumnMap = dict[str, str]  # a file's column name -> cputwin's
CSV_SUFFIX = ".csv"
LINE_PROTOCOL_SUFFIXES = (".lp", ".influx")
DATA_SUFFIXES = (".parquet", CSV_SUFFIX, *LINE_PROTOCOL_SUFFIXES)

# `cpu_util_overall` is the mean of the cores, read at a slightly different instant: per
# run, the median |overall − mean(cores)| is a fraction of one reading's resolution over
# the cores (`reading_resolution(step) / cores`, at least 1 point): at most 0.56 of it in
# the seed's runs and the embedded sample. With any one core column dropped it is 1.31 or
# more in every seed run whose cores differ (a run whose cores all carry the same load
# cannot show a missing one). Above REFUSE the file is refused, above WARN it warns.
MISMATCH_WARN, MISMATCH_REFUSE = 0.75, 1.0
MISMATCH_MIN_ROWS = 10  # fewer rows say too little about a median


class DataWarning(UserWarning):
    """Telemetry that was repaired on load (sorted, de-duplicated, an unknown label)."""


def resolve_paths(source: PathLike | Iterable[PathLike]) -> list[Path]:
    """Expand a file, a folder (its .parquet, .csv, .lp and .influx files), a glob, or a
    list of those, in sorted order."""
    items = [source] if isinstance(source, str | Path) else list(source)
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in DATA_SUFFIXES and f.is_file())
            if not found:
                raise DataError(f"{p}: folder holds no .parquet, .csv, .lp or .influx files")
            paths.extend(found)
        elif p.exists():
            paths.append(p)
        elif any(ch in str(item) for ch in "*?["):
            found = sorted(Path(m) for m in globlib.glob(str(item)))
            if not found:
                raise DataError(f"{item}: pattern matches no files")
            paths.extend(found)
        else:
            raise DataError(f"{item}: no such file or folder")
    if not paths:
        raise DataError("no telemetry files given")
    for p in paths:  # a FIFO or device would block the reader for good
        if not p.is_file():
            raise DataError(f"{p}: not a regular file (a telemetry file must be one)")
    return paths


def load_runs(source: PathLike | Iterable[PathLike], columns: ColumnMap | None = None
              ) -> pl.DataFrame:
    """Load and check telemetry runs: one run per file, named by the file's stem, or, in a
    file with a `run` column, one run per value of that column. `columns` renames a
    file's columns to cputwin's (e.g. {"ts": "timestamp"}) before the checks.

    Returns one frame with leading `run` and `host` columns (see `host_of`), in file
    order, each run sorted by timestamp. When the files come from more than one host a
    run is named `host/stem`, so two hosts' `run1` stay two runs. Every run must have
    the same logical-core count (`load_hosts` loads hosts that differ); extra columns
    are dropped.
    """
    paths = resolve_paths(source)
    frames = [read_run(p, columns) for p in paths]
    if len({f[HOST][0] for f in frames}) > 1:
        frames = [f.with_columns(pl.concat_str(HOST, pl.lit("/"), RUN_COLUMN).alias(RUN_COLUMN))
                  for f in frames]
    names = [n for f in frames for n in f[RUN_COLUMN].unique(maintain_order=True).to_list()]
    if len(set(names)) != len(names):
        every = pl.Series(names)
        dup = every.filter(every.is_duplicated()).sort()[0]
        raise DataError(f"two files share the run name {dup!r}: run names must be unique")
    counts = {f[RUN_COLUMN][0]: count_cores(f) for f in frames}
    if len(set(counts.values())) > 1:
        desc = ", ".join(f"{name}: {n}" for name, n in counts.items())
        raise DataError(f"runs have different core counts ({desc}); train one twin per "
                        "machine (--per-host)")
    frame = pl.concat(frames, how="vertical")
    warn_if_ratios(frame)
    return frame


RATIO_MIN_ROWS = 100  # fewer rows (a short record of a machine at rest) say nothing of units


def warn_if_ratios(frame: pl.DataFrame) -> None:
    """Warn when no utilisation reaches 1 %: most likely 0–1 ratios (a Prometheus
    recording rule's usual unit), which cputwin would read as a machine almost at rest;
    its detector, whose error floor is 1 point, could then never alarm."""
    cores = schema.core_columns_in(frame.columns)
    highest = frame.select(pl.max_horizontal(pl.col([*cores, OVERALL]).max())).item()
    if frame.height >= RATIO_MIN_ROWS and highest is not None and 0.0 < highest <= 1.0:
        warnings.warn(
            f"no utilisation in these {frame.height} rows goes above {highest:g} %: if they are "
            "0-1 ratios, multiply them by 100 (cputwin reads percent, 0-100)",
            DataWarning, stacklevel=3)


def load_hosts(source: PathLike | Iterable[PathLike], columns: ColumnMap | None = None
               ) -> dict[str, pl.DataFrame]:
    """Load runs grouped by host: host -> that host's frame (hosts may differ in cores)."""
    by_host: dict[str, list[Path]] = {}
    for path in resolve_paths(source):
        raw = None if path.suffix not in DATA_SUFFIXES[1:] else rename(read_raw(path), columns)
        by_host.setdefault(host_of(path, raw), []).append(path)
    return {host: load_runs(paths, columns) for host, paths in sorted(by_host.items())}


def host_of(path: Path, raw: pl.DataFrame | None = None) -> str:
    """The host a run was recorded on: its `host` column, else the collector's metadata,
    else the name of the folder that holds the file."""
    if raw is None:
        try:
            if Path(path).suffix in DATA_SUFFIXES[1:]:  # CSV, line protocol: read it all
                raw = read_raw(Path(path))
            else:
                has_host = HOST in pl.read_parquet_schema(path)
                raw = pl.read_parquet(path, columns=[HOST]) if has_host else None
        except Exception:  # an unreadable file is reported, with its reason, by read_run
            raw = None
    if raw is not None and HOST in raw.columns:
        hosts = raw[HOST].drop_nulls().unique()
        if hosts.len() > 1:
            raise DataError(f"{path}: column 'host' holds {hosts.len()} hosts; one run is one host")
        if hosts.len() == 1:
            return str(hosts[0])
    try:
        host = read_metadata(path).get("host")
    except Exception:
        host = None
    return str(host) if host else Path(path).resolve().parent.name


def count_cores(frame: pl.DataFrame) -> int:
    return len(schema.core_columns_in(frame.columns))


def schema_of(frame: pl.DataFrame) -> Schema:
    return Schema(n_cores=count_cores(frame))


def sample_step(frame: pl.DataFrame) -> float | None:
    """The data's sampling interval in seconds: the median step between a run's samples
    (None when no run has two)."""
    diff = pl.col(TIMESTAMP).diff()
    step = frame.select((diff.over(RUN_COLUMN) if RUN_COLUMN in frame.columns else diff)
                        .median()).item()
    return float(step) if step is not None and step > 0 else None


def resample(frame: pl.DataFrame, step_s: float) -> pl.DataFrame:
    """Each run's samples averaged over bins of `step_s` seconds (a bin: the samples whose
    timestamps share a multiple of `step_s`; its timestamp is their mean). Text columns
    (run, host, label) key the bins, so no bin mixes two runs."""
    if not step_s > 0:
        raise DataError(f"resampling step must be above 0 seconds, got {step_s}")
    numeric = [c for c, dtype in frame.schema.items() if dtype.is_numeric()]
    keys = [c for c in frame.columns if c not in numeric]
    return (frame.with_columns((pl.col(TIMESTAMP) // step_s).alias("_bin"))
            .group_by(*keys, "_bin", maintain_order=True)
            .agg(pl.col(numeric).mean())
            .select(frame.columns))


def read_run(path: Path, columns: ColumnMap | None = None) -> pl.DataFrame:
    """Read one run (parquet, CSV or line protocol) and check it against the schema."""
    raw = rename(read_raw(path), columns)
    frame = check_run(raw, path)
    try:
        cores = read_metadata(path).get("logical_cores")
    except Exception:  # metadata that cannot be read is no metadata
        cores = None
    check_overall(frame, path, cores if isinstance(cores, int) else None)
    return frame.insert_column(1, pl.Series(HOST, [host_of(path, raw)] * frame.height))


def check_overall(frame: pl.DataFrame, path: Path | str, logical_cores: int | None = None
                  ) -> None:
    """Refuse a run whose overall load is not the mean of its cores (a core column missing,
    an overall from elsewhere), or whose collector recorded another core count."""
    cores = schema.core_columns_in(frame.columns)
    if logical_cores is not None and logical_cores != len(cores):
        raise DataError(f"{path}: the collector recorded {logical_cores} logical cores, the "
                        f"file has {len(cores)} core columns")
    per_run = (frame.group_by(RUN_COLUMN, maintain_order=True)
               .agg((pl.col(OVERALL) - pl.mean_horizontal(cores)).abs().median().alias("gap"),
                    pl.col(TIMESTAMP).diff().median().alias("step"), pl.len().alias("rows"))
               .filter(pl.col("rows") >= MISMATCH_MIN_ROWS))
    if per_run.height == 0:
        return
    units = [max(schema.reading_resolution(step or 0.0) / len(cores), 1.0)
             for step in per_run["step"].to_list()]
    ratio = per_run["gap"].to_numpy() / units
    worst = int(ratio.argmax())
    if ratio[worst] <= MISMATCH_WARN:
        return
    run, gap = per_run[RUN_COLUMN][worst], per_run["gap"][worst]
    message = (f"{path}: {OVERALL} is not the mean of the {len(cores)} core columns (run "
               f"{run!r}: median |overall − mean(cores)| {gap:.2f} points, at most "
               f"{MISMATCH_REFUSE * units[worst]:.2f} expected at this rate)")
    if ratio[worst] > MISMATCH_REFUSE:
        raise DataError(message + "; is a core column missing?")
    warnings.warn(message, DataWarning, stacklevel=3)


def read_raw(path: Path) -> pl.DataFrame:
    """A file's rows as they are, by its suffix: .csv, .lp/.influx (Telegraf), else parquet."""
    if path.suffix in LINE_PROTOCOL_SUFFIXES:
        from cputwin.telemetry.telegraf import read_line_protocol

        return read_line_protocol(path)
    csv = path.suffix == CSV_SUFFIX
    try:
        raw = (pl.read_csv(path, infer_schema_length=10_000, separator=csv_separator(path))
               if csv else pl.read_parquet(path))
    except Exception as exc:  # polars raises several types for a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot read as {'CSV' if csv else 'parquet'} ({first})") from None
    return raw


CSV_SEPARATORS = ",;\t"


def csv_separator(path: Path) -> str:
    """The separator of a CSV file's header line: comma, semicolon (as spreadsheets in
    many locales write CSV) or tab, whichever it holds most of."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            header = f.readline()
    except OSError:
        return ","  # the reader names the problem
    return max(CSV_SEPARATORS, key=header.count)


CORE_NUMBER = "{n}"  # in a column map, any core number: cpu{n}=cpu_util_core_{n}


def parse_column_map(text: str) -> ColumnMap:
    """`OLD=NEW,OLD2=NEW2` (the CLI's --columns) as a mapping; `cpu{n}=cpu_util_core_{n}`
    maps every numbered column at once."""
    pairs = [item.strip() for item in text.split(",") if item.strip()]
    mapping: ColumnMap = {}
    for item in pairs:
        old, sep, new = item.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise DataError(f"--columns: {item!r} is not OLD=NEW")
        if (CORE_NUMBER in old) != (CORE_NUMBER in new):
            raise DataError(f"--columns: {item!r} needs {CORE_NUMBER} on both sides or neither")
        mapping[old.strip()] = new.strip()
    if len(set(mapping.values())) != len(mapping):
        raise DataError("--columns: two columns are renamed to the same name")
    return mapping


def expand_column_map(columns: ColumnMap, names: list[str]) -> ColumnMap:
    """The map for a file with these column names: each `{n}` entry becomes one entry per
    column it matches (`cpu{n}` matches cpu0, cpu1, …; the number is kept)."""
    out: ColumnMap = {}
    for old, new in columns.items():
        if CORE_NUMBER not in old:
            out[old] = new
            continue
        pattern = re.compile(re.escape(old).replace(re.escape(CORE_NUMBER), r"(\d+)"))
        for name in names:
            found = pattern.fullmatch(name)
            if found:
                out[name] = new.replace(CORE_NUMBER, str(int(found.group(1))))
    return out


def rename(raw: pl.DataFrame, columns: ColumnMap | None) -> pl.DataFrame:
    """Rename the mapped columns a file has (a map may cover files of several kinds); a
    string timestamp (ISO 8601, as CSV exports write it) becomes seconds since the epoch,
    and so does a number in ms, µs or ns since the epoch (told apart by its size)."""
    if columns:
        present = {old: new for old, new in expand_column_map(columns, raw.columns).items()
                   if old in raw.columns}
        raw = raw.drop([new for new in present.values() if new in raw.columns
                        and new not in present]).rename(present)
    if TIMESTAMP in raw.columns and raw[TIMESTAMP].dtype == pl.String:
        try:
            stamps = raw[TIMESTAMP].str.to_datetime(time_zone="UTC")
        except Exception:  # not dates: the numeric check names the column
            return raw
        raw = raw.with_columns((stamps.dt.epoch("us") / 1e6).alias(TIMESTAMP))
    elif TIMESTAMP in raw.columns and raw[TIMESTAMP].dtype.is_numeric() and raw.height:
        biggest = raw[TIMESTAMP].abs().max()
        if biggest is not None and math.isfinite(biggest) and biggest >= schema.EPOCH_UNITS[-1][0]:
            raw = raw.with_columns(
                pl.Series(TIMESTAMP, schema.to_seconds(raw[TIMESTAMP].to_numpy())))
    return raw


def check_run(raw: pl.DataFrame, path: Path | str) -> pl.DataFrame:
    """Validate one run's frame; return it normalised (typed, sorted, de-duplicated)."""
    if raw.height == 0:
        raise DataError(f"{path}: file holds no rows")
    cores = schema.core_columns_in(raw.columns)
    if not cores:
        raise DataError(f"{path}: missing required columns {schema.core_column(0)}, … (no per-core data)")
    expected = Schema(n_cores=len(cores))
    missing = [c for c in expected.required_columns if c not in raw.columns]
    if missing:
        raise DataError(f"{path}: missing required column {missing[0]!r}")
    numeric = [TIMESTAMP, *expected.utilisation_columns]
    for col in numeric:
        if not raw[col].dtype.is_numeric():
            raise DataError(f"{path}: column {col!r} must be numeric, found {raw[col].dtype}")
    labelled = WORKLOAD in raw.columns and raw[WORKLOAD].null_count() < raw.height
    for col in [*numeric, *([WORKLOAD] if labelled else [])]:
        missing = raw[col].is_null() | (raw[col].is_nan() if col in numeric else False)
        if missing.any():
            first = int(missing.arg_true()[0])
            where = "" if col == TIMESTAMP else f" (the first at timestamp {raw[TIMESTAMP][first]})"
            raise DataError(f"{path}: column {col!r} has {int(missing.sum())} missing (null or "
                            f"NaN) values, the first in data row {first + 1}{where}; drop or "
                            "fill those rows")
    if labelled and raw[WORKLOAD].dtype != pl.String:
        raise DataError(f"{path}: column {WORKLOAD!r} must hold text labels")
    if raw[TIMESTAMP].is_infinite().any():
        raise DataError(f"{path}: column {TIMESTAMP!r} has infinite values")
    for col in expected.utilisation_columns:
        lo, hi = raw[col].min(), raw[col].max()
        if lo < 0 or hi > 100:
            raise DataError(
                f"{path}: column {col!r} has values outside [0, 100] (min {lo}, max {hi})"
            )
    optional = [
        pl.col(c).cast(pl.Float64, strict=False) if c in raw.columns else pl.lit(None, pl.Float64)
        for c in schema.OPTIONAL_COLUMNS
    ]
    run = (pl.col(RUN_COLUMN).cast(pl.String) if RUN_COLUMN in raw.columns
           else pl.lit(Path(path).stem))
    if RUN_COLUMN in raw.columns and raw[RUN_COLUMN].null_count():
        raise DataError(f"{path}: column 'run' has {raw[RUN_COLUMN].null_count()} missing values")
    frame = raw.select(
        run.alias(RUN_COLUMN),
        pl.col(TIMESTAMP).cast(pl.Float64),
        *[pl.col(c).cast(pl.Float64) for c in expected.utilisation_columns],
        *[e.alias(c) for e, c in zip(optional, schema.OPTIONAL_COLUMNS, strict=True)],
        (pl.col(WORKLOAD) if labelled else pl.lit(UNLABELLED)).alias(WORKLOAD),
    )
    check_workload_cpu(frame[schema.WORKLOAD_CPU], path)
    return repair_order(frame, path)


def check_workload_cpu(column: pl.Series, path: Path | str) -> None:
    """The workload's CPU use is a percentage of cores: never negative or infinite (NaN or
    null is a sample where it was not measured)."""
    bad = int(((column < 0) | column.is_infinite()).sum())
    if bad:
        raise DataError(f"{path}: column {schema.WORKLOAD_CPU!r} has {bad} negative or infinite values")


def repair_order(frame: pl.DataFrame, path: Path | str) -> pl.DataFrame:
    """Each run's rows in one block, in time order, one row per timestamp (with warnings).

    Runs keep the order in which they first appear in the file."""
    run_index = None
    if frame[RUN_COLUMN].n_unique() > 1:
        first_seen = frame[RUN_COLUMN].unique(maintain_order=True)
        run_index = frame[RUN_COLUMN].replace_strict(
            first_seen, pl.int_range(first_seen.len(), eager=True)).alias("_run_index")
    if not _is_ordered(frame[TIMESTAMP], run_index):
        warnings.warn(f"{path}: timestamps were not sorted; sorted them", DataWarning, stacklevel=3)
        if run_index is None:
            frame = frame.sort(TIMESTAMP, maintain_order=True)
        else:
            frame = (frame.with_columns(run_index).sort(["_run_index", TIMESTAMP],
                                                        maintain_order=True).drop("_run_index"))
    subset = [RUN_COLUMN, TIMESTAMP]
    # in order now, a duplicate follows the row it repeats: no hashing of every row
    dups = int(frame.select(((pl.col(TIMESTAMP).diff() == 0)
                             & (pl.col(RUN_COLUMN) == pl.col(RUN_COLUMN).shift())).sum()).item())
    if dups:
        warnings.warn(
            f"{path}: dropped {dups} rows with duplicated timestamps", DataWarning, stacklevel=3
        )
        frame = frame.unique(subset=subset, keep="first", maintain_order=True)
    return frame


def _is_ordered(ts: pl.Series, run_index: pl.Series | None) -> bool:
    """True when runs form blocks in first-seen order and time increases within each."""
    if run_index is None:
        return ts.is_sorted()
    step = run_index.diff().fill_null(0).to_numpy()
    rising = ts.diff().fill_null(0).to_numpy() >= 0
    return bool(((step == 1) | ((step == 0) & rising)).all())


__all__ = ["UNLABELLED", "DataWarning", "OVERALL", "load_runs", "read_run", "resolve_paths",
           "schema_of"]
