"""A twin's input contract: what it may be given, checked in one place.

At fit a twin records what its input must be: the core count, the watched core(s), the
mode, the workloads and hosts it saw, whether samples must carry the workload's own CPU
use, whether it moves between machines, and its sample interval. Batch prediction, the
online twin, `watch` and `serve` check their input here and nowhere else; a breach is a
`ContractError`, whose message says what is wrong with the data, not which flag to use.

Before a contract exists (at fit) the data is checked by the same rules: the target is a
core of the data (`Schema.check_target`, where the schema lives) and a feature set that
reads the workload's own CPU use is given data that has it (`require_workload_cpu`, called
by the feature engine). The module sits beside `errors` so that every layer can use it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cputwin.errors import ContractError
from cputwin.telemetry.schema import WORKLOAD_CPU, Schema

__all__ = ["ContractError", "InputContract", "require_workload_cpu"]


def require_workload_cpu(available: bool, reader: str) -> None:
    """At fit, before any contract: `reader` (a feature set) reads the workload's own CPU
    use, so the data must have some."""
    if not available:
        raise ContractError(
            f"{reader} reads {WORKLOAD_CPU!r} (the labelled workload's own CPU use, recorded "
            "by `cputwin collect`), which this data does not have; the seed's data has none")


@dataclass(frozen=True)
class InputContract:
    n_cores: int
    targets: tuple[str, ...]
    mode: str
    workloads: tuple[str, ...]
    hosts: tuple[str, ...]
    reads_workload_cpu: bool
    portable: bool
    step_s: float | None

    @classmethod
    def of(cls, stack: Any) -> InputContract:
        """The contract of a fitted `TwinStack`."""
        return cls(n_cores=stack.schema_.n_cores, targets=tuple(stack.targets_),
                   mode=stack.mode, workloads=tuple(stack.workloads_),
                   hosts=tuple(stack.hosts_),
                   reads_workload_cpu=any(b.features.reads_workload_cpu
                                          for b in stack.base_specs_),
                   portable=all(b.features.portable for b in stack.base_specs_),
                   step_s=stack.step_s_)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets),
                "workloads": list(self.workloads), "hosts": list(self.hosts)}

    def core_columns(self, n_cores: int | None = None) -> list[str]:
        return Schema(n_cores=n_cores or self.n_cores).core_columns

    def check_core_count(self, n_cores: int, what: str = "the data") -> None:
        """`what` (the data, this machine, the stream) has cores this twin can read."""
        if n_cores != self.n_cores and not self.portable:
            raise ContractError(
                f"this twin was trained on {self.n_cores} cores, {what} has {n_cores} (only a "
                "twin of portable bases moves between machines)")

    def check_workload_cpu_source(self, available: bool, what: str) -> None:
        """A twin that reads the workload's own CPU use is given a source of it."""
        if self.reads_workload_cpu and not available:
            raise ContractError(f"this twin reads the workload's own CPU use ({WORKLOAD_CPU}); "
                                f"{what}")

    def sample_cores(self, values: dict[str, Any], index: int, n_cores: int | None = None
                     ) -> np.ndarray:
        """One sample's per-core utilisation from its fields, checked as ingest checks a
        run (the core columns, numbers in [0, 100])."""
        cores = self.core_columns(n_cores)
        unknown = [k for k in values if k.startswith("cpu_util_core_") and k not in cores]
        if unknown:
            raise ContractError(f"core count does not match the twin ({len(cores)} cores): "
                                f"unexpected {unknown[0]}")
        out = np.empty(len(cores))
        for j, column in enumerate(cores):
            if column not in values:
                raise ContractError(f"sample {index}: missing column {column!r}")
            v = values[column]
            if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
                raise ContractError(f"sample {index}: {column} must be a number")
            if not 0 <= v <= 100:
                raise ContractError(f"sample {index}: {column} = {v} is outside [0, 100]")
            out[j] = v
        return out

    def check_sample_workload_cpu(self, value: float | None, given: bool, index: int,
                                  n_cores: int | None = None) -> None:
        """The workload's CPU use is at most every core busy, and given where the twin
        reads it (None, a reading that failed, is a missing value to the models; a field
        left out is an error: a client that never sends it would get wrong answers)."""
        n = n_cores or self.n_cores
        if self.reads_workload_cpu and not given:
            raise ContractError(f"sample {index}: missing {WORKLOAD_CPU!r}, the workload's own "
                                "CPU use, which this twin reads")
        if value is not None and value > 100 * n:
            raise ContractError(f"sample {index}: {WORKLOAD_CPU} = {value} is above "
                                f"{100 * n} ({n} cores fully busy)")
