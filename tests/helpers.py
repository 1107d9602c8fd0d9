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
    return pl.DataFrame(data)


def write_run(frame: pl.DataFrame, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.parquet"
    frame.write_parquet(path)
    return path
