"""Scoring for bench/anomaly.py: the baselines, their calibration, recall, delay and PR-AUC.

Every detector, cputwin's and the baselines', ends as one thing: per run, per tick and per
core, a score relative to its calibrated threshold (`Scored.rel`, 1 = the threshold). The
same alarm logic (cputwin's `Hysteresis`: raise after `raise_ticks` ticks above, clear
after `clear_ticks` below) then turns every detector's scores into alarms, so they differ
only in what they score. A baseline's raw score is smoothed as cputwin smooths its own (a
median of the last `window` ticks, or an EWMA for older twins) and its threshold set by
cputwin's own rule (`threshold_for_rate`: the level an exponential
tail of the training scores' peaks puts at the rate), so all meet the same rate alike.

Baselines (each fitted on the training runs only):
    static          a per-core threshold per workload on the core's utilisation
    netdata_kmeans  Netdata's: k-means (k=2) on the core's smoothed first differences with
                    5 lags; raw score = distance to the nearest centroid / the 99th
                    percentile of training distances
    halfspacetrees  river's HalfSpaceTrees over all cores (one machine-wide score, given
                    to every core)
    pca             PCA over all cores (standardised); raw score of a core = its squared
                    reconstruction error
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from cputwin.live.detector import Detector, Hysteresis, sustained
from cputwin.live.detector import threshold_for_rate as detector_threshold

KINDS = ("full", "half", "quarter", "short", "any_core")
DETECTORS = ("cputwin", "static", "netdata_kmeans", "halfspacetrees", "pca")
GRACE_S = 2.0  # an alarm up to this long after an injection ends still counts for it
GLOBAL = "*"


@dataclass(frozen=True)
class Event:
    """One hidden load: its kind, the core it ran on, its wall-clock start and end."""

    kind: str
    core: int
    start: float
    end: float


@dataclass
class Run:
    """One recorded run as the baselines read it."""

    name: str
    workload: str
    stamps: np.ndarray  # (n,) wall-clock seconds
    cores: np.ndarray  # (n, cores) utilisation, percent


@dataclass
class Scored:
    """One detector's view of one run: per tick and core, the smoothed score over the
    calibrated threshold (NaN where the detector has no score yet)."""

    stamps: np.ndarray
    rel: np.ndarray  # (n, cores)
    blind: np.ndarray | None = None  # (n, cores): cputwin's own word that it cannot see


@dataclass(frozen=True)
class Alarm:
    """Smoothing, hysteresis and false-alarm rate, shared by every detector."""

    alpha: float = 0.3
    raise_ticks: int = 5
    clear_ticks: int = 10
    clear_level: float = 1.0
    rate_per_hour: float = 1.0
    smoother: str = "ewma"  # or "median" (of the last `window` ticks), as cputwin's detector
    window: int = 5

    @classmethod
    def of(cls, detector: Detector) -> Alarm:
        """A calibrated cputwin detector's smoothing, hysteresis and rate, for every
        baseline (its durations turned into ticks at the recording's rate)."""
        settings = detector.settings
        return cls(detector.alpha, detector.raise_ticks, detector.clear_ticks,
                   settings.clear_level, settings.false_alarms_per_hour, settings.smoother,
                   detector.window_ticks)


# ------------------------------------------------------------------ thresholds


def ewma(x: np.ndarray, alpha: float) -> np.ndarray:
    """Column-wise EWMA as cputwin's detector smooths (starting at the first value); a
    NaN leaves the state as it was and stays NaN in the output."""
    x = np.asarray(x, float)
    out = np.full_like(x, np.nan)
    state = np.full(x.shape[1:], np.nan)
    for i, row in enumerate(x):
        state = np.where(np.isnan(state), row, np.where(np.isnan(row), state,
                                                        alpha * row + (1 - alpha) * state))
        out[i] = np.where(np.isnan(row), np.nan, state)
    return out


def rolling_median(x: np.ndarray, window: int) -> np.ndarray:
    """Column-wise median of the last `window` values (fewer at the start), NaN skipped, as
    cputwin's detector smooths; NaN where the value is NaN."""
    x = np.asarray(x, float)
    out = np.full_like(x, np.nan)
    for i in range(x.shape[0]):
        block = x[max(0, i - window + 1):i + 1]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out[i] = np.where(np.isnan(x[i]), np.nan, np.nanmedian(block, axis=0))
    return out


def smooth(x: np.ndarray, alarm: Alarm) -> np.ndarray:
    """A baseline's raw scores smoothed as cputwin smooths its own (`alarm.smoother`)."""
    return rolling_median(x, alarm.window) if alarm.smoother == "median" else ewma(x, alarm.alpha)


def threshold_for_rate(series: list[np.ndarray], rate_hz: float, alarm: Alarm) -> float:
    """The threshold on smoothed scores (one series per training run, NaN dropped) at
    which `alarm`'s hysteresis raises `alarm.rate_per_hour`: cputwin's own rule
    (`cputwin.live.detector.threshold_for_rate`)."""
    parts = [p for p in (s[~np.isnan(s)] for s in series) if p.size]
    if not parts:
        return float("inf")
    scores = np.concatenate(parts)
    starts = np.zeros(scores.size, bool)
    starts[np.cumsum([0, *[p.size for p in parts[:-1]]])] = True
    threshold, _ = detector_threshold(scores, starts, scores.size / rate_hz / 3600,
                                      alarm.rate_per_hour, alarm.raise_ticks,
                                      alarm.clear_ticks, alarm.clear_level)
    return threshold


def raises(rel: np.ndarray, alarm: Alarm) -> np.ndarray:
    """Indices at which the hysteresis raises an alarm on one core's relative scores."""
    logic = Hysteresis(1.0, alarm.raise_ticks, alarm.clear_ticks, alarm.clear_level)
    return np.array([i for i, s in enumerate(rel) if logic.step(s) == "raise"], int)


# ------------------------------------------------------------------ baselines


class Baseline:
    """A raw per-tick, per-core score fitted on training runs; `Calibrated` smooths it and
    sets its thresholds. `group` splits thresholds (static: per workload)."""

    name = ""

    def fit(self, runs: list[Run]) -> Baseline:
        return self

    def raw(self, run: Run) -> np.ndarray:
        raise NotImplementedError

    def group(self, run: Run) -> str:
        return GLOBAL


class StaticThreshold(Baseline):
    """What a plain alert rule does: the core's utilisation against a level per workload."""

    name = "static"

    def raw(self, run: Run) -> np.ndarray:
        return run.cores.astype(float)

    def group(self, run: Run) -> str:
        return run.workload


def netdata_features(x: np.ndarray, smooth: int = 3, lags: int = 5) -> np.ndarray:
    """Netdata's preprocessing of one metric: first difference, mean of the last `smooth`,
    and the `lags` earlier values beside the current one (NaN rows until complete)."""
    diff = np.r_[np.nan, np.diff(x.astype(float))]
    kernel = np.ones(smooth) / smooth
    smoothed = np.full(x.size, np.nan)
    if x.size >= smooth:
        smoothed[smooth - 1:] = np.convolve(diff, kernel, mode="valid")
    out = np.full((x.size, lags + 1), np.nan)
    for lag in range(lags + 1):
        out[lag:, lag] = smoothed[:x.size - lag]
    return out


class NetdataKMeans(Baseline):
    """Netdata's anomaly detection, one model per core: k-means (k=2) on the core's
    smoothed first differences with 5 lags; score = distance to the nearest centroid over
    the 99th percentile of the training distances (above 1: Netdata's anomaly bit)."""

    name = "netdata_kmeans"

    def __init__(self, seed: int = 0, smooth: int = 3, lags: int = 5, k: int = 2) -> None:
        self.seed, self.smooth, self.lags, self.k = seed, smooth, lags, k

    def _features(self, run: Run, core: int) -> np.ndarray:
        return netdata_features(run.cores[:, core], self.smooth, self.lags)

    def fit(self, runs: list[Run]) -> NetdataKMeans:
        from sklearn.cluster import KMeans

        self.models_, self.p99_ = [], []
        for core in range(runs[0].cores.shape[1]):
            x = np.concatenate([self._features(r, core) for r in runs])
            x = x[~np.isnan(x).any(axis=1)]
            model = KMeans(n_clusters=self.k, n_init=10, random_state=self.seed).fit(x)
            self.models_.append(model)
            self.p99_.append(max(float(np.percentile(model.transform(x).min(axis=1), 99)), 1e-9))
        return self

    def raw(self, run: Run) -> np.ndarray:
        out = np.full(run.cores.shape, np.nan)
        for core, (model, p99) in enumerate(zip(self.models_, self.p99_, strict=True)):
            x = self._features(run, core)
            ok = ~np.isnan(x).any(axis=1)
            if ok.any():
                out[ok, core] = model.transform(x[ok]).min(axis=1) / p99
        return out


class HalfSpaceTrees(Baseline):
    """river's HalfSpaceTrees over all cores' utilisation (scaled to [0, 1]). Its window is
    the whole training set, so the reference masses it scores with are all of training;
    it is frozen after training (no learning on the runs it scores)."""

    name = "halfspacetrees"

    def __init__(self, seed: int = 0, n_trees: int = 10, height: int = 8) -> None:  # river's
        self.seed, self.n_trees, self.height = seed, n_trees, height

    @staticmethod
    def _rows(run: Run) -> list[dict[str, float]]:
        x = np.clip(run.cores / 100.0, 0.0, 1.0)
        return [{f"core_{c}": float(v) for c, v in enumerate(row)} for row in x]

    def fit(self, runs: list[Run]) -> HalfSpaceTrees:
        from river.anomaly import HalfSpaceTrees as HST

        rows = [x for r in runs for x in self._rows(r)]
        self.model_ = HST(n_trees=self.n_trees, height=self.height, window_size=len(rows),
                          seed=self.seed)
        for x in rows:
            self.model_.learn_one(x)
        return self

    def raw(self, run: Run) -> np.ndarray:
        score = np.array([self.model_.score_one(x) for x in self._rows(run)], float)
        return np.repeat(score[:, None], run.cores.shape[1], axis=1)


class PCAError(Baseline):
    """PCA over all cores (standardised on training): a core's squared reconstruction
    error. Components: the fewest explaining 90 % of the variance, fewer than the cores."""

    name = "pca"

    def __init__(self, explained: float = 0.9) -> None:
        self.explained = explained

    def fit(self, runs: list[Run]) -> PCAError:
        from sklearn.decomposition import PCA

        x = np.concatenate([r.cores for r in runs]).astype(float)
        self.mean_ = x.mean(axis=0)
        self.std_ = np.maximum(x.std(axis=0), 1.0)  # one utilisation point at least
        z = (x - self.mean_) / self.std_
        n = z.shape[1]
        full = PCA().fit(z)
        wanted = int(np.searchsorted(np.cumsum(full.explained_variance_ratio_), self.explained)) + 1
        self.components_ = full.components_[:max(0, min(wanted, n - 1))]
        return self

    def raw(self, run: Run) -> np.ndarray:
        z = (run.cores - self.mean_) / self.std_
        back = z @ self.components_.T @ self.components_
        return (z - back) ** 2


def baselines(seed: int) -> list[Baseline]:
    return [StaticThreshold(), NetdataKMeans(seed), HalfSpaceTrees(seed), PCAError()]


@dataclass
class Calibrated:
    """A baseline with its smoothing and thresholds (per core and group, GLOBAL as the
    fallback for a group training did not have)."""

    baseline: Baseline
    alarm: Alarm
    rate_hz: float = 10.0
    floor: float = 1e-9  # thresholds at least this (a ratio needs a positive threshold)
    thresholds_: dict[tuple[int, str], float] = field(default_factory=dict)

    def fit(self, runs: list[Run]) -> Calibrated:
        self.baseline.fit(runs)
        smoothed = [smooth(self.baseline.raw(r), self.alarm) for r in runs]
        groups = [self.baseline.group(r) for r in runs]
        self.thresholds_ = {}
        for core in range(runs[0].cores.shape[1]):
            for g in {GLOBAL, *groups}:
                series = [s[:, core] for s, gr in zip(smoothed, groups, strict=True)
                          if g in (GLOBAL, gr)]
                t = threshold_for_rate(series, self.rate_hz, self.alarm)
                self.thresholds_[core, g] = max(t, self.floor)
        return self

    def score(self, run: Run) -> Scored:
        smoothed = smooth(self.baseline.raw(run), self.alarm)
        g = self.baseline.group(run)
        thresholds = np.array([self.thresholds_.get((c, g), self.thresholds_[c, GLOBAL])
                               for c in range(smoothed.shape[1])])
        return Scored(run.stamps, smoothed / thresholds)


# ------------------------------------------------------------------ evaluation


def detections(scored: list[Scored], events: list[Event], alarm: Alarm,
               grace: float = GRACE_S) -> list[float | None]:
    """Per event, the delay from its start to the first alarm raised on its core between
    its start and `grace` after its end (None: missed)."""
    raised: dict[int, list[float]] = {}
    for s in scored:
        for core in range(s.rel.shape[1]):
            raised.setdefault(core, []).extend(s.stamps[raises(s.rel[:, core], alarm)])
    out = []
    for e in events:
        hits = [t - e.start for t in raised.get(e.core, []) if e.start <= t <= e.end + grace]
        out.append(min(hits) if hits else None)
    return out


def blind_share(scored: list[Scored], e: Event) -> float | None:
    """The share of an event's ticks in which the detector said its core was blind (the
    twin expected the core too busy for the extra load that alarms); None: not stated."""
    for s in scored:
        inside = (s.stamps >= e.start) & (s.stamps <= e.end)
        if s.blind is not None and inside.any():
            return float(s.blind[inside, e.core].mean())
    return None


def with_headroom(delays: list[float | None], shares: list[float | None]) -> dict:
    """Recall over the events the detector did not call blind for most of their length,
    and how many it did (a load on a core already near 100 % leaves no trace to find)."""
    seen = [d for d, b in zip(delays, shares, strict=True) if b is not None and b < 0.5]
    return {"events": len(seen), "recall": (sum(d is not None for d in seen) / len(seen)
                                            if seen else None),
            "blind_events": sum(b is not None and b >= 0.5 for b in shares)}


def false_alarms(scored: list[Scored], alarm: Alarm) -> int:
    """Alarms raised on any core of these (normal) runs."""
    return sum(raises(s.rel[:, c], alarm).size for s in scored for c in range(s.rel.shape[1]))


def recall_and_delays(delays: list[float | None]) -> dict[str, float | None]:
    found = [d for d in delays if d is not None]
    return {"events": len(delays),
            "recall": len(found) / len(delays) if delays else None,
            "median_delay_s": float(np.median(found)) if found else None,
            "p95_delay_s": float(np.percentile(found, 95)) if found else None}


def _in_windows(stamps: np.ndarray, events: list[Event], grace: float) -> np.ndarray:
    mask = np.zeros(stamps.size, bool)
    for e in events:
        mask |= (stamps >= e.start) & (stamps <= e.end + grace)
    return mask


def event_pr_auc(scored: list[Scored], events: list[Event], kind_events: list[Event],
                 alarm: Alarm, grace: float = GRACE_S, max_thresholds: int = 400) -> float | None:
    """Threshold-free, event-wise precision–recall AUC (average precision) of the
    sustained score (the lowest of `raise_ticks` consecutive relative scores, what an alarm
    needs to exceed).

    At threshold t an event of `kind_events` is found if the sustained level on its core
    exceeds t inside its window (start to end + grace); each maximal above-t stretch on
    any core outside every window of `events` (all kinds: time inside any hidden load
    belongs to it, on every core, as the load displaces work onto the others) is a false
    positive, so a score that stays high before or after a load pays for it (a score
    always above t finds every event and pays one false positive per stretch between
    loads). Precision = found / (found + false positives).
    """
    if not kind_events:
        return None
    levels, masks = [], []
    for s in scored:
        starts = np.zeros(s.stamps.size, bool)
        starts[:1] = True
        window = _in_windows(s.stamps, events, grace)
        for core in range(s.rel.shape[1]):
            levels.append(np.r_[sustained(s.rel[:, core], starts, alarm.raise_ticks), np.nan])
            masks.append(np.r_[window, False])
    level = np.nan_to_num(np.concatenate(levels), nan=-np.inf)
    window = np.concatenate(masks)
    best = np.array([_event_peak(scored, e, alarm, grace) for e in kind_events])
    finite = level[np.isfinite(level)]
    grid = (np.quantile(finite, np.linspace(0, 1, max_thresholds)) if finite.size else [])
    thresholds = np.unique(np.r_[best[np.isfinite(best)], grid])[::-1]
    ap, last_recall = 0.0, 0.0
    for t in thresholds:
        found = int((best > t).sum())
        fp = _episodes((level > t) & ~window)
        recall = found / best.size
        precision = found / (found + fp) if found + fp else 1.0
        ap += (recall - last_recall) * precision
        last_recall = recall
    return float(ap)


def _event_peak(scored: list[Scored], e: Event, alarm: Alarm, grace: float) -> float:
    peak = -np.inf
    for s in scored:
        inside = (s.stamps >= e.start) & (s.stamps <= e.end + grace)
        if inside.any():
            starts = np.zeros(s.stamps.size, bool)
            starts[:1] = True
            lev = sustained(s.rel[:, e.core], starts, alarm.raise_ticks)[inside]
            if np.isfinite(lev).any():
                peak = max(peak, float(np.nanmax(lev)))
    return peak


def _episodes(above: np.ndarray) -> int:
    """Maximal runs of True."""
    return int((above & ~np.r_[False, above[:-1]]).sum())
