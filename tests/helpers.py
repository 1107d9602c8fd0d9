"""Builders of synthetic runs for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl


def synthetic_run(n: int = 200, cores: int = 4, workload: str = "cpu_bound", seed: int = 0,
                  t0: float = 1_700_000_000.0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    base = np.clip(np.cumsum(rng.normal(0, 5, n)) % 100, 0, 100)
    data = {"timestamp": t0 + np.arange(n) * 0.1}
    core_vals = [np.clip(base + rng.normal(0, 10, n), 0, 100) for _ in range(cores)]
    data["cpu_util_overall"] = np.mean(core_vals, axis=0)
    for i, v in enumerate(core_vals):
        data[f"cpu_util_core_{i}"] = v
    data["workload_type"] = [workload] * n
    # the workload's own CPU use: most of the load, coarse, now and then not measured
    # (drawn last, so the cores' values are those of earlier versions of this helper)
    own = np.clip(0.8 * np.sum(core_vals, axis=0) + rng.normal(0, 10, n), 0, 100 * cores)
    missing = rng.random(n) < 0.03
    data["workload_cpu_percent"] = [None if m else float(v) for v, m in zip(own, missing, strict=True)]
    return pl.DataFrame(data, schema_overrides={"workload_cpu_percent": pl.Float64})


def with_workload_cpu(frame: pl.DataFrame) -> pl.DataFrame:
    """A recorded frame (the seed's, the sample) given a workload CPU column, some missing."""
    cores = [c for c in frame.columns if c.startswith("cpu_util_core_")]
    own = (0.8 * pl.sum_horizontal(cores)).round(0)
    return frame.with_columns(
        pl.when(pl.int_range(pl.len()) % 37 == 5).then(None).otherwise(own)
        .alias("workload_cpu_percent"))


def write_run(frame: pl.DataFrame, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.parquet"
    frame.write_parquet(path)
    return path
