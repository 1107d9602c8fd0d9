"""A plain pandas reference for feature specs: groupby per run, shift, rolling.

It is what a notebook user would write. Tests check the Polars engine against it to
1e-9, and benchmarks time the engine against it. It needs pandas, which only the `test`
extra installs: nothing the CLI or the library runs imports this module.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cputwin.features.engine import resolve_group
from cputwin.features.spec import FeatureSpec
from cputwin.telemetry.schema import (
    HOST,
    OVERALL,
    RUN_COLUMN,
    WORKLOAD,
    WORKLOAD_CPU,
    core_columns_in,
)


def _window(values: pd.Series, w: int, stat: str) -> np.ndarray:
    """A window statistic by its definition (two-pass std, ddof=1); NaN until w rows exist.

    pandas' own rolling std is a running update whose rounding error reaches 1e-6 on
    flat stretches, so the reference computes each window afresh.
    """
    x = values.to_numpy(dtype=float)
    out = np.full(x.size, np.nan)
    if x.size >= w:
        win = np.lib.stride_tricks.sliding_window_view(x, w)
        out[w - 1:] = win.mean(axis=1) if stat == "mean" else win.std(axis=1, ddof=1)
    return out


def reference_derived(df: pd.DataFrame, target: str, cores: list[str]) -> dict[str, np.ndarray]:
    others = df[[c for c in cores if c != target]].to_numpy(dtype=float)
    physics = len(cores) * df[OVERALL].to_numpy(dtype=float) - others.sum(axis=1)
    empty = others.shape[1] == 0
    stat = (lambda f: np.zeros(len(df))) if empty else (lambda f: f(others, axis=1))
    ranked = -np.sort(-others, axis=1)
    own = {}
    if WORKLOAD_CPU in df.columns:
        cpu = df[WORKLOAD_CPU].to_numpy(dtype=float, na_value=np.nan)
        own = {WORKLOAD_CPU: cpu, "workload_excess": np.clip(cpu - others.sum(axis=1), 0.0, 100.0)}
    return {
        **own,
        **{f"others_rank_{i + 1}": ranked[:, i] for i in range(others.shape[1])},
        "physics_estimate": physics,
        "physics_clipped": np.clip(physics, 0.0, 100.0),
        "others_mean": stat(np.mean),
        "others_std": stat(np.std),
        "others_min": stat(np.min),
        "others_max": stat(np.max),
    }


def reference_features(
    df: pd.DataFrame, spec: FeatureSpec, target: str, workloads: list[str],
    hosts: list[str] | tuple[str, ...] = (),
) -> tuple[pd.DataFrame, np.ndarray]:
    """Features (same names as the engine's) and the valid-row mask, row for row."""
    cores = core_columns_in(list(df.columns))
    df = df.assign(**reference_derived(df, target, cores))
    by_run = df.groupby(RUN_COLUMN, sort=False)
    cols: dict[str, pd.Series] = {}
    for group in spec.current:
        for c in resolve_group(group, target, cores):
            cols[c] = df[c].astype(float)
    if spec.workload:
        for cat in workloads:
            cols[f"workload_{cat}"] = (df[WORKLOAD] == cat).astype(float)
    if spec.host:
        for name in hosts:
            cols[f"host_{name}"] = (df[HOST] == name).astype(float)
    max_lag = max((max(v) for v in spec.lags.values() if v), default=0)
    for k in range(1, max_lag + 1):
        for group, lags in spec.lags.items():
            if k in lags:
                for c in resolve_group(group, target, cores):
                    cols[f"{c}_lag_{k}"] = by_run[c].shift(k)
    for group, wins in spec.windows.items():
        for w, stat in wins:
            for c in resolve_group(group, target, cores):
                cols[f"{c}_roll{w}_{stat}"] = by_run[c].transform(_window, w, stat)
    out = pd.DataFrame(cols, index=df.index)
    valid = (by_run.cumcount() >= spec.history).to_numpy()
    return out, valid
