"""Feature specs are plain data: which column groups, which lags, which windows.

A spec never names a concrete core: it names *groups* that are resolved against
the target and the machine's core count when compiled, so one spec serves any
target core on any machine. Feature names are derived from the spec and become the
model's input schema.

Groups (those marked * carry the target's own signal, see `TARGET_CARRYING`):
    overall*       cpu_util_overall, which averages every core, the target included
    physics*       N × overall − Σ other cores: the overall load's estimate of the target
                   (as is, and clipped to [0, 100])
    other_cores    every cpu_util_core_<i> except the target (one column per core)
    others_stats   mean, std, min, max of the other cores (independent of core count)
    others_sorted  the other cores' values in descending order (rank 1 = busiest): the same
                   meaning whichever core is the target, so one model can learn from all
    workload_cpu   the labelled workload's own CPU use (workload_cpu_percent, recorded by the
                   collector) and its share the other cores cannot hold,
                   clip(workload CPU − Σ other cores, 0, 100): the workload on the target.
                   A hidden process is not in it, so an anomaly twin may read it

Modes: a `sensor` twin stands in for a missing sensor and may read anything measured
except the target core; an `independent` twin (for anomaly detection) may not read
anything that contains the target, so its specs drop the target-carrying groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from cputwin.errors import FeatureError

GROUPS = ("overall", "physics", "other_cores", "others_stats", "others_sorted", "workload_cpu")
TARGET_CARRYING = frozenset({"overall", "physics"})
PORTABLE_GROUPS = frozenset({"overall", "physics", "others_stats", "workload_cpu"})
POOLABLE_GROUPS = PORTABLE_GROUPS | {"others_sorted"}
WINDOW_STATS = ("mean", "std")
MODES = ("sensor", "independent")


@dataclass(frozen=True)
class FeatureSpec:
    """A declared feature set.

    current: groups used as measured at time t.
    lags: group -> lags (in samples) of that group.
    windows: group -> list of (window length, statistic); statistic in WINDOW_STATS
        (std is the sample std, ddof=1, as pandas computes it).
    workload: one-hot workload columns (categories fixed at training).
    host: one-hot host columns (categories fixed at training): one twin over many hosts
        of one kind, each host its own category.
    min_history: rows dropped at the start of every run even if the features need
        fewer (the seed dropped rows for windows it computed but never used).
    """

    name: str
    current: tuple[str, ...] = ("overall", "other_cores")
    lags: dict[str, tuple[int, ...]] = field(default_factory=dict)
    windows: dict[str, tuple[tuple[int, str], ...]] = field(default_factory=dict)
    workload: bool = True
    min_history: int = 0
    host: bool = False

    def __post_init__(self) -> None:
        for group in [*self.current, *self.lags, *self.windows]:
            if group not in GROUPS:
                raise FeatureError(f"spec {self.name!r}: unknown group {group!r}; known: {GROUPS}")
        for group, lags in self.lags.items():
            if any(int(k) < 1 for k in lags):
                raise FeatureError(f"spec {self.name!r}: lags of {group!r} must be >= 1")
        for group, wins in self.windows.items():
            for w, stat in wins:
                if int(w) < 2 or stat not in WINDOW_STATS:
                    raise FeatureError(
                        f"spec {self.name!r}: window ({w}, {stat!r}) of {group!r} must have "
                        f"length >= 2 and a statistic in {WINDOW_STATS}"
                    )

    @property
    def history(self) -> int:
        """Samples of a run's past a row needs before its features exist."""
        need = [self.min_history]
        need += [max(lags) for lags in self.lags.values() if lags]
        need += [w - 1 for wins in self.windows.values() for w, _ in wins]
        return max(need)

    @property
    def groups(self) -> set[str]:
        return {*self.current, *self.lags, *self.windows}

    @property
    def reads_workload_cpu(self) -> bool:
        """True when the spec needs the workload_cpu_percent column (the seed has none)."""
        return "workload_cpu" in self.groups

    @property
    def portable(self) -> bool:
        """True when the columns do not depend on the machine's core count."""
        return self.groups <= PORTABLE_GROUPS

    @property
    def poolable(self) -> bool:
        """True when a column means the same whichever core is the target."""
        return self.groups <= POOLABLE_GROUPS

    def for_mode(self, mode: str) -> FeatureSpec:
        """The spec as a twin of this mode may use it (independent: no target-carrying group).

        `mode` is one of MODES: the twin checks it among its parameters before it asks."""
        if mode == "sensor":
            return self
        keep = [g for g in GROUPS if g not in TARGET_CARRYING]
        return replace(
            self,
            current=tuple(g for g in self.current if g in keep),
            lags={g: v for g, v in self.lags.items() if g in keep},
            windows={g: v for g, v in self.windows.items() if g in keep},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "current": list(self.current),
            "lags": {g: list(v) for g, v in self.lags.items()},
            "windows": {g: [[w, s] for w, s in v] for g, v in self.windows.items()},
            "workload": self.workload,
            "min_history": self.min_history,
            "host": self.host,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        try:
            return cls(
                name=str(data["name"]),
                current=tuple(data["current"]),
                lags={g: tuple(int(k) for k in v) for g, v in data["lags"].items()},
                windows={
                    g: tuple((int(w), str(s)) for w, s in v) for g, v in data["windows"].items()
                },
                workload=bool(data["workload"]),
                min_history=int(data["min_history"]),
                host=bool(data.get("host", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FeatureError(f"malformed feature spec: {exc}") from None


# The seed's two sets, as the models actually saw them (docs/seed-notebook.md): the overall load and
# the other cores now, the other cores' lags, the workload. The seed also computed overall
# lags and rolling statistics but never fed them to the model; only the rows it dropped
# for them survive, as min_history.
V2_0 = FeatureSpec(name="v2.0", lags={"other_cores": (1, 2, 3, 4, 5)}, min_history=9)
V2_3 = FeatureSpec(name="v2.3", lags={"other_cores": tuple(range(1, 11))}, min_history=29)

# The physics estimate with its short history: what a linear model can use well.
PHYSICS = FeatureSpec(
    name="physics",
    current=("physics", "others_stats"),
    lags={"physics": (1, 2, 3, 4, 5), "others_stats": (1, 2)},
    windows={"physics": ((3, "mean"), (5, "mean"), (10, "mean"))},
)

# Everything measured honestly, for gradient boosting.
RICH = FeatureSpec(
    name="rich",
    current=("overall", "physics", "other_cores", "others_stats"),
    lags={"overall": (1, 2, 3, 4, 5), "physics": (1, 2, 3, 4, 5),
          "other_cores": (1, 2, 3), "others_stats": (1, 2, 3, 4, 5)},
    windows={"overall": ((3, "mean"), (5, "mean"), (10, "mean"), (30, "mean")),
             "physics": ((3, "mean"), (5, "mean"), (10, "mean"), (30, "mean"),
                         (5, "std"), (10, "std")),
             "others_stats": ((5, "mean"), (10, "mean"), (30, "mean"))},
)

# RICH without per-core columns: the same columns on a machine of any core count.
PORTABLE = FeatureSpec(
    name="portable",
    current=("overall", "physics", "others_stats"),
    lags={"overall": (1, 2, 3, 4, 5), "physics": (1, 2, 3, 4, 5), "others_stats": (1, 2, 3, 4, 5)},
    windows=RICH.windows,
)

# PORTABLE plus the other cores by rank: for a model pooled over every core of one machine.
POOLED = FeatureSpec(
    name="pooled",
    current=("overall", "physics", "others_stats", "others_sorted"),
    lags={**PORTABLE.lags, "others_sorted": (1, 2)},
    windows=RICH.windows,
)

# POOLED plus the workload's own CPU use: where the expected load is, for anomaly twins.
# Per tick the reading is coarse (the kernel counts CPU time in 10 ms steps: ±10 points at
# 10 Hz), hence its short windows.
POOLED_WCPU = FeatureSpec(
    name="pooled_wcpu",
    current=(*POOLED.current, "workload_cpu"),
    lags={**POOLED.lags, "workload_cpu": (1, 2, 3)},
    windows={**RICH.windows, "workload_cpu": ((3, "mean"), (5, "mean"), (10, "mean"))},
)

BUILTIN_SPECS: dict[str, FeatureSpec] = {
    s.name: s for s in (V2_0, V2_3, PHYSICS, RICH, PORTABLE, POOLED, POOLED_WCPU)
}


def get_spec(name: str) -> FeatureSpec:
    try:
        return BUILTIN_SPECS[name]
    except KeyError:
        raise FeatureError(
            f"unknown feature set {name!r}; built in: {', '.join(BUILTIN_SPECS)}"
        ) from None
