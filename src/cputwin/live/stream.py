"""Tick-by-tick prediction with a fitted `TwinStack`.

`OnlineTwin` compiles each base's feature spec once; each `TwinStream` (one per run or
live source) keeps its own ring buffers, so a new sample costs O(features) and the
predictions equal the batch path's on every row (a test replays recorded runs to 1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from cputwin.errors import DataError
from cputwin.features.engine import compile_spec, workload_cpu_column
from cputwin.features.online import OnlineFeatures, derive_sample
from cputwin.live.detector import Detector
from cputwin.models import TwinStack
from cputwin.telemetry.schema import HOST, OVERALL, RUN_COLUMN, WORKLOAD, Schema


@dataclass
class CoreTick:
    """One watched core's outcome for one sample."""

    target: str
    prediction: float
    residual: float | None = None
    score: float | None = None
    alarm: bool = False
    event: str | None = None
    blind: bool = False  # the core too busy for extra load to alarm (`Detector.blind_at`)


@dataclass
class Tick:
    """One sample's outcome: the twin's value (None until history is complete), the bases',
    and with a detector: residual (observed − twin), score, alarm state, raise/clear event,
    and whether the detector is blind this tick (the twin expects the core too busy for a
    hidden process to show).

    The top-level fields are the first watched core's; `cores` holds every watched core
    (one for a twin of one core, all of them for a machine twin), empty until history."""

    prediction: float | None
    bases: dict[str, float] | None
    residual: float | None = None
    score: float | None = None
    alarm: bool = False
    event: str | None = None
    cores: list[CoreTick] = field(default_factory=list)
    blind: bool = False


class OnlineTwin:
    """A fitted stack, ready to open streams.

    A twin of one core watches that core; a machine twin (`TwinStack(target="all")`)
    watches every core of the stream. detector: one `Detector` (a twin of one core) or
    one per watched core, by core column.
    compiled_trees: score LightGBM bases with the compiled kernel (`models/forest.py`), or
    with LightGBM's own single-row path; it sets up the stack's bases, so it holds for
    every OnlineTwin of that stack. source: what the samples come from, as the contract's
    errors name it.
    """

    def __init__(self, stack: TwinStack, n_cores: int | None = None,
                 detector: Detector | dict[str, Detector] | None = None,
                 compiled_trees: bool = True, source: str = "the stream") -> None:
        stack._check_fitted()
        self.stack = stack
        self.schema = Schema(n_cores=n_cores or stack.schema_.n_cores)
        self.contract = stack.contract_
        self.contract.check_core_count(self.schema.n_cores, source)
        cores = self.schema.core_columns
        self.targets = cores if stack.machine_ else [stack.target]  # the watched cores
        self.detectors = _per_target(detector, self.targets)
        self.detector = self.detectors[self.targets[0]] if self.detectors else None
        # bases reading the same feature spec (two seeds of one model) share its state:
        # each distinct spec is computed once per tick, for every watched core at once
        specs = []
        self.spec_of_base = []
        for base in stack.base_specs_:
            if base.features not in specs:
                specs.append(base.features)
            self.spec_of_base.append(specs.index(base.features))
        self.compiled = [[compile_spec(spec, t, cores, stack.workloads_, stack.hosts_)
                          for t in self.targets] for spec in specs]
        self.names = [b.name for b in stack.base_specs_]
        # whether samples must carry the workload's own CPU use (workload_cpu_percent)
        self.reads_workload_cpu = self.contract.reads_workload_cpu
        for base in stack.bases_:
            base.prepare_online(compiled_trees)

    def stream(self, host: str = "") -> TwinStream:
        """A new run's state; `host` matters to a twin fitted with host categories."""
        return TwinStream(self, host)


def _per_target(detector: Detector | dict[str, Detector] | None,
                targets: list[str]) -> dict[str, Detector]:
    if detector is None:
        return {}
    if isinstance(detector, Detector):
        if len(targets) > 1:
            raise DataError("a machine twin needs one detector per core")
        return {targets[0]: detector}
    missing = [t for t in targets if t not in detector]
    if missing:
        raise DataError(f"no detector for {', '.join(missing)}")
    return {t: detector[t] for t in targets}


class TwinStream:
    """The online state of one run."""

    def __init__(self, twin: OnlineTwin, host: str = "") -> None:
        self.twin = twin
        self.host = host
        self.restart()
        self.needs_derived = any(f.derived for f in self.features)  # computed once per tick
        self.others = self.features[0].others
        self.target_index = [twin.schema.core_columns.index(t) for t in twin.targets]
        self.meta = twin.stack.meta_
        self.watch = [twin.detectors[t].stream() for t in twin.targets] if twin.detectors else None

    def restart(self) -> None:
        """A fresh history (also after a gap longer than it: its lags would be of another
        time); the detectors keep their state, so an alarm up before the gap stays up."""
        self.features = [OnlineFeatures(c) for c in self.twin.compiled]

    def update(self, cores: np.ndarray, overall: float, workload: str,
               workload_cpu: float | None = None) -> Tick:
        """Push one sample: all cores' utilisation (a watched core's own is not read for its
        prediction), the overall utilisation, the workload label and, for a twin that reads
        it, the workload's own CPU use (None: not measured this tick, a missing value to
        the models)."""
        own = float("nan") if workload_cpu is None else float(workload_cpu)
        derived = (derive_sample(cores, overall, self.others,
                                 own if self.twin.reads_workload_cpu else None)
                   if self.needs_derived else None)
        rows = [f.update(cores, overall, workload, self.host, derived, own)
                for f in self.features]
        if any(r is None for r in rows):
            return Tick(None, None)
        bases, spec_of_base = self.twin.stack.bases_, self.twin.spec_of_base
        if len(self.twin.targets) == 1:
            preds = [base.predict_one(rows[j][0])
                     for base, j in zip(bases, spec_of_base, strict=True)]
            values = [self.meta.predict_one(preds, workload)]
        else:  # every core at once: one call per base, one for the meta-model
            matrix = np.column_stack([base.predict_rows(rows[j])
                                      for base, j in zip(bases, spec_of_base, strict=True)])
            values = self.meta.predict_rows(matrix, workload).tolist()
            preds = matrix[0].tolist()
        per_core = []
        for t, target in enumerate(self.twin.targets):
            core = CoreTick(target, values[t])
            if self.watch is not None:
                core.residual = float(cores[self.target_index[t]]) - values[t]
                verdict = self.watch[t].update(core.residual, workload, values[t])
                core.score, core.alarm, core.event = verdict.score, verdict.alarm, verdict.event
                core.blind = verdict.blind
            per_core.append(core)
        first = per_core[0]
        return Tick(first.prediction, dict(zip(self.twin.names, preds, strict=True)),
                    first.residual, first.score, first.alarm, first.event, per_core,
                    first.blind)


def replay(stack: TwinStack, frame: pl.DataFrame) -> np.ndarray:
    """Feed every run of `frame` through its own stream, sample by sample; NaN until history.

    One value per row for a twin of one core; a row of every core's value for a machine
    twin."""
    twin = OnlineTwin(stack, n_cores=len([c for c in frame.columns
                                          if c.startswith("cpu_util_core_")]))
    cores = frame.select(twin.schema.core_columns).to_numpy()
    overall = frame[OVERALL].to_numpy()
    workloads = frame[WORKLOAD].to_list()
    runs = frame[RUN_COLUMN].to_list()
    hosts = frame[HOST].to_list() if HOST in frame.columns else [""] * frame.height
    own = (workload_cpu_column(frame, "this twin").to_numpy() if twin.reads_workload_cpu
           else np.full(frame.height, np.nan))
    out = np.full((frame.height, len(twin.targets)), np.nan)
    stream, current = None, None
    for i in range(frame.height):
        if runs[i] != current:
            stream, current = twin.stream(hosts[i]), runs[i]
        tick = stream.update(cores[i], overall[i], workloads[i], own[i])
        if tick.prediction is not None:
            out[i] = [core.prediction for core in tick.cores]
    return out if stack.machine_ else out[:, 0]
