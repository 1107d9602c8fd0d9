"""Anomaly detection on the twin's residual (observed − twin).

Calibrated at training time from out-of-fold residuals (rows the base models never saw),
per workload where a workload has enough of them:

    z      = (residual − centre[w]) / scale[w]        robust centre and scale (median, MAD;
                                                      the scale floored at a reading's rounding)
    score  = median of z over the last `window_s`     a spike of a tick or two (a process
                                                      waking, a task migrating between cores
                                                      while the twin's lags catch up) moves
                                                      a median of 5 ticks not at all
    alarm  raised after `raise_s` seconds of score > `threshold`,
           cleared after `clear_s` seconds of score < `clear_level` × `threshold`

The durations become ticks at the data's rate (10 Hz: a window of 5 ticks, 3 to raise, 10
to clear; at a 1 s scrape, 1 tick to raise), so a twin of slow data is as quick as its
data allows. The window never holds fewer than `MIN_WINDOW_TICKS` samples: at a 1 s scrape
one sample is a whole second of a core, and normal operation's largest residuals (a
service's load leaning on one core for a moment) are single samples, while a hidden
process holds the core for several. Twins calibrated with an exponentially weighted score
(`smoother="ewma"`, time constant `smoothing_s`) keep it.

`threshold` is the level an exponential tail, fitted to the episode peaks of the
calibration's sustained scores, puts at `false_alarms_per_hour`
(`threshold_for_rate`). Minutes of calibration cannot show a once-an-hour level by
themselves, so it is extrapolated; the tail's scale comes from the median excess, which
a few stretches of load the labels do not explain (a cron job, another user) cannot
inflate. Such stretches are counted and reported (`unexplained`), not learnt as normal.
Once calibration covers an hour at the rate, the threshold is also at least the lowest
level the calibration itself shows to meet the rate. It is never below `noise_floor`: the
level one tick of Gaussian noise at the residual's scale crosses at the rate (4.0 robust
standard deviations at 10 Hz and once an hour). Minutes of calibration cannot vouch for a
lower one, and on fresh recordings lower ones raised false alarms.

A machine twin's cores share one threshold (`calibrate_pooled`): the median of the
thresholds each core's own calibration sets. Each is extrapolated from minutes and errs
either way; an alarm rate grows exponentially as a threshold falls, so the core whose
estimate came out low would raise most of the false alarms. The cores' scores are each
standardised by their own centre and scale, so one level means the same on every core.

`power[w]` is what the threshold means in load: the smallest sustained extra load on
the core (utilisation points) that raises an alarm within `POWER_WINDOW_S` seconds in
workload w, or, where samples come further apart than that, within the fewest samples
an alarm can take (`power_window_s`). The score is one-sided by default (the core
busier than the twin expects: a hidden process, a noisy neighbour); `two_sided` also
catches a core quieter than expected (a stuck scheduler). Where the twin's value plus the
power passes 100 %, extra load cannot show at all: each tick says so (`blind_at`,
`Verdict.blind`).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.stats import chi2, norm

from cputwin.telemetry.schema import factorize

GLOBAL = "*"
MIN_ROWS_PER_WORKLOAD = 60
MAD_TO_SIGMA = 1.4826
USER_HZ = 100  # Linux counts CPU time in 1/100 s: a 100 ms sample of one core is in 10 % steps
POWER_WINDOW_S = 2.0  # power: extra load that alarms within this long
BLIND_POINTS = 50.0  # a workload whose power is above this is reported as blind spot
MIN_WINDOW_TICKS = 3  # the score's median spans at least this many samples, whatever the rate


def resolution_floor(rate_hz: float) -> float:
    """The smallest residual scale worth trusting: the rounding noise of a per-core reading
    (one clock tick of the sample, uniform: step / sqrt(12)), and never under 1 point.
    Without it a workload whose core sat still in training (scale near 0) turns one tick
    of jitter into a large z."""
    return max(1.0, 100.0 * rate_hz / USER_HZ / np.sqrt(12))


def noise_floor(rate_hz: float, false_alarms_per_hour: float) -> float:
    """The lowest threshold calibration may set: where one tick of standard Gaussian noise
    is crossed `false_alarms_per_hour` times an hour at `rate_hz` (4.0 at 10 Hz and 1/h)."""
    ticks_per_hour = 3600.0 * rate_hz
    return float(norm.isf(min(0.5, false_alarms_per_hour / ticks_per_hour)))


@dataclass(frozen=True)
class DetectorSettings:
    """What a user chooses; durations in seconds, whatever the data's rate."""

    false_alarms_per_hour: float = 1.0
    two_sided: bool = False
    smoother: str = "median"  # or "ewma"
    window_s: float = 0.5
    smoothing_s: float = 0.28
    raise_s: float = 0.3
    clear_s: float = 1.0
    clear_level: float = 1.0


SETTINGS = frozenset(DetectorSettings.__dataclass_fields__)


@dataclass
class Detector:
    """Settings, and what calibration fitted: the durations in ticks at the data's rate,
    the residuals' centre and scale, the threshold and the power."""

    settings: DetectorSettings = field(default_factory=DetectorSettings)
    alpha: float = 0.3
    window_ticks: int = 5
    raise_ticks: int = 3
    clear_ticks: int = 10
    rate_hz: float = 10.0
    centre: dict[str, float] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)
    threshold: float = float("inf")
    power: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)

    def fit(self, residuals: np.ndarray, workloads: np.ndarray, segments: np.ndarray,
            rate_hz: float) -> Detector:
        """Calibrate from residuals in time order; `segments` labels unbroken stretches."""
        self.standardise(residuals, workloads, rate_hz)
        scores, bounds = self.calibration_scores(residuals, workloads, segments)
        hours = residuals.size / rate_hz / 3600
        threshold, info = self.threshold_for(scores, bounds, hours)
        return self.settle(threshold, info, scores, bounds, workloads)

    def standardise(self, residuals: np.ndarray, workloads: np.ndarray,
                    rate_hz: float) -> Detector:
        """The durations in ticks at `rate_hz`, and the robust centre and scale of the
        residuals, overall and per workload with enough rows."""
        self.rate_hz = float(rate_hz)
        self.alpha = 1.0 - math.exp(-1.0 / (rate_hz * self.settings.smoothing_s))
        self.window_ticks = max(MIN_WINDOW_TICKS, round(self.settings.window_s * rate_hz))
        self.raise_ticks = max(1, round(self.settings.raise_s * rate_hz))
        self.clear_ticks = max(1, round(self.settings.clear_s * rate_hz))
        self.centre, self.scale = {}, {}
        floor = resolution_floor(rate_hz)
        names, codes = factorize(workloads)
        counts = np.bincount(codes, minlength=len(names))
        groups = [(GLOBAL, np.ones(residuals.size, bool))] + [
            (names[i], codes == i) for i in sorted(range(len(names)), key=names.__getitem__)
            if counts[i] >= MIN_ROWS_PER_WORKLOAD]
        for name, rows in groups:
            centre = float(np.median(residuals[rows]))
            mad = float(np.median(np.abs(residuals[rows] - centre))) * MAD_TO_SIGMA
            self.centre[name], self.scale[name] = centre, max(mad, floor)
        return self

    def calibration_scores(self, residuals: np.ndarray, workloads: np.ndarray,
                           segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores of the calibration rows, each unbroken stretch scored from a fresh
        state, and where each stretch starts."""
        bounds = np.concatenate([[True], segments[1:] != segments[:-1]])
        if self.settings.smoother != "median":
            cuts = np.flatnonzero(bounds)[1:]
            return np.concatenate([self._scores(r, w) for r, w in zip(
                np.split(residuals, cuts), np.split(workloads, cuts), strict=True)]), bounds
        return rolling_median(self.zs(residuals, workloads), bounds, self.window_ticks), bounds

    def threshold_for(self, scores: np.ndarray, bounds: np.ndarray,
                      hours: float) -> tuple[float, dict[str, Any]]:
        """The threshold these scores put at the false-alarm rate, never under the noise
        floor."""
        threshold, info = threshold_for_rate(
            scores, bounds, hours, self.settings.false_alarms_per_hour, self.raise_ticks,
            self.clear_ticks, self.settings.clear_level)
        info["noise_floor"] = noise_floor(self.rate_hz, self.settings.false_alarms_per_hour)
        return max(threshold, info["noise_floor"]), info

    def settle(self, threshold: float, info: dict[str, Any], scores: np.ndarray,
               bounds: np.ndarray, workloads: np.ndarray) -> Detector:
        """Take `threshold`; derive the power and what the calibration rows show at it."""
        self.threshold = float(threshold)
        self.power = {w: self.power_for(w) for w in self.scale}
        self.calibration = {
            "rows": int(scores.size), "hours": scores.size / self.rate_hz / 3600, **info,
            "false_alarms": count_raises(scores, bounds, self.threshold, self.raise_ticks,
                                         self.clear_ticks, self.settings.clear_level),
            "unexplained_workloads": _unexplained_workloads(
                scores, bounds, workloads, self.threshold, self.raise_ticks)}
        return self

    @property
    def power_ticks(self) -> int:
        """The samples within which `power` alarms: POWER_WINDOW_S, or the fewest an alarm
        can take where samples are further apart (a 15 s scrape: one or two samples)."""
        fastest = (self.window_ticks // 2 + self.raise_ticks
                   if self.settings.smoother == "median" else self.raise_ticks)
        return max(int(round(POWER_WINDOW_S * self.rate_hz)), fastest)

    @property
    def power_window_s(self) -> float:
        """`power_ticks` in seconds."""
        return self.power_ticks / self.rate_hz

    def power_for(self, workload: str) -> float:
        """The smallest sustained extra load (points) that raises an alarm within
        `power_window_s` in this workload: the step response of the smoothed score must
        stay above the threshold for `raise_ticks` ticks inside the window."""
        ticks = self.power_ticks
        key = workload if workload in self.scale else GLOBAL
        if self.settings.smoother == "median":  # holds the step once half the window does
            rise = 1.0 if self.window_ticks // 2 + self.raise_ticks <= ticks else 0.0
        elif ticks < self.raise_ticks:
            rise = 0.0
        else:
            rise = 1.0 - (1.0 - self.alpha) ** (ticks - self.raise_ticks + 1)
        if rise <= 0.0:
            return float("inf")
        return float(max(self.threshold, 0.0) * self.scale[key] / rise)

    def blind_spots(self, limit: float = BLIND_POINTS) -> dict[str, float]:
        """Workloads where only more than `limit` points of extra load would alarm."""
        return {w: p for w, p in self.power.items() if w != GLOBAL and p > limit} or (
            {GLOBAL: self.power[GLOBAL]} if self.power.get(GLOBAL, 0.0) > limit
            and len(self.power) == 1 else {})

    def blind_at(self, prediction: float, workload: str) -> bool:
        """Whether extra load on the core could not alarm now: the twin expects the core so
        busy that the power for this workload would take it past 100 % (a hidden process
        on a saturated core leaves no trace in its utilisation)."""
        key = workload if workload in self.power else GLOBAL
        return prediction + self.power.get(key, float("inf")) > 100.0

    def blind_reason(self, workload: str) -> str:
        """Why the detector needs much load to alarm in this workload, in plain words."""
        key = workload if workload in self.scale else GLOBAL
        reasons = []
        unexplained = self.calibration.get("unexplained_workloads", {}).get(workload, 0)
        if unexplained:
            reasons.append(f"{unexplained} stretch{'es' if unexplained > 1 else ''} of its "
                           "training data hold load the labels do not explain")
        if self.scale[key] > 3 * resolution_floor(self.rate_hz):
            reasons.append(f"the twin's error there is wide ({self.scale[key]:.1f} points)")
        minutes = 60 * self.calibration.get("hours", 0.0)
        if minutes < 10:
            reasons.append(f"{minutes:.1f} min of out-of-fold rows to calibrate on")
        return "; ".join(reasons) or "its normal residuals have a heavy tail"

    def z(self, residual: float, workload: str) -> float:
        key = workload if workload in self.scale else GLOBAL
        value = (residual - self.centre[key]) / self.scale[key]
        return abs(value) if self.settings.two_sided else value

    def _scores(self, residuals: np.ndarray, workloads: np.ndarray) -> np.ndarray:
        """The scores a stream would give these rows tick by tick (`DetectorState`), for a
        whole unbroken stretch at once."""
        if self.settings.smoother != "median":
            state = DetectorState(self)
            return np.array([state.smooth(self.z(r, w)) for r, w in zip(residuals, workloads,
                                                                         strict=True)])
        return rolling_median(self.zs(residuals, workloads), np.arange(residuals.size) == 0,
                              self.window_ticks)

    def zs(self, residuals: np.ndarray, workloads: np.ndarray) -> np.ndarray:
        """`z` of many rows."""
        names, codes = factorize(workloads)
        keys = [n if n in self.scale else GLOBAL for n in names]
        centre = np.array([self.centre[k] for k in keys], dtype=float)[codes]
        scale = np.array([self.scale[k] for k in keys], dtype=float)[codes]
        value = (np.asarray(residuals, float) - centre) / scale
        return np.abs(value) if self.settings.two_sided else value

    def stream(self) -> DetectorState:
        return DetectorState(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Detector:
        """From `to_dict`, or from a file that kept settings beside the fitted state: those
        without `clear_level` were calibrated clearing at half the threshold, and those
        without `smoother` with an exponentially weighted score."""
        fitted = {k: v for k, v in data.items() if k not in SETTINGS}
        settings = fitted.pop("settings", None)
        if settings is None:
            settings = {"clear_level": 0.5, "smoother": "ewma",
                        **{k: v for k, v in data.items() if k in SETTINGS}}
        return cls(DetectorSettings(**settings), **fitted)


def threshold_for_rate(scores: np.ndarray, segment_starts: np.ndarray, hours: float,
                       rate: float, raise_ticks: int, clear_ticks: int,
                       clear_level: float = 1.0) -> tuple[float, dict[str, Any]]:
    """The score threshold at which the alarm logic raises `rate` alarms an hour.

    scores: smoothed scores of normal operation in time order; segment_starts: True where
    an unbroken stretch begins. The threshold is the tail's extrapolation (see the module
    docstring); once `hours` covers at least one alarm at the rate, it is also at least
    the lowest level the scores show to meet it. Usable for any detector's score (the
    benchmark's baselines are calibrated by it too).
    """
    levels = sustained(scores, segment_starts, raise_ticks)
    extrapolated, info = tail_threshold(levels, segment_starts, hours, rate)
    observed = _lowest_threshold(scores, levels, segment_starts, hours, rate, raise_ticks,
                                 clear_ticks, clear_level)
    info["observed_threshold"] = observed
    if not np.isfinite(extrapolated):  # too few episodes to fit a tail
        threshold = observed
    elif hours * rate >= 1.0:
        threshold = max(observed, extrapolated)
    else:
        threshold = extrapolated
    info["false_alarms"] = count_raises(scores, segment_starts, threshold, raise_ticks,
                                       clear_ticks, clear_level)
    return float(threshold), info


def _lowest_threshold(scores: np.ndarray, levels: np.ndarray, bounds: np.ndarray, hours: float,
                      rate: float, raise_ticks: int, clear_ticks: int, clear_level: float) -> float:
    """The lowest threshold whose replay of the scores stays within the rate.

    Candidates are the sustained levels themselves (an alarm raises where the lowest of
    `raise_ticks` scores exceeds the threshold), so one short burst costs exactly the level
    it held for `raise_ticks` ticks. Bisection keeps the highest candidate known to meet
    the rate as its upper end.
    """
    levels = levels[~np.isnan(levels)]
    candidates = np.unique(levels[levels >= np.median(scores)])
    if candidates.size == 0:
        return float(scores.max() + 1.0)

    replay = AlarmReplay(scores, bounds, raise_ticks, clear_ticks)

    allowed = rate * hours

    def meets(t: float) -> bool:
        return replay.raises(t, clear_level, limit=allowed) / hours <= rate

    low, high = 0, candidates.size - 1
    while low < high:
        middle = (low + high) // 2
        if meets(candidates[middle]):
            high = middle
        else:
            low = middle + 1
    return float(candidates[high])


def _unexplained_workloads(scores: np.ndarray, bounds: np.ndarray, workloads: np.ndarray,
                           threshold: float, k: int) -> dict[str, int]:
    """Where the calibration's own scores held above the threshold: per workload, the
    number of such stretches (load the labels do not explain, or a twin that is wrong)."""
    above = np.nan_to_num(sustained(scores, bounds, k), nan=-np.inf) > threshold
    starts = above & (bounds | ~np.r_[False, above[:-1]])
    names, counts = np.unique(workloads[starts], return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts, strict=True)}


class Hysteresis:
    """The alarm logic: raise after `raise_ticks` scores above `threshold`, clear after
    `clear_ticks` scores below `clear_level` × `threshold`. Used live and to calibrate."""

    def __init__(self, threshold: float, raise_ticks: int, clear_ticks: int,
                 clear_level: float = 1.0) -> None:
        self.threshold, self.raise_ticks, self.clear_ticks = threshold, raise_ticks, clear_ticks
        self.clear_below = threshold * clear_level
        self.alarm, self.high, self.low = False, 0, 0

    def step(self, score: float) -> str | None:
        if not self.alarm:
            self.high = self.high + 1 if score > self.threshold else 0
            if self.high >= self.raise_ticks:
                self.alarm, self.low = True, 0
                return "raise"
        else:
            self.low = self.low + 1 if score < self.clear_below else 0
            if self.low >= self.clear_ticks:
                self.alarm, self.high = False, 0
                return "clear"
        return None


def count_raises(scores: np.ndarray, segment_starts: np.ndarray, threshold: float,
                 raise_ticks: int, clear_ticks: int, clear_level: float = 1.0) -> int:
    """How many alarms the hysteresis logic raises on these scores (fresh at each segment)."""
    return AlarmReplay(scores, segment_starts, raise_ticks, clear_ticks).raises(
        threshold, clear_level)


class AlarmReplay:
    """`Hysteresis` replayed over a whole array of scores, from one alarm to the next
    rather than tick by tick, so that calibration can try many thresholds on millions of
    rows: an alarm raises at the first tick ending `raise_ticks` scores above the
    threshold, clears at the first tick ending `clear_ticks` scores below the clear level
    (at least `clear_ticks` after the raise), and every segment starts afresh. Tests
    compare it with stepping `Hysteresis`."""

    def __init__(self, scores: np.ndarray, segment_starts: np.ndarray, raise_ticks: int,
                 clear_ticks: int) -> None:
        scores = np.asarray(scores, float)
        self.raise_ticks, self.clear_ticks = raise_ticks, clear_ticks
        self.lowest = np.nan_to_num(sustained(scores, segment_starts, raise_ticks), nan=-np.inf)
        self.highest = np.nan_to_num(-sustained(-scores, segment_starts, clear_ticks),
                                     nan=np.inf)
        self.segments = np.flatnonzero(segment_starts)

    def raises(self, threshold: float, clear_level: float = 1.0,
               limit: float = np.inf) -> int:
        """The alarms raised at `threshold`; counting stops past `limit` (a caller that
        only asks whether the count is within it needs no more, and a low threshold on
        millions of rows raises hundreds of thousands)."""
        up = np.flatnonzero(self.lowest > threshold)
        if up.size == 0:
            return 0
        down = np.flatnonzero(self.highest < threshold * clear_level)
        count, earliest = 0, 0
        while True:
            i = np.searchsorted(up, earliest)
            if i == up.size or count > limit:
                return count
            raised = up[i]
            count += 1
            j = np.searchsorted(down, raised + self.clear_ticks)
            cleared = down[j] if j < down.size else np.inf
            k = np.searchsorted(self.segments, raised, side="right")
            fresh = self.segments[k] if k < self.segments.size else np.inf
            earliest = fresh if fresh <= cleared else cleared + self.raise_ticks


def rolling_median(values: np.ndarray, segment_starts: np.ndarray, window: int) -> np.ndarray:
    """The median of the last `window` values of each segment (fewer at its start): the
    median smoother of `DetectorState`, for a whole array (tests compare the two)."""
    segment = np.cumsum(segment_starts)
    lagged = np.full((values.size, window), np.nan)
    lagged[:, 0] = values
    for lag in range(1, window):
        lagged[lag:, lag] = np.where(segment[lag:] == segment[:-lag], values[:-lag], np.nan)
    lagged.sort(axis=1)  # NaN last
    n = window - np.isnan(lagged).sum(axis=1)
    rows = np.arange(values.size)
    return (lagged[rows, (n - 1) // 2] + lagged[rows, n // 2]) / 2


def sustained(scores: np.ndarray, segment_starts: np.ndarray, k: int) -> np.ndarray:
    """The lowest of the last k scores of a segment (NaN before the k-th): an alarm raises
    where this exceeds the threshold."""
    segment = np.cumsum(segment_starts)
    out = scores.astype(float)
    for lag in range(1, k):
        earlier = np.full(scores.size, np.nan)
        earlier[lag:] = np.where(segment[lag:] == segment[:-lag], scores[:-lag], np.nan)
        out = np.minimum(out, earlier)  # NaN wins
    return out


def tail_threshold(level: np.ndarray, segment_starts: np.ndarray, hours: float, rate: float,
                   min_episodes: int = 12, confidence: float = 0.9) -> tuple[float, dict[str, Any]]:
    """The level crossed `rate` times an hour, by the exponential tail of episode peaks.

    A calibration of minutes cannot show a once-an-hour level: the lowest threshold with no
    alarm in it is its maximum, and a longer stretch of normal operation will exceed it.
    Peaks over a high level u (one per upcrossing) are fitted with an exponential excess
    of scale sigma; u is crossed lambda_u times an hour, so the level crossed `rate` times
    an hour is u + sigma * ln(lambda_u / rate). sigma is the median excess / ln 2: the
    mean would let one stretch of unexplained load in the training data (a peak tens of
    times the others) set the threshold out of reach. A few dozen peaks leave sigma
    uncertain, and an underestimate shows up as alarms, so sigma is taken at its upper
    `confidence` bound (2 n sigma_hat / sigma is about chi-square with 2n degrees of
    freedom).
    """
    valid = ~np.isnan(level)
    peaks, u = np.array([]), -np.inf
    for q in (0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.5) if valid.any() else ():
        u = float(np.quantile(level[valid], q))
        peaks = _episode_peaks(level, segment_starts, u)
        if peaks.size >= min_episodes:
            break
    if peaks.size < 3:
        return float("inf"), {"tail_episodes": int(peaks.size)}
    excess = peaks - u
    sigma = float(np.median(excess) / np.log(2))
    upper = sigma * 2 * peaks.size / chi2.ppf(1 - confidence, 2 * peaks.size)
    per_hour = peaks.size / hours
    threshold = u + upper * np.log(per_hour / rate) if per_hour > rate else u
    return float(threshold), {"tail_level": u, "tail_episodes": int(peaks.size),
                              "tail_scale": sigma, "tail_scale_upper": float(upper),
                              "tail_threshold": float(threshold)}


def _episode_peaks(level: np.ndarray, segment_starts: np.ndarray, u: float) -> np.ndarray:
    above = np.nan_to_num(level, nan=-np.inf) > u
    starts = above & (segment_starts | ~np.r_[False, above[:-1]])
    episode = np.cumsum(starts)
    episode[~above] = 0
    if not episode.any():
        return np.array([])
    peaks = np.full(episode.max() + 1, -np.inf)
    np.maximum.at(peaks, episode[above], level[above])
    return peaks[1:]


@dataclass
class Verdict:
    score: float
    alarm: bool
    event: str | None  # "raise", "clear" or None
    blind: bool = False  # extra load could not alarm now (`Detector.blind_at`)


class DetectorState:
    """The detector's memory for one stream: the smoothed score and the alarm logic."""

    def __init__(self, detector: Detector) -> None:
        self.d = detector
        self.ewma: float | None = None
        self.window: deque[float] = deque(maxlen=detector.window_ticks)
        self.logic = Hysteresis(detector.threshold, detector.raise_ticks, detector.clear_ticks,
                                detector.settings.clear_level)

    def smooth(self, z: float) -> float:
        if self.d.settings.smoother == "median":
            self.window.append(z)
            return statistics.median(self.window)
        self.ewma = z if self.ewma is None else self.d.alpha * z + (1 - self.d.alpha) * self.ewma
        return self.ewma

    def update(self, residual: float, workload: str,
               prediction: float | None = None) -> Verdict:
        """One sample's residual; with the twin's `prediction`, also whether the core
        has the headroom for extra load to show."""
        score = self.smooth(self.d.z(residual, workload))
        event = self.logic.step(score)
        blind = prediction is not None and self.d.blind_at(prediction, workload)
        return Verdict(score, self.logic.alarm, event, blind)


def calibrate(stack: Any, frame: Any, **settings: Any) -> Detector | dict[str, Detector]:
    """A detector for a fitted `TwinStack`, from the out-of-fold residuals of its training
    frame (the rows each base model never saw); for a machine twin, one per core, sharing
    one threshold (`calibrate_pooled`)."""
    if getattr(stack, "machine_", False):
        return calibrate_pooled({core: _calibration_rows(stack, frame, k)
                                 for k, core in enumerate(stack.targets_)}, **settings)
    return Detector(DetectorSettings(**settings)).fit(*_calibration_rows(stack, frame, 0))


def calibrate_pooled(rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]],
                     **settings: Any) -> dict[str, Detector]:
    """One detector per core from each core's (residuals, workloads, segments, rate):
    each its own centre, scale and calibration; one threshold, the median of theirs."""
    detectors, scored = {}, {}
    for core, (residuals, workloads, segments, rate_hz) in rows.items():
        detectors[core] = Detector(DetectorSettings(**settings)).standardise(
            residuals, workloads, rate_hz)
        scored[core] = detectors[core].calibration_scores(residuals, workloads, segments)
    own = {core: d.threshold_for(*scored[core], rows[core][0].size / d.rate_hz / 3600)
           for core, d in detectors.items()}
    shared = float(np.median([threshold for threshold, _ in own.values()]))
    return {core: d.settle(shared, {**own[core][1], "own_threshold": own[core][0],
                                    "pooled_cores": len(detectors)},
                           *scored[core], rows[core][1])
            for core, d in detectors.items()}


def _calibration_rows(stack: Any, frame: Any,
                      k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Core k's out-of-fold residuals, workloads, unbroken stretches and rate (a machine
    twin stacks core after core)."""
    import polars as pl

    from cputwin.telemetry.schema import RUN_COLUMN, TIMESTAMP, WORKLOAD

    mine = (stack.oof_index_ // frame.height) == k
    rows = stack.oof_index_[mine] % frame.height
    workloads = frame[WORKLOAD].to_numpy()[rows]
    predicted = stack.meta_.predict(stack.oof_predictions_[mine], workloads)
    residuals = frame[stack.targets_[k]].to_numpy()[rows] - predicted
    runs = frame.select(pl.col(RUN_COLUMN).rle_id()).to_series().to_numpy()[rows]  # runs are blocks
    # unbroken stretches: a run's rows inside one fold's block (rows are in time order there)
    breaks = np.concatenate([[False], (runs[1:] != runs[:-1]) | (np.diff(rows) != 1)])
    step_s = frame.select(pl.col(TIMESTAMP).diff().over(RUN_COLUMN).median()).item()
    rate_hz = 1.0 / step_s if step_s and step_s > 0 else 10.0
    return residuals, workloads, np.cumsum(breaks), rate_hz
