"""Compile a `FeatureSpec` into Polars expressions and evaluate it per run.

Every lag and window is taken `.over(run)`, so nothing crosses a run boundary; each
output row is the input row it came from, keyed by (run, timestamp). Rows of a run
that lack the history the spec needs are kept but marked invalid.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import polars as pl

from cputwin.errors import FeatureError
from cputwin.features.spec import FeatureSpec
from cputwin.telemetry.ingest import DataWarning, schema_of
from cputwin.telemetry.schema import OVERALL, RUN_COLUMN, TIMESTAMP, WORKLOAD


@dataclass(frozen=True)
class CompiledSpec:
    """A spec resolved for one target on one machine: feature names and their expressions."""

    spec: FeatureSpec
    target: str
    names: list[str]
    exprs: list[pl.Expr]

    @property
    def history(self) -> int:
        return self.spec.history


@dataclass
class FeatureMatrix:
    """Features of a frame: one row per input row, `valid` where the history is complete."""

    names: list[str]
    X: np.ndarray
    valid: np.ndarray
    keys: pl.DataFrame  # run, timestamp, workload_type, position within run

    def __len__(self) -> int:
        return self.X.shape[0]


PHYSICS_COLUMNS = ("physics_estimate", "physics_clipped")
STATS_COLUMNS = ("others_mean", "others_std", "others_min", "others_max")


def resolve_group(group: str, target: str, cores: list[str]) -> list[str]:
    """The columns a group stands for, for this target on this machine."""
    if group == "overall":
        return [OVERALL]
    if group == "physics":
        return list(PHYSICS_COLUMNS)
    if group == "others_stats":
        return list(STATS_COLUMNS)
    if group == "others_sorted":
        return [f"others_rank_{i}" for i in range(1, len(cores))]
    return [c for c in cores if c != target]


def derived_names(spec: FeatureSpec) -> list[str]:
    """The derived columns a spec reads (lags and windows are taken of these)."""
    groups = spec.groups
    return [*(PHYSICS_COLUMNS if "physics" in groups else ()),
            *(STATS_COLUMNS if "others_stats" in groups else ()),
            *(["others_sorted"] if "others_sorted" in groups else [])]


def derived_columns(target: str, cores: list[str]) -> dict[str, pl.Expr | list[pl.Expr]]:
    """Columns computed from one sample: the physics estimate and the other cores' stats.

    The overall load is (close to) the mean of all N cores, so N × overall − Σ others
    estimates the target from what the machine reports without it.
    """
    others = [c for c in cores if c != target]
    total = pl.sum_horizontal(others) if others else pl.lit(0.0)
    physics = len(cores) * pl.col(OVERALL) - total
    values = pl.concat_list(others) if others else None
    zero = pl.lit(0.0)
    ranked = pl.concat_list(others).list.sort(descending=True) if others else None
    return {
        "others_sorted": [ranked.list.get(i).alias(f"others_rank_{i + 1}")
                          for i in range(len(others))],
        "physics_estimate": physics,
        "physics_clipped": physics.clip(0.0, 100.0),
        "others_mean": values.list.mean() if others else zero,
        "others_std": values.list.std(ddof=0) if others else zero,
        "others_min": values.list.min() if others else zero,
        "others_max": values.list.max() if others else zero,
    }


def compile_spec(
    spec: FeatureSpec, target: str, cores: list[str], workloads: list[str]
) -> CompiledSpec:
    """Resolve groups for this target and core list; derive names; build expressions.

    Column order: current columns, workload one-hots, then lags ordered by lag and
    column, then windows (the seed's order, which LightGBM's column sampling sees).
    """
    if target not in cores:
        raise FeatureError(f"target {target!r} is not one of the cores {cores[0]} … {cores[-1]}")
    names: list[str] = []
    exprs: list[pl.Expr] = []

    def add(name: str, expr: pl.Expr) -> None:
        names.append(name)
        exprs.append(expr.cast(pl.Float64).alias(name))

    for group in spec.current:
        for col in resolve_group(group, target, cores):
            add(col, pl.col(col))
    if spec.workload:
        for cat in workloads:
            add(f"workload_{cat}", pl.col(WORKLOAD) == cat)
    max_lag = max((max(v) for v in spec.lags.values() if v), default=0)
    for k in range(1, max_lag + 1):
        for group, lags in spec.lags.items():
            if k in lags:
                for col in resolve_group(group, target, cores):
                    add(f"{col}_lag_{k}", pl.col(col).shift(k).over(RUN_COLUMN))
    for group, wins in spec.windows.items():
        for w, stat in wins:
            for col in resolve_group(group, target, cores):
                roll = (
                    pl.col(col).rolling_mean(w)
                    if stat == "mean"
                    else pl.col(col).rolling_std(w, ddof=1)
                )
                add(f"{col}_roll{w}_{stat}", roll.over(RUN_COLUMN))
    return CompiledSpec(spec=spec, target=target, names=names, exprs=exprs)


def build_features(
    frame: pl.DataFrame,
    spec: FeatureSpec,
    target: str,
    workloads: list[str],
) -> FeatureMatrix:
    """Evaluate `spec` on a telemetry frame (as `load_runs` returns it)."""
    cores = schema_of(frame).core_columns
    compiled = compile_spec(spec, target, cores, workloads)
    warn_unseen_workloads(frame, workloads, spec)
    position = pl.int_range(pl.len()).over(RUN_COLUMN).alias("position")
    derived = derived_columns(target, cores)
    needed = []
    for c in derived_names(spec):
        needed += ([e.cast(pl.Float64) for e in derived[c]] if isinstance(derived[c], list)
                   else [derived[c].cast(pl.Float64).alias(c)])
    out = (
        frame.lazy()
        .with_columns(needed)
        .select(pl.col(RUN_COLUMN), pl.col(TIMESTAMP), pl.col(WORKLOAD), position, *compiled.exprs)
        .collect()
    )
    X = out.select(compiled.names).to_numpy() if compiled.names else np.empty((out.height, 0))
    valid = (out["position"] >= spec.history).to_numpy()
    keys = out.select(RUN_COLUMN, TIMESTAMP, WORKLOAD, "position")
    return FeatureMatrix(names=compiled.names, X=X, valid=valid, keys=keys)


def warn_unseen_workloads(frame: pl.DataFrame, workloads: list[str], spec: FeatureSpec) -> None:
    if not spec.workload:
        return
    unseen = sorted(set(frame[WORKLOAD].unique().to_list()) - set(workloads))
    if unseen:
        warnings.warn(
            f"workload labels not seen in training: {', '.join(unseen)} "
            "(their one-hot columns are all zero)",
            DataWarning,
            stacklevel=3,
        )
