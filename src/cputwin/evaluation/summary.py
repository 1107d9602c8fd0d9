"""What an evaluation or a fit returns, as typed objects.

The library hands these to its callers; only the edge (the CLI's `--json`, a twin's
metadata) turns them into plain JSON objects with `to_dict()`. A field left `None` is
absent from that object (`notes` exists only for the seed protocol, `per_host` only for
data with hosts), so each JSON shape keeps exactly the keys it always had.

    ProtocolSummary      one protocol on one target (`evaluate`, `demo`)
    TargetsSummary       every core of the data (`evaluate --target all`)
    ComparisonSummary    the seed and the honest protocol side by side (`--protocol both`)
    PerHost              one result per host, the failed hosts, the fleet's spread
    TrainResult          a fitted, saved twin (`train`)
    PredictResult        a twin's predictions written (`predict`)
    WatchSummary         a live watch that ended (`watch`)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any


def _plain(value: Any) -> Any:
    """`value` as JSON-ready data: typed objects become dicts, tuples become lists."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class Rendered:
    """A dataclass rendered as a JSON object: its fields in order, None fields left out."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(v) for f in fields(self)  # type: ignore[arg-type]
                if (v := getattr(self, f.name)) is not None}


@dataclass(frozen=True)
class Headline(Rendered):
    """R², MAE and RMSE (percentage points) of one prediction; NaN where undefined."""

    r2: float
    mae: float
    rmse: float


@dataclass(frozen=True)
class Scores(Headline):
    """A `Headline` over `n` scored rows."""

    n: int


@dataclass
class GroupScores(Rendered):
    """Each model's R², MAE and RMSE over one group's rows (a workload, a host).

    A model scored on its own rows (the seed protocol's bases) may have no rows in a
    group: it is then absent from the group, and `score` gives NaN for it."""

    r2: dict[str, float]
    mae: dict[str, float]
    rmse: dict[str, float]
    rows: int

    def score(self, metric: str, model: str) -> float:
        return getattr(self, metric).get(model, math.nan)


@dataclass(frozen=True)
class Rows(Rendered):
    """How many rows trained the twin and how many scored it."""

    train: int
    test: int


@dataclass
class ScoreTable(Rendered):
    """Each model's scores over all the test rows, and per workload."""

    r2: dict[str, float]
    mae: dict[str, float]
    rmse: dict[str, float]
    per_workload: dict[str, GroupScores]


@dataclass
class MetaSummary(Rendered):
    """The meta-model: its kind, its global weights per base and intercept; a per-workload
    meta-model's weights, and the out-of-fold error of each candidate it chose among."""

    kind: str
    weights: dict[str, float]
    intercept: float
    per_workload: dict[str, dict[str, float]] | None = None
    out_of_fold_sse: dict[str, float] | None = None


@dataclass(kw_only=True)
class ProtocolSummary(Rendered):
    """One protocol's result on one target: every model's scores (the bases, their
    average, the stack, the per-workload-mean baseline), overall, per workload and (data
    with several hosts) per host, and the meta-model."""

    protocol: str
    target: str
    mode: str
    bases: list[str]
    rows: Rows
    r2: dict[str, float]
    mae: dict[str, float]
    rmse: dict[str, float]
    per_workload: dict[str, GroupScores]
    per_host: dict[str, GroupScores] | None = None
    meta: MetaSummary
    verdict: str
    notes: str | None = None
    train_fraction: float | None = None
    training_seconds: float | None = None
    machines: dict[str, int] | None = None
    timing: dict[str, Any] | None = None

    def headline(self, model: str = "stack") -> Headline:
        return Headline(self.r2[model], self.mae[model], self.rmse[model])


@dataclass(kw_only=True)
class TargetsSummary(Rendered):
    """One `ProtocolSummary` per core, and the stack's mean scores over the cores."""

    targets: dict[str, ProtocolSummary]
    mean: Headline

    def headline(self) -> Headline:
        return self.mean


@dataclass(kw_only=True)
class ComparisonSummary(Rendered):
    """The seed protocol and the honest one on the same data, the seed's measured leaks
    (`audit`), and what the two set side by side (`compares`)."""

    seed: ProtocolSummary
    honest: ProtocolSummary
    audit: dict[str, Any]
    compares: str

    def headline(self) -> Headline:
        return self.honest.headline()


Summary = ProtocolSummary | TargetsSummary | ComparisonSummary


@dataclass(frozen=True)
class Spread(Rendered):
    """The median, mean, smallest and largest of the hosts' R² (NaN with no host)."""

    median: float
    mean: float
    min: float
    max: float


@dataclass(frozen=True)
class HostR2(Rendered):
    """One of the worst hosts, with its stack's R²."""

    host: str
    r2: float


@dataclass(kw_only=True)
class FleetScores(Rendered):
    """How the stack's R² spreads over the hosts that were evaluated."""

    hosts: int
    failed: int
    r2: Spread
    worst: list[HostR2]
    per_host: dict[str, Headline]


@dataclass(kw_only=True)
class DetectorSummary(Rendered):
    """One core's detector: its alarm threshold, the smallest sustained extra load that
    alarms within `window_s` (2 s, or the fewest samples an alarm takes where samples are
    further apart) per workload (`power`), where it is nearly blind and why."""

    threshold: float
    window_s: float
    power: dict[str, float]
    blind: dict[str, float]
    unexplained: dict[str, Any]


@dataclass(kw_only=True)
class OutOfFold(Rendered):
    """Each base's and the stack's scores on the out-of-fold rows; a machine twin's
    stack per core too. Rendered flat: {base: scores, "stack": scores, "per_core": …}."""

    models: dict[str, Scores]
    per_core: dict[str, Scores] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = _plain(self.models)
        if self.per_core is not None:
            out["per_core"] = _plain(self.per_core)
        return out


@dataclass(kw_only=True)
class TrainResult(Rendered):
    """A twin fitted and saved: where, on what, its out-of-fold scores, its detectors."""

    twin: str
    target: str
    mode: str
    rows: int
    hosts: list[str] | None = None
    out_of_fold: OutOfFold
    detector: dict[str, DetectorSummary]
    timing: dict[str, Any]
    meta: MetaSummary


@dataclass(kw_only=True)
class PredictResult(Rendered):
    """Predictions written: where, for which core (a machine twin: `cores`), how many rows
    had the history, and the scores per core against the measured one where at least two
    rows did. A twin of one core renders its one core's scores as `scores` itself."""

    predictions: str
    target: str
    cores: list[str] | None = None
    mode: str
    rows: int
    predicted: int
    scores: dict[str, Scores] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.cores is None and self.scores is not None:
            out["scores"] = self.scores[self.target].to_dict()
        return out


@dataclass(kw_only=True)
class PerHost(Rendered):
    """One result per host that finished, the reason for each host that failed, and
    (`evaluate`) the fleet's spread."""

    hosts: dict[str, Any]
    failed: dict[str, str]
    fleet: FleetScores | None = None


@dataclass
class WatchSummary(Rendered):
    """A watch that ended: ticks seen, alarms raised (per core), where it was recorded
    (null in the JSON when it was not) and whether Ctrl-C or SIGTERM stopped it."""

    ticks: int = 0
    alarms: int = 0
    alarms_by_core: dict[str, int] = field(default_factory=dict)
    record: str | None = None
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def count(self, core: str) -> None:
        self.alarms += 1
        self.alarms_by_core[core] = self.alarms_by_core.get(core, 0) + 1
