"""The telemetry schema shared by the collector, ingest, features and the twin artifact.

It is the seed's schema (docs/seed-notebook.md) generalised to any number of logical cores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

TIMESTAMP = "timestamp"
OVERALL = "cpu_util_overall"
WORKLOAD = "workload_type"
# The workload of runs that carry no `workload_type` (telemetry from Prometheus,
# node_exporter, Telegraf, CSV exports): all of them are one workload of this name.
UNLABELLED = "unlabelled"
RUN_COLUMN = "run"
HOST = "host"
CORE_PREFIX = "cpu_util_core_"
FREQ_COLUMNS = ("cpu_freq_current_mhz", "cpu_freq_min_mhz", "cpu_freq_max_mhz")
TEMP_COLUMN = "cpu_temp_celsius_avg"
# CPU use of the labelled workload's own processes since the last sample, in percent of one
# core (0 … 100 × cores, as `top` shows it): where the expected load is, so a twin can tell
# the workload moving onto a core from an unknown process on it. The seed has no such column.
WORKLOAD_CPU = "workload_cpu_percent"
OPTIONAL_COLUMNS = (*FREQ_COLUMNS, TEMP_COLUMN, WORKLOAD_CPU)

# Linux counts CPU time in 1/USER_HZ s: over a step of s seconds one core's utilisation
# moves in steps of 100 / (USER_HZ × s) points (10 at 10 Hz).
USER_HZ = 100

_CORE_RE = re.compile(r"^cpu_util_core_(\d+)$")


def core_column(index: int) -> str:
    return f"{CORE_PREFIX}{index}"


def reading_resolution(step_s: float) -> float:
    """Points of one core's utilisation that one clock tick is worth over a sample of
    `step_s` seconds (at most 100: a step shorter than a tick)."""
    return min(100.0, 100.0 / (USER_HZ * step_s)) if step_s > 0 else 100.0


def core_columns_in(columns: list[str] | tuple[str, ...]) -> list[str]:
    """The per-core utilisation columns present, ordered by core index."""
    found = [(int(m.group(1)), c) for c in columns if (m := _CORE_RE.match(c))]
    return [c for _, c in sorted(found)]


@dataclass(frozen=True)
class Schema:
    """What a twin needs to know about the machine its telemetry came from."""

    n_cores: int

    @property
    def core_columns(self) -> list[str]:
        return [core_column(i) for i in range(self.n_cores)]

    @property
    def utilisation_columns(self) -> list[str]:
        return [OVERALL, *self.core_columns]

    @property
    def required_columns(self) -> list[str]:
        """Columns every run must have (`workload_type` is optional: see UNLABELLED)."""
        return [TIMESTAMP, *self.utilisation_columns]

    def column_order(self) -> list[str]:
        """The on-disk column order the collector writes (the seed's order)."""
        return [TIMESTAMP, *self.utilisation_columns, *OPTIONAL_COLUMNS, WORKLOAD]

    def check_target(self, target: str) -> str:
        if target not in self.core_columns:
            raise_target(target, self.core_columns)
        return target


def raise_target(target: str, cores: list[str]) -> None:
    from cputwin.errors import ContractError

    raise ContractError(
        f"target {target!r} is not a core of this data: expected one of "
        f"{cores[0]} … {cores[-1]}"
    )


def factorize(labels: Any) -> tuple[list[str], np.ndarray]:
    """The distinct labels (in order of appearance) and each row's index among them.
    Polars hashes the strings where numpy's `unique` sorts Python objects: on a million
    workload labels 0.09 s against 0.66 s, and calibration and the meta-model's choice
    ask several times."""
    import polars as pl

    series = pl.Series(np.asarray(labels, dtype=object), dtype=pl.String)
    names = series.unique(maintain_order=True).to_list()
    return names, series.cast(pl.Enum(names)).to_physical().to_numpy().astype(np.intp)


EPOCH_UNITS = ((1e17, 1e9), (1e14, 1e6), (1e11, 1e3))  # (smallest value, units per second)


def to_seconds(stamps: np.ndarray) -> np.ndarray:
    """Epoch timestamps in ns, µs, ms or s, told apart by their size (seconds reach 1e11
    only in the year 5138), to float seconds."""
    biggest = float(np.abs(stamps).max()) if stamps.size else 0.0
    for limit, scale in EPOCH_UNITS:
        if biggest >= limit:
            return stamps / scale
    return stamps.astype(float)
