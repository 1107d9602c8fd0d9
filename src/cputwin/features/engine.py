"""Compile a `FeatureSpec` into a plan of operations, and run the plan on a whole frame.

A plan is a list of `Op`s (a column now, its lag k, its mean or std over w samples, a
workload one-hot). The batch path here turns each op into a Polars expression taken
`.over(run)`, so nothing crosses a run boundary; the online path (`online.py`) runs the
same ops on a ring buffer, one sample at a time. Columns derived from a single sample
(the physics estimate, the other cores' statistics and ranks) come from one NumPy
function, `derive`, that both paths call. Each output row is the input row it came
from, keyed by (run, timestamp); rows without the history the spec needs are marked
invalid.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import polars as pl

from cputwin.contract import require_workload_cpu
from cputwin.features.spec import FeatureSpec
from cputwin.telemetry.ingest import DataWarning, schema_of
from cputwin.telemetry.schema import HOST, OVERALL, RUN_COLUMN, TIMESTAMP, UNLABELLED, WORKLOAD, WORKLOAD_CPU

PHYSICS_COLUMNS = ("physics_estimate", "physics_clipped")
STATS_COLUMNS = ("others_mean", "others_std", "others_min", "others_max")
WORKLOAD_EXCESS = "workload_excess"
# Window statistics are rounded to this many decimals on both paths: a running sum (batch)
# and a fresh sum (online) differ in the last bits, and a tree split learned between two
# such twins of one value would send the two paths different ways.
WINDOW_DECIMALS = 9
# Below this many matrix cells one thread writes the matrix (threads cost more than they give).
PARALLEL_CELLS = 2_000_000


# one-hot op kinds and the column each compares with its category
CATEGORICAL = {"onehot": WORKLOAD, "host": HOST}


@dataclass(frozen=True)
class Op:
    """One feature: `kind` of `source` (lag k / window w in `param`; onehot, host: a
    category of the workload or host column)."""

    name: str
    source: str
    kind: str
    param: int = 0


@dataclass(frozen=True)
class CompiledSpec:
    """A spec resolved for one target on one machine: its ops, in feature order."""

    spec: FeatureSpec
    target: str
    cores: tuple[str, ...]
    ops: tuple[Op, ...]

    @property
    def names(self) -> list[str]:
        return [op.name for op in self.ops]

    @property
    def history(self) -> int:
        return self.spec.history

    @property
    def sources(self) -> list[str]:
        """Columns the ops read, raw or derived, in first-use order (one-hots excluded)."""
        return list(dict.fromkeys(op.source for op in self.ops if op.kind not in CATEGORICAL))

    @property
    def derived(self) -> list[str]:
        return derived_names(self.spec, len(self.cores))


@dataclass
class FeatureMatrix:
    """Features of a frame: one row per input row, `valid` where the history is complete."""

    names: list[str]
    X: np.ndarray
    valid: np.ndarray
    keys: pl.DataFrame  # run, timestamp, workload_type, position within run

    def __len__(self) -> int:
        return self.X.shape[0]


def resolve_group(group: str, target: str, cores: list[str] | tuple[str, ...]) -> list[str]:
    """The columns a group stands for, for this target on this machine."""
    if group == "overall":
        return [OVERALL]
    if group == "physics":
        return list(PHYSICS_COLUMNS)
    if group == "others_stats":
        return list(STATS_COLUMNS)
    if group == "others_sorted":
        return [f"others_rank_{i}" for i in range(1, len(cores))]
    if group == "workload_cpu":
        return [WORKLOAD_CPU, WORKLOAD_EXCESS]
    return [c for c in cores if c != target]


def derived_names(spec: FeatureSpec, n_cores: int) -> list[str]:
    """The derived columns a spec reads (lags and windows are taken of these)."""
    groups = spec.groups
    return [*(PHYSICS_COLUMNS if "physics" in groups else ()),
            *(STATS_COLUMNS if "others_stats" in groups else ()),
            *([f"others_rank_{i}" for i in range(1, n_cores)] if "others_sorted" in groups
              else ()),
            *((WORKLOAD_EXCESS,) if "workload_cpu" in groups else ())]


def derive(overall: np.ndarray, others: np.ndarray, n_cores: int,
           workload_cpu: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Columns computed from one sample, for any number of rows (batch) or one (online).

    The overall load is (close to) the mean of all N cores, so N × overall − Σ others
    estimates the target from what the machine reports without it. Likewise the part of
    the workload's own CPU use that the other cores cannot hold must be on the target.
    overall: (rows,); others: (rows, n_cores - 1); workload_cpu: (rows,), NaN where unknown.
    """
    rows, width = others.shape
    total_others = np.add.reduce(others, axis=1)
    physics = n_cores * overall - total_others
    # np.minimum/np.maximum and the explicit moments below are what np.clip, np.mean and
    # np.std compute (the same reductions, in the same order), without their Python
    # wrappers, which cost more than the arithmetic on the one row of a live tick
    out = {"physics_estimate": physics,
           "physics_clipped": np.minimum(np.maximum(physics, 0.0), 100.0)}
    if workload_cpu is not None:
        out[WORKLOAD_EXCESS] = np.minimum(np.maximum(workload_cpu - total_others, 0.0), 100.0)
    if width == 0:
        zero = np.zeros(rows)
        out.update(others_mean=zero, others_std=zero, others_min=zero, others_max=zero)
        return out
    mean = total_others / width
    dev = others - mean[:, None]
    out.update(others_mean=mean, others_std=np.sqrt(np.add.reduce(dev * dev, axis=1) / width),
               others_min=np.minimum.reduce(others, axis=1),
               others_max=np.maximum.reduce(others, axis=1))
    ranked = -np.sort(-others, axis=1)
    out.update({f"others_rank_{i + 1}": ranked[:, i] for i in range(others.shape[1])})
    return out


def compile_spec(
    spec: FeatureSpec, target: str, cores: list[str], workloads: list[str],
    hosts: list[str] | tuple[str, ...] = (),
) -> CompiledSpec:
    """Resolve groups for this target and core list into ops, named from the spec.

    Order: current columns, workload one-hots, then lags ordered by lag and column, then
    windows (the seed's order, which LightGBM's column sampling sees). `target` is one of
    `cores`: the twin checked it against its data (`Schema.check_target`).
    """
    ops: list[Op] = []
    for group in spec.current:
        ops += [Op(col, col, "now") for col in resolve_group(group, target, cores)]
    if spec.workload:
        ops += [Op(f"workload_{cat}", cat, "onehot") for cat in workloads]
    if spec.host:
        ops += [Op(f"host_{name}", name, "host") for name in hosts]
    max_lag = max((max(v) for v in spec.lags.values() if v), default=0)
    for k in range(1, max_lag + 1):
        for group, lags in spec.lags.items():
            if k in lags:
                ops += [Op(f"{col}_lag_{k}", col, "lag", k)
                        for col in resolve_group(group, target, cores)]
    for group, wins in spec.windows.items():
        for w, stat in wins:
            ops += [Op(f"{col}_roll{w}_{stat}", col, stat, w)
                    for col in resolve_group(group, target, cores)]
    return CompiledSpec(spec=spec, target=target, cores=tuple(cores), ops=tuple(ops))


def op_expr(op: Op, contiguous: bool = False) -> pl.Expr:
    """The batch form of one op.

    When each run's rows are contiguous (as `load_runs` gives them), a lag or window is
    taken over the whole column and nulled where it would reach into the previous run
    (position in run < lag, or < window - 1): the same values as `.over(run)`, about
    eight times faster. Otherwise it is taken `.over(run)`.
    """
    col = pl.col(op.source)
    if op.kind == "now":
        return col.cast(pl.Float64).alias(op.name)
    if op.kind in CATEGORICAL:
        return (pl.col(CATEGORICAL[op.kind]) == op.source).cast(pl.Float64).alias(op.name)
    if op.kind == "lag":
        expr, reach = col.shift(op.param), op.param
    elif op.kind == "mean":
        expr, reach = col.rolling_mean(op.param).round(WINDOW_DECIMALS), op.param - 1
    else:
        expr = col.rolling_std(op.param, ddof=1).round(WINDOW_DECIMALS)
        reach = op.param - 1
    expr = pl.when(pl.col("position") >= reach).then(expr) if contiguous else expr.over(RUN_COLUMN)
    # missing history as NaN, not null: the matrix then leaves Polars in one copy
    return expr.cast(pl.Float64).fill_null(float("nan")).alias(op.name)


def run_starts(runs: pl.Series) -> np.ndarray:
    """Row indices where a new block of one run begins (row 0 included)."""
    if runs.len() == 0:
        return np.zeros(0, dtype=np.int64)
    changed = (runs != runs.shift(1)).fill_null(True).to_numpy()
    return np.flatnonzero(changed)


def runs_are_contiguous(runs: pl.Series, starts: np.ndarray | None = None) -> bool:
    """True when every run's rows form one block (no run starts two blocks)."""
    starts = run_starts(runs) if starts is None else starts
    return runs.gather(starts).n_unique() == starts.size


def contiguous_positions(runs: pl.Series, starts: np.ndarray) -> np.ndarray:
    """Each row's position within its run, for runs that form one block each."""
    lengths = np.diff(np.append(starts, runs.len()))
    return np.arange(runs.len(), dtype=np.int64) - np.repeat(starts, lengths)


def with_derived(frame: pl.DataFrame, compiled: CompiledSpec) -> pl.DataFrame:
    """The frame plus the derived columns the compiled spec reads."""
    if not compiled.derived:
        return frame
    workload_cpu = None
    if compiled.spec.reads_workload_cpu:
        frame = frame.with_columns(
            workload_cpu_column(frame, f"feature set {compiled.spec.name!r}"))
        workload_cpu = frame[WORKLOAD_CPU].to_numpy()
    others = [c for c in compiled.cores if c != compiled.target]
    matrix = frame.select(others).to_numpy() if others else np.zeros((frame.height, 0))
    values = derive(frame[OVERALL].to_numpy(), matrix, len(compiled.cores), workload_cpu)
    return frame.with_columns([pl.Series(name, values[name]) for name in compiled.derived])


def workload_cpu_column(frame: pl.DataFrame, reader: str) -> pl.Series:
    """The workload's CPU use as floats, a missing reading (null or NaN) as null.

    Null, not NaN: a Polars window over a null is null, as the online path's window over a
    NaN is NaN, and both reach the matrix as NaN (a missing value to LightGBM). A frame
    with no reading at all (the seed's data, or runs recorded before the collector
    measured it) cannot feed such a spec: that is an error, not a column of NaN.
    """
    column = (frame[WORKLOAD_CPU].cast(pl.Float64).fill_nan(None)
              if WORKLOAD_CPU in frame.columns else None)
    require_workload_cpu(column is not None and not (frame.height and
                                                     column.null_count() == frame.height), reader)
    return column


def build_features(
    frame: pl.DataFrame,
    spec: FeatureSpec,
    target: str,
    workloads: list[str],
    dtype: type[np.floating] = np.float64,
    hosts: list[str] | tuple[str, ...] = (),
) -> FeatureMatrix:
    """Evaluate `spec` on a telemetry frame (as `load_runs` returns it).

    dtype: of the matrix. float32 halves its memory (for millions of rows); values are
    computed in float64 and rounded once when written.
    hosts: the host categories, for a spec with `host` (a frame without a host column
    counts as an unseen host: all its host columns are zero).
    """
    cores = schema_of(frame).core_columns
    compiled = compile_spec(spec, target, cores, workloads, hosts)
    warn_unseen_workloads(frame, workloads, spec)
    if spec.host and HOST not in frame.columns:
        frame = frame.with_columns(pl.lit("").alias(HOST))
    names = compiled.names
    starts = run_starts(frame[RUN_COLUMN])
    if runs_are_contiguous(frame[RUN_COLUMN], starts):
        out = with_derived(frame, compiled).with_columns(
            pl.Series("position", contiguous_positions(frame[RUN_COLUMN], starts)))
        X = _matrix_contiguous(out, compiled, dtype)
    else:
        out = (
            with_derived(frame, compiled).lazy()
            .with_columns(pl.int_range(pl.len()).over(RUN_COLUMN).alias("position"))
            .select(pl.col(RUN_COLUMN), pl.col(TIMESTAMP), pl.col(WORKLOAD), pl.col("position"),
                    *[op_expr(op) for op in compiled.ops])
            .collect()
        )
        X = (out.select(names).to_numpy(order="fortran").astype(dtype, copy=False) if names
             else np.empty((out.height, 0), dtype=dtype))
    valid = (out["position"] >= spec.history).to_numpy()
    # from the Series, not `select`: select rechunks, which copies a many-chunk frame
    keys = pl.DataFrame([out[c] for c in (RUN_COLUMN, TIMESTAMP, WORKLOAD, "position")])
    return FeatureMatrix(names=names, X=X, valid=valid, keys=keys)


def _matrix_contiguous(base: pl.DataFrame, compiled: CompiledSpec, dtype) -> np.ndarray:
    """The feature matrix written column by column into one preallocated array.

    With runs contiguous, a lag is a slice of the source column, blanked (NaN) where it
    would reach into the previous run; a window comes from Polars one column at a time,
    a one-hot from one comparison. Each value is written once and only one source column
    is held outside the frame at a time, so memory is the matrix plus a column or two.
    """
    n = base.height
    X = np.empty((n, len(compiled.ops)), dtype=dtype, order="F")
    position = base["position"].to_numpy()
    max_lag = max((op.param for op in compiled.ops if op.kind == "lag"), default=0)
    run_heads = np.flatnonzero(position < max_lag)  # rows a lag may reach back from
    by_source: dict[str, list[tuple[int, Op]]] = {}
    for j, op in enumerate(compiled.ops):
        by_source.setdefault(op.source if op.kind in ("now", "lag") else "", []).append((j, op))

    def write(source: str) -> None:
        values = base[source].to_numpy() if source else None
        for j, op in by_source[source]:
            if op.kind == "now":
                X[:, j] = values
            elif op.kind == "lag":
                k = op.param
                X[k:, j] = values[:-k] if k < n else X[k:, j]
                X[:min(k, n), j] = np.nan
                X[run_heads[position[run_heads] < k], j] = np.nan
            elif op.kind in CATEGORICAL:
                X[:, j] = (base[CATEGORICAL[op.kind]] == op.source).to_numpy()
            else:
                X[:, j] = base.select(op_expr(op, contiguous=True)).to_series().to_numpy()

    # NumPy releases the GIL while it copies, so threads write columns (and take the page
    # faults of fresh memory) in parallel; each column has one writer, so the result is
    # the same whatever the thread count.
    if n * len(compiled.ops) < PARALLEL_CELLS:
        for source in by_source:
            write(source)
    else:
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            list(pool.map(write, by_source))
    return X


def warn_unseen_workloads(frame: pl.DataFrame, workloads: list[str], spec: FeatureSpec) -> None:
    if not spec.workload:
        return
    message = unseen_workloads(frame[WORKLOAD].unique().to_list(), workloads)
    if message:
        warnings.warn(message, DataWarning, stacklevel=3)


def unseen_workloads(labels: list[str], known: list[str]) -> str | None:
    """The one line that says which of `labels` a twin trained on `known` never saw (None
    when it saw them all). Such a label is an unseen workload: its one-hot columns are all
    zero, and the meta-model and detector use their global settings. Samples without a
    label are the workload UNLABELLED, which a twin trained on labelled runs never saw."""
    unseen = sorted(set(labels) - set(known))
    if not unseen:
        return None
    message = (f"workload labels not seen in training: {', '.join(unseen)} (unseen workloads: "
               "their one-hot columns are all zero, the meta-model and the detector use their "
               "global settings)")
    if known == [UNLABELLED]:
        return message + "; this twin was trained without labels: leave them out"
    if UNLABELLED in unseen:
        return (message + f"; samples without a label are {UNLABELLED!r}, and this twin was "
                f"trained on labelled runs ({', '.join(known)}): label them for its accuracy")
    return message
