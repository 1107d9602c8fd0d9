"""`TwinStack`: base models on several feature sets under a meta-model, fitted honestly.

The meta-model learns only from out-of-fold predictions made by forward-chaining folds
inside the training period: for fold k, each run's rows are split in time; base models
train on a run's rows that end `gap` samples before the block they predict, so neither
the predicted rows nor the history their features read was seen in training. The bases
are then refitted on the whole training period. scikit-learn's `StackingRegressor`
cannot do this: `cross_val_predict` needs folds that partition the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Protocol

import lightgbm as lgb
import numpy as np
import polars as pl
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.metrics import r2_score

from cputwin.contract import InputContract
from cputwin.errors import ModelError, NotFittedError
from cputwin.features import FeatureMatrix, build_features
from cputwin.features.spec import MODES
from cputwin.models.base import (
    BaseSpec,
    FittedBase,
    LightGBMModel,
    RoundsTold,
    base_from_dict,
    dataset_params,
    fit_base,
    params_for,
    resolve_bases,
    train_lgbm,
    train_lgbm_stopping,
)
from cputwin.models.meta import META_KINDS, LinearMeta, choose_meta, fit_meta
from cputwin.telemetry.ingest import DataWarning, sample_step, schema_of
from cputwin.telemetry.schema import HOST, RUN_COLUMN, WORKLOAD, Schema

ALL_CORES = "all"
Progress = Callable[[str, float], None]  # (what is running, fraction of fit done)
FEATURE_DTYPES = {"float64": np.float64, "float32": np.float32}
PREDICT_CHUNK_ROWS = 1 << 16  # rows of a fold's block gathered at a time to predict


def _noop(_: str, __: float) -> None:
    return None


@dataclass(frozen=True)
class Task:
    """One fit of a stack: `run(params, on_round)` with its base's LightGBM parameters."""

    key: Any
    base: str
    message: str
    cost: float  # rows × rounds: the largest go first
    run: Callable[[dict[str, Any], Callable[[float], None]], Any]
    first: bool = False  # before every other task, whatever its cost


class ChosenRounds:
    """The rounds a base's early-stopping fit chooses, told to its other fits: run side by
    side with it, they stop there once it is known (`stop_when_told`), and wait for it if
    they reach the cap first. None once known: the choice failed, keep the cap."""

    def __init__(self) -> None:
        self.rounds: int | None = None
        self.known = threading.Event()

    def tell(self, rounds: int | None) -> None:
        self.rounds = rounds
        self.known.set()

    def __call__(self, last: bool) -> int | None:
        if last:
            self.known.wait()
        return self.rounds


def cut_back_exact(params: dict[str, Any]) -> bool:
    """Whether a LightGBM fit cut back to its first trees is the fit of that many rounds:
    true where each tree, once added, stays as it is; DART rescales earlier trees."""
    kind = next((params[k] for k in ("boosting", "boosting_type", "boost") if k in params),
                "gbdt")
    return str(kind).lower() != "dart"


class Steps:
    """Progress over a fit's steps, of which several may be running at once."""

    def __init__(self, progress: Progress, n: int) -> None:
        self.progress, self.n = progress, max(n, 1)
        self.done, self.running, self.message = 0, {}, ""
        self.lock = threading.Lock()

    def _report(self) -> None:
        self.progress(self.message, min((self.done + sum(self.running.values())) / self.n, 1.0))

    def start(self, key: Any, message: str) -> Callable[[float], None]:
        """Mark a step as running; the returned callback takes its share done."""
        def within(share: float) -> None:
            with self.lock:
                self.running[key] = min(share, 1.0)
                self._report()

        with self.lock:
            self.running[key], self.message = 0.0, message
            self._report()
        return within

    def finish(self, key: Any) -> None:
        with self.lock:
            self.running.pop(key, None)
            self.done += 1
            self._report()


def run_tasks(budget: int | None, params: dict[str, dict[str, Any]], steps: Steps,
              tasks: list[Task]) -> dict[Any, Any]:
    """Run independent fits, each task's result by its key. budget: the threads they may
    use together, shared out as one thread per fit when there are enough fits (None: one
    after another, with the parameters as given)."""
    workers = 1 if budget is None else max(1, min(budget, len(tasks)))
    threads = None if budget is None else max(1, budget // workers)

    def one(t: Task) -> Any:
        p = params[t.base] if threads is None else {**params[t.base], "n_jobs": threads}
        out = t.run(p, steps.start(t.key, t.message))
        steps.finish(t.key)
        return out

    # started in this order (a pool takes its queue first in, first out)
    order = sorted(tasks, key=lambda t: (not t.first, -t.cost))
    if workers == 1:
        return {t.key: one(t) for t in order}
    with ThreadPoolExecutor(workers) as pool:
        futures = {t.key: pool.submit(one, t) for t in order}
        return {key: f.result() for key, f in futures.items()}


class TwinStack(RegressorMixin, BaseEstimator):
    """A stacked twin of one core, or of every core of a machine (`target="all"`).

    A machine twin needs bases that pool across cores (each trains once on every core's
    rows as targets); its meta-model learns from every core's out-of-fold rows, so one
    model set watches all cores, and a workload on any core is a situation it has seen.

    Parameters
    ----------
    bases : a preset ("seed", "twin", "portable", "detect", "detect_wcpu") or a list of
        built-in base names / `BaseSpec` objects, one base model each. The default,
        "twin", is the CLI's. detect_wcpu reads the workload's own CPU use (workload_cpu_percent).
    target : the core column to twin, or "all" for a machine twin of every core.
    mode : "sensor" (may read everything but the target core) or "independent" (may read
        nothing that contains the target: no overall load, no physics estimate).
    n_folds : forward-chaining folds that produce the meta-model's training rows.
    first_fold_fraction : share of each run's training period that only trains (the first
        fold's training window); the rest is cut into `n_folds` blocks, each predicted by
        bases trained on everything before it. Large enough that fold models resemble
        the final ones, so the meta-model does not learn to favour bases that merely
        cope better with little data.
    gap : samples between a fold's training rows and the rows it predicts; None means
        the longest history any feature set needs.
    early_stopping_fraction : tail of each run's training period that the last fold
        predicts; a base that stops early (the seed's sets) chooses its number of rounds
        there, in that fold's own fit (l1, patience 100), and trains its other folds and
        refit with them. 0 keeps the set counts.
    base_params : base name -> LightGBM parameters overriding the built-in ones.
    meta_model : "auto" (the default, as the CLI's: chosen by out-of-fold score), "ridge"
        (RidgeCV, the seed's; the CLI's choice for bases="seed"), "nnls", "best", "average",
        "top_mean", "per_workload", or a scikit-learn linear regressor (cloned in fit).
    host_category : one twin over many hosts of one kind, with each host a one-hot
        category (the frame needs a `host` column, as `load_runs` gives).
    feature_dtype : "float64", or "float32" to halve the feature matrices' memory on
        millions of rows.
    """

    def __init__(
        self,
        bases: str | Sequence[str | BaseSpec] = "twin",
        target: str = "cpu_util_core_0",
        mode: str = "sensor",
        n_folds: int = 3,
        first_fold_fraction: float = 0.5,
        gap: int | None = None,
        early_stopping_fraction: float = 0.15,
        base_params: dict[str, dict[str, Any]] | None = None,
        meta_model: Any = "auto",
        host_category: bool = False,
        feature_dtype: str = "float64",
    ) -> None:
        self.bases = bases
        self.target = target
        self.mode = mode
        self.n_folds = n_folds
        self.first_fold_fraction = first_fold_fraction
        self.gap = gap
        self.early_stopping_fraction = early_stopping_fraction
        self.base_params = base_params
        self.meta_model = meta_model
        self.host_category = host_category
        self.feature_dtype = feature_dtype

    def __sklearn_tags__(self):
        """A telemetry frame in (polars: numeric core columns, string run and workload
        labels), not a 2-D array; no separate `y`: the target is a column of the frame."""
        tags = super().__sklearn_tags__()
        tags.target_tags.required = False
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.input_tags.categorical = True
        return tags

    # ------------------------------------------------------------------ fit
    def fit(self, X: pl.DataFrame, y: Any = None, progress: Progress | None = None,
            shared: SharedFits | None = None) -> TwinStack:
        """Fit on a telemetry frame (as `load_runs` gives); `y` is read from `target`.
        shared: the pooled bases' work, kept for the twins of the other cores of the same
        frame (`SharedFits`)."""
        self.prepare(X)
        rows = PooledRows(self, X) if self.machine_ else LocalRows(self, X, shared)
        return self.fit_from(rows, progress)

    @property
    def machine_(self) -> bool:
        """True for a twin of every core (`target="all"`)."""
        return self.target == ALL_CORES

    def prepare(self, frame: pl.DataFrame) -> None:
        """Check parameters and frame; fix schema, categories and the mode's feature specs."""
        self._validate_params()
        self.schema_ = schema_of(frame)
        if self.target == ALL_CORES:
            self.targets_ = self.schema_.core_columns
        else:
            self.targets_ = [self.schema_.check_target(self.target)]
        self.workloads_ = sorted(frame[WORKLOAD].unique().to_list())
        if self.host_category and HOST not in frame.columns:
            raise ModelError("host_category needs a 'host' column (load_runs adds one)")
        self.hosts_ = sorted(frame[HOST].unique().to_list()) if self.host_category else []
        self.base_specs_ = [replace(b, features=replace(b.features.for_mode(self.mode),
                                                        host=bool(self.host_category)))
                            for b in resolve_bases(self.bases)]
        names = [b.name for b in self.base_specs_]
        if len(set(names)) != len(names):
            raise ModelError(f"bases must have distinct names, got {names}")
        unpooled = [b.name for b in self.base_specs_ if not b.pooled]
        if self.machine_ and unpooled:
            raise ModelError(
                f"a twin of every core needs bases that pool across cores; not pooled: "
                f"{', '.join(unpooled)} (use the detect or detect_wcpu preset)")
        self.history_ = max(b.features.history for b in self.base_specs_)
        self.gap_ = self.history_ if self.gap is None else int(self.gap)
        self.step_s_ = sample_step(frame)  # the data's rate: lags count its samples

    def fit_from(self, rows: TrainingRows, progress: Progress | None = None) -> TwinStack:
        """The honest fit on prepared training rows, wherever they live (`LocalRows` here,
        a Dask cluster in `cputwin.models.cluster`): rounds, folds, meta-model, refit.

        Every fold fit and every refit is independent of the others (a fit that needs
        the rounds another chooses is told them as it runs), so where the rows name a
        thread budget (`LocalRows.threads`) they run side by side, one LightGBM thread
        each, the fits that choose rounds first, then the largest: one thread per fit
        beats several threads on one fit, which spend their time waiting on each other
        (on a few thousand rows, and on a million, where two threads on one fit used
        nearly twice the CPU time of one)."""
        valid = rows.valid
        if not valid.any():
            longest = int(rows.n_in_run.max()) if rows.n_in_run.size else 0
            raise ModelError(
                f"no training row has the history the feature sets need: a run needs more "
                f"than {self.history_} samples, the longest here has {longest}; record "
                "longer runs")
        names = [b.name for b in self.base_specs_]
        stopping = [j for j, b in enumerate(self.base_specs_)
                    if b.early_stopping and b.learner == "lgbm"
                    and self.early_stopping_fraction > 0 and rows.can_stop_early]
        steps = Steps(progress or _noop, len(self.base_specs_) * (self.n_folds + 1))
        params = {b.name: params_for(b.name, {**b.params, **(self.base_params or {}).get(b.name, {})})
                  for b in self.base_specs_}
        budget = rows.threads(params) if hasattr(rows, "threads") else None
        if budget is not None:
            steps.progress("binning the features", 0.0)
            rows.bin(params, budget)

        def task(key: Any, j: int, message: str, train: np.ndarray, run: Callable,
                 first: bool = False) -> Task:
            spec = self.base_specs_[j]
            cost = train.size * (self.schema_.n_cores if spec.pooled and not self.machine_ else 1)
            if spec.learner == "lgbm":
                cost *= params[spec.name]["n_estimators"]
            return Task(key, spec.name, message, float(cost), run, first)

        every = np.flatnonzero(valid)
        self.fold_plan_ = plan = self._fold_plan(valid, rows.position, rows.n_in_run,
                                                 tail=self.early_stopping_fraction if stopping else 0)
        n_plan = len(plan)
        last = n_plan - 1
        if plan[last]["train"].size < 50 or plan[last]["predict"].size < 10:
            stopping = []  # too few rows to choose rounds on: keep the set counts
        blocks = np.concatenate([np.full(f["predict"].size, k) for k, f in enumerate(plan)])

        # The last fold predicts each run's tail: a base that stops early stops there, in
        # that fold's own fit, and its other folds and refit train the rounds it chose.
        # They start beside that fit, before the rounds are known, wherever the rows run
        # fits side by side: the choosing fits are started first, so none waits for a fit
        # that has not started.
        chosen = {j: ChosenRounds() for j in stopping}

        def choose(j: int) -> Callable[[dict[str, Any], Any], Any]:
            def run(p: dict[str, Any], on_round: Any) -> tuple[int, np.ndarray]:
                try:
                    out = rows.fit_stopping(j, p, plan[last]["train"], plan[last]["predict"],
                                            on_round)
                except BaseException:
                    chosen[j].tell(None)
                    raise
                chosen[j].tell(out[0])
                return out
            return run

        def fit_rows(j: int, p: dict[str, Any], train: np.ndarray, on_round: Any) -> FittedBase:
            """Base j fitted on some rows: with the rounds its early stop chose, where known
            (or it cannot be cut back to them), else told them while it runs."""
            told = chosen.get(j)
            if told is None:
                return rows.fit(j, p, train, on_round)
            if not cut_back_exact(p):
                told.known.wait()
            if told.known.is_set():
                rounds = told.rounds or p["n_estimators"]
                return rows.fit(j, {**p, "n_estimators": rounds}, train, on_round)
            return rows.fit(j, p, train, on_round, stop=told)

        def fold(j: int, k: int) -> Callable[[dict[str, Any], Any], Any]:
            """Base j's predictions of fold k's block, or its refit on every row (k == n_plan)."""
            if k == n_plan:
                return lambda p, on_round: fit_rows(j, p, every, on_round)
            return lambda p, on_round: rows.predict(j, fit_rows(j, p, plan[k]["train"], on_round),
                                                    plan[k]["predict"])

        done = run_tasks(budget, params, steps, [
            task((j, last), j, f"fold {n_plan}/{n_plan} of {self.base_specs_[j].name} "
                               "(choosing its rounds)", plan[last]["train"], choose(j), first=True)
            for j in stopping] + [
            task((j, k), j, f"refitting {spec.name}" if k == n_plan else
                 f"fold {k + 1}/{n_plan} of {spec.name}",
                 every if k == n_plan else plan[k]["train"], fold(j, k))
            for j, spec in enumerate(self.base_specs_) for k in range(n_plan + 1)
            if not (j in chosen and k == last)])
        for j in stopping:
            params[self.base_specs_[j].name]["n_estimators"], done[(j, last)] = done[(j, last)]
        self.base_params_ = params
        self.oof_index_ = oof_rows = np.concatenate([f["predict"] for f in plan])
        self.oof_predictions_ = oof = np.column_stack(
            [np.concatenate([done[(j, k)] for k in range(n_plan)]) for j in range(len(names))])
        y_oof, wl_oof = rows.target[oof_rows], rows.workloads[oof_rows]
        if self.meta_model == "auto":
            self.meta_, self.meta_scores_ = choose_meta(names, oof, y_oof, wl_oof, blocks)
        else:
            self.meta_ = fit_meta(self.meta_model, names, oof, y_oof, wl_oof)
            self.meta_scores_ = {}
        self.bases_: list[FittedBase] = [done[(j, n_plan)] for j in range(len(names))]
        self.n_train_rows_ = int(every.size)
        steps.progress("fitted", 1.0)
        return self

    @property
    def meta_weights_(self) -> dict[str, float]:
        """The meta-model's weight per base (its global weights when fitted per workload)."""
        return self.meta_.global_weights

    @property
    def meta_intercept_(self) -> float:
        return float(self.meta_.intercepts["*"])

    @property
    def sample_rate_hz_(self) -> float | None:
        """Samples per second of the training data (None: not known, a twin file without
        `step_s`, or runs of one sample)."""
        return 1.0 / self.step_s_ if self.step_s_ else None

    def time_span(self) -> dict[str, Any]:
        """What its lags and windows cover: counted in samples, so in seconds at the rate
        of its training data (a twin fed data at another rate looks as far back in samples)."""
        lags = [max(v) for b in self.base_specs_ for v in b.features.lags.values() if v]
        windows = [w for b in self.base_specs_ for ws in b.features.windows.values()
                   for w, _ in ws]
        spans = {"history": self.history_, "longest_lag": max(lags, default=0),
                 "longest_window": max(windows, default=0)}
        step = self.step_s_
        return {"step_s": step, "rate_hz": self.sample_rate_hz_,
                **{k: {"samples": n, "seconds": None if step is None else round(n * step, 3)}
                   for k, n in spans.items()}}

    def warn_rate(self, frame: pl.DataFrame) -> None:
        """Warn when `frame` is sampled at another rate than the training data: lags and
        windows count samples, so they would reach back over another stretch of time."""
        step = sample_step(frame)
        if self.step_s_ and step and not 0.8 <= step / self.step_s_ <= 1.25:
            warnings.warn(
                f"data sampled every {step:.3g} s, this twin's training data every "
                f"{self.step_s_:.3g} s: its history of {self.history_} samples covers "
                f"{self.history_ * step:.3g} s here instead of {self.history_ * self.step_s_:.3g} s;"
                " train a twin on data at this rate", DataWarning, stacklevel=3)

    @property
    def contract_(self) -> InputContract:
        """What this twin may be given (`cputwin/contract.py`)."""
        self._check_fitted()
        return InputContract.of(self)

    @property
    def portable_(self) -> bool:
        return all(b.features.portable for b in self.base_specs_)

    def _validate_params(self) -> None:
        if self.mode not in MODES:
            raise ModelError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0 < self.first_fold_fraction < 1:
            raise ModelError(
                f"first_fold_fraction must be in (0, 1), got {self.first_fold_fraction!r}")
        if not isinstance(self.n_folds, int) or self.n_folds < 2:
            raise ModelError(f"n_folds must be an int >= 2, got {self.n_folds!r}")
        if self.gap is not None and (not isinstance(self.gap, int) or self.gap < 0):
            raise ModelError(f"gap must be None or an int >= 0, got {self.gap!r}")
        if not 0 <= self.early_stopping_fraction < 0.5:
            raise ModelError(
                f"early_stopping_fraction must be in [0, 0.5), got {self.early_stopping_fraction!r}"
            )
        if not self.bases:
            raise ModelError("bases must name at least one base model")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ModelError(f"feature_dtype must be one of {', '.join(FEATURE_DTYPES)}, "
                             f"got {self.feature_dtype!r}")
        if isinstance(self.meta_model, str) and self.meta_model not in META_KINDS:
            raise ModelError(f"meta_model must be one of {', '.join(META_KINDS)} or a "
                             f"scikit-learn linear regressor, got {self.meta_model!r}")

    def _features(self, frame: pl.DataFrame) -> list[FeatureMatrix]:
        return [self.matrix(frame, b, self.targets_[0]) for b in self.base_specs_]

    def matrix(self, frame: pl.DataFrame, base: BaseSpec, target: str) -> FeatureMatrix:
        """One base's features of a frame, as this stack builds them (target, categories)."""
        return build_features(frame, base.features, target, self.workloads_,
                              dtype=FEATURE_DTYPES[self.feature_dtype], hosts=self.hosts_)

    def _fold_plan(self, valid, position, n_in_run,
                   tail: float = 0.0) -> list[dict[str, np.ndarray]]:
        """Forward-chaining blocks per run: fold k predicts block k, trains on earlier rows.
        With `tail`, the last block is that share of each run (where bases stop early) and
        the others share out the rest evenly."""
        first = self.history_
        span = np.maximum(n_in_run - first, 0).astype(float)
        head = self.first_fold_fraction
        if tail and 1 - tail > head and self.n_folds > 1:
            shares = [head + (1 - tail - head) * k / (self.n_folds - 1)
                      for k in range(self.n_folds)] + [1.0]
        else:
            shares = [head + (1 - head) * k / self.n_folds for k in range(self.n_folds + 1)]
        edges = [first + np.ceil(span * share) for share in shares]
        plan = []
        for k in range(self.n_folds):
            predict = np.flatnonzero(valid & (position >= edges[k]) & (position < edges[k + 1]))
            train = np.flatnonzero(valid & (position < edges[k] - self.gap_))
            if predict.size and train.size:
                plan.append({"train": train, "predict": predict})
        if not plan:
            need = int(np.ceil(first + (first + self.gap_ + 1) / self.first_fold_fraction))
            raise ModelError(
                f"training period too short for out-of-fold stacking: a run needs about {need} "
                f"training rows ({self.n_folds} folds, {self.gap_}-sample gap), the longest has "
                f"{int(n_in_run.max())}; record longer runs"
            )
        return plan

    # -------------------------------------------------------------- predict
    def _check_fitted(self) -> None:
        if not hasattr(self, "bases_"):
            raise NotFittedError("this TwinStack is not fitted yet: call fit first")

    def predict_bases(self, X: pl.DataFrame, target: str | None = None
                      ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Each base model's prediction per input row (NaN before enough history), and the
        mask of rows where every base has its history. target: the core predicted (a
        machine twin's choice; a twin of one core predicts its own)."""
        self._check_fitted()
        if target is None:
            if self.machine_:
                raise ModelError("a twin of every core predicts one core at a time: name it")
            target = self.target
        got = schema_of(X)
        self.contract_.check_core_count(got.n_cores)
        got.check_target(target)
        self.warn_rate(X)
        mats = [self.matrix(X, b, target) for b in self.base_specs_]
        valid = np.logical_and.reduce([m.valid for m in mats])
        out = {}
        for base, mat in zip(self.bases_, mats, strict=True):
            pred = np.full(len(mat), np.nan)
            if valid.any():
                pred[valid] = base.predict(mat.X[valid])
            out[base.feature_set] = pred
        return out, valid

    def combine(self, base_predictions: dict[str, np.ndarray],
                workloads: np.ndarray | None = None) -> np.ndarray:
        """The meta-model applied to base predictions (per workload where it was fitted so)."""
        self._check_fitted()
        P = np.column_stack([base_predictions[b.feature_set] for b in self.bases_])
        return self.meta_.predict(P, workloads)

    def predict(self, X: pl.DataFrame) -> np.ndarray:
        """The twin's value for each input row; NaN where history is not yet complete.

        A machine twin gives a row of every core's value (columns in core order)."""
        if self.machine_:
            return np.column_stack([self.predict_core(X, t) for t in self.cores_of(X)])
        bases, _ = self.predict_bases(X)
        return self.combine(bases, X[WORKLOAD].to_numpy())

    def cores_of(self, X: pl.DataFrame) -> list[str]:
        """The cores this twin watches in a frame: its target, or every core."""
        return schema_of(X).core_columns if self.machine_ else [self.target]

    def predict_core(self, X: pl.DataFrame, target: str) -> np.ndarray:
        """One core's twin value per row (a machine twin's bases read any core)."""
        bases, _ = self.predict_bases(X, target)
        return self.combine(bases, X[WORKLOAD].to_numpy())

    def score(self, X: pl.DataFrame, y: Any = None, sample_weight: Any = None) -> float:
        """R² on the rows that have full history (a machine twin: the mean over cores)."""
        pred = self.predict(X).reshape(X.height, -1)
        ok = ~np.isnan(pred).any(axis=1)
        actual = X.select(self.cores_of(X)).to_numpy()
        return float(r2_score(actual[ok], pred[ok]))

    # ------------------------------------------------------------- persist
    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "target": self.target,
            "targets": self.targets_,
            "mode": self.mode,
            "n_cores": self.schema_.n_cores,
            "workloads": self.workloads_,
            "hosts": self.hosts_,
            "bases": [{"spec": s.to_dict(), "model": m.to_dict()}
                      for s, m in zip(self.base_specs_, self.bases_, strict=True)],
            "meta": self.meta_.to_dict(),
            "history": self.history_,
            "params": {"bases": self.bases if _named(self.bases) else None,
                       "meta_model": _meta_param(self.meta_model),
                       "base_params": self.base_params,
                       "n_folds": self.n_folds, "gap": self.gap,
                       "gap_used": self.gap_,
                       "first_fold_fraction": self.first_fold_fraction,
                       "early_stopping_fraction": self.early_stopping_fraction,
                       "host_category": self.host_category,
                       "feature_dtype": self.feature_dtype},
            "base_params": self.base_params_,
            "n_train_rows": self.n_train_rows_,
            "step_s": self.step_s_,
            "contract": self.contract_.to_dict(),  # stated for readers; rebuilt on load
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TwinStack:
        specs = [BaseSpec.from_dict(b["spec"]) for b in data["bases"]]
        p = data["params"]
        # the parameters it was built with (files without them: what the fit used)
        bases = p.get("bases")
        stack = cls(bases=specs if bases is None else bases, target=data["target"],
                    mode=data["mode"], n_folds=p["n_folds"],
                    gap=p["gap"],
                    first_fold_fraction=p["first_fold_fraction"],
                    early_stopping_fraction=p["early_stopping_fraction"],
                    base_params=p.get("base_params"),
                    meta_model=_meta_from_param(p.get("meta_model"), data["meta"]["kind"]),
                    host_category=bool(p.get("host_category", False)),
                    feature_dtype=p.get("feature_dtype", "float64"))
        stack.schema_ = Schema(n_cores=int(data["n_cores"]))
        stack.targets_ = list(data.get("targets", [data["target"]]))
        stack.workloads_ = list(data["workloads"])
        stack.hosts_ = list(data.get("hosts", []))
        stack.base_specs_ = specs
        stack.bases_ = [base_from_dict(b["model"]) for b in data["bases"]]
        stack.meta_ = LinearMeta.from_dict(data["meta"])
        stack.history_ = int(data["history"])
        stack.gap_ = int(p.get("gap_used", p["gap"]))
        stack.base_params_ = data["base_params"]
        stack.n_train_rows_ = int(data["n_train_rows"])
        stack.step_s_ = data.get("step_s")  # None where the file does not record it
        return stack


def _named(bases: Any) -> bool:
    """A preset name or a list of built-in base names (what a file can state as given)."""
    return isinstance(bases, str) or (isinstance(bases, list | tuple)
                                      and all(isinstance(b, str) for b in bases))


def _meta_param(meta_model: Any) -> Any:
    """`meta_model` as a file states it: a kind, or a scikit-learn linear model's class
    name and parameters (rebuilt from `sklearn.linear_model` only, never unpickled)."""
    if isinstance(meta_model, str):
        return meta_model
    params = {k: v for k, v in meta_model.get_params(deep=False).items()
              if v is None or isinstance(v, bool | int | float | str)}
    return {"sklearn_linear_model": type(meta_model).__name__, "params": params}


def _meta_from_param(param: Any, fitted_kind: str) -> Any:
    if isinstance(param, str):
        return param
    if isinstance(param, dict):
        import sklearn.linear_model as linear

        cls = getattr(linear, str(param.get("sklearn_linear_model")), None)
        if isinstance(cls, type):
            try:
                return cls(**param.get("params", {}))
            except TypeError:
                pass
    kind = fitted_kind.split(":", 1)[0]
    return kind if kind in META_KINDS else "auto"


class TrainingRows(Protocol):
    """A stack's training rows, wherever they live, by global row index.

    valid, position (within run), n_in_run, target, workloads: one entry per row, in this
    process (the fold plan and the meta-model need them); the feature matrices may live
    elsewhere. `fit` trains base j on some rows, `predict` predicts base j's rows. Only
    rows with a thread budget (`LocalRows.threads`), whose fits run side by side, are
    given a `stop` (`RoundsTold`) by `fit`'s caller.
    """

    valid: np.ndarray
    position: np.ndarray
    n_in_run: np.ndarray
    target: np.ndarray
    workloads: np.ndarray
    can_stop_early: bool

    def fit(self, j: int, params: dict[str, Any], rows: np.ndarray, on_round) -> FittedBase: ...

    def predict(self, j: int, model: FittedBase, rows: np.ndarray) -> np.ndarray: ...

    def fit_stopping(self, j: int, params: dict[str, Any], train: np.ndarray, val: np.ndarray,
                     on_round) -> tuple[int, np.ndarray]: ...


def _features_key(spec: BaseSpec) -> str:
    return json.dumps(spec.features.to_dict(), sort_keys=True)


def _digest(values: np.ndarray) -> str:
    """A key for an array's contents (rows a fit trains on, the rows a Dataset binned)."""
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


class SharedFits:
    """What the twins of one machine's cores, trained on one frame, have in common (the
    twin of each core: `cputwin evaluate --target all`): a pooled base learns from every
    core's rows whatever its target, so its feature matrices, binned Dataset, fold fits
    and refit are the same for every core's twin. Kept here, each is built for the first
    core and reused by the others, which only predict their own core's rows with it.

    Only for stacks fitted on one training frame: `LocalRows` checks it by the frame's
    row hashes."""

    def __init__(self) -> None:
        self._kept: dict[Any, Any] = {}
        self._lock = threading.Lock()
        self.frame_key: Any = None

    def check_frame(self, frame: pl.DataFrame) -> None:
        key = (frame.height, tuple(frame.columns), int(frame.hash_rows(seed=0).sum()))
        if self.frame_key is None:
            self.frame_key = key
        elif key != self.frame_key:
            raise ModelError("fits are shared only between twins of one training frame")

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        """The thing kept under `key`, built the first time it is asked for (keys are
        distinct among fits that run side by side, so nothing is built twice)."""
        with self._lock:
            if key in self._kept:
                return self._kept[key]
        value = build()
        with self._lock:
            return self._kept.setdefault(key, value)


class LocalRows:
    """Training rows in this process: one feature matrix per feature set (and per core for
    a pooled base, whose training rows are every core's rows as targets).

    Bases that share a feature set share its matrices, and their LightGBM fits share one
    binned Dataset: a fold trains on a subset of it, so the binning is
    done once per feature set, not once per fold and base."""

    can_stop_early = True

    def __init__(self, stack: TwinStack, frame: pl.DataFrame,
                 shared: SharedFits | None = None) -> None:
        self.stack = stack
        self.shared = shared
        if shared is not None:
            shared.check_frame(frame)
        self._built: list[tuple[Any, str, FeatureMatrix]] = []
        self.mats = [self._matrix(frame, spec, stack.target) for spec in stack.base_specs_]
        self.valid = np.logical_and.reduce([m.valid for m in self.mats])
        self.position = self.mats[0].keys["position"].to_numpy()
        self.n_in_run = frame.select(pl.len().over(RUN_COLUMN))[:, 0].to_numpy()
        self.target = frame[stack.target].to_numpy()
        self.workloads = frame[WORKLOAD].to_numpy()
        self.views = [self._views(frame, spec, mat)
                      for spec, mat in zip(stack.base_specs_, self.mats, strict=True)]
        self._init_datasets()

    def _matrix(self, frame: pl.DataFrame, spec: BaseSpec, core: str) -> FeatureMatrix:
        """A feature set's matrix for one target core, built once whatever asks for it."""
        for features, target, mat in self._built:
            if features == spec.features and target == core:
                return mat
        mat = self.stack.matrix(frame, spec, core)
        self._built.append((spec.features, core, mat))
        return mat

    def _views(self, frame, spec: BaseSpec, mat: FeatureMatrix) -> list[tuple[np.ndarray, np.ndarray]]:
        """(X, y) pairs a base trains on: the target's, or every core's for a pooled base."""
        if not spec.pooled:
            return [(mat.X, self.target)]

        def every_core() -> list[tuple[np.ndarray, np.ndarray]]:
            return [(self._matrix(frame, spec, core).X, frame[core].to_numpy())
                    for core in self.stack.schema_.core_columns]

        if self.shared is None:
            return every_core()
        return self.shared.get(("views", _features_key(spec)), every_core)

    def _init_datasets(self) -> None:
        self._datasets: dict[Any, tuple[lgb.Dataset, np.ndarray | None]] = {}
        self._lock = threading.Lock()

    def threads(self, params: dict[str, dict[str, Any]]) -> int:
        """Threads the fits may use together: the smallest thread count a base was given
        (`n_jobs` > 0, e.g. several twins trained side by side), else every core here."""
        given = [int(p["n_jobs"]) for p in params.values() if int(p.get("n_jobs") or -1) > 0]
        return min(given) if given else len(os.sched_getaffinity(0))

    def _design(self, j: int) -> tuple[Any, int]:
        """Base j's training design: a key shared by bases on the same matrices, and how
        many stacked copies of the frame's rows it trains on (one per core when pooled)."""
        views = self.views[j]
        return tuple(id(X) for X, _ in views), len(views)

    def _expand(self, j: int, rows: np.ndarray) -> np.ndarray:
        """Frame rows as rows of base j's stacked views (core by core)."""
        _, copies = self._design(j)
        n = self.valid.size
        return rows if copies == 1 else np.concatenate([rows + c * n for c in range(copies)])

    def rows(self, j: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        views = self.views[j]
        if len(views) == 1:
            return views[0][0][rows], views[0][1][rows]
        return np.vstack([X[rows] for X, _ in views]), np.concatenate([y[rows] for _, y in views])

    def binned(self, j: int, params: dict[str, Any],
               threads: int) -> tuple[lgb.Dataset, np.ndarray | None]:
        """The binned Dataset for base j's design and binning parameters (binned on
        `threads` the first time it is asked for), and where each stacked row lies in it
        (None: where it lies in the stack).

        Its bins come from the valid rows alone, as LightGBM would choose them from those
        rows (the missing lags of the others would give features a missing-value bin, and
        each split search a second pass over it). Where LightGBM reads them all, it bins a
        copy of them; past its sample, it bins the feature matrices where they lie, every
        row, with the bins of its sample (at ten million rows the copy of the valid rows,
        3 GB of fresh memory, cost as long as the binning)."""
        shaping = dataset_params(params)
        key = (self._design(j)[0], tuple(sorted(shaping.items())))
        with self._lock:
            if key not in self._datasets:
                build = {**shaping, "num_threads": threads}

                def binned() -> tuple[lgb.Dataset, np.ndarray | None]:
                    return self._bin(j, shaping, build)

                self._datasets[key] = (self.shared.get(("binned", key, _digest(self.valid)), binned)
                                       if self._is_shared(j) else binned())
            return self._datasets[key]

    def _is_shared(self, j: int) -> bool:
        """Base j's work is the same for every core's twin (pooled), and kept for them."""
        return self.shared is not None and self.stack.base_specs_[j].pooled

    def _bin(self, j: int, shaping: dict[str, Any],
             build: dict[str, Any]) -> tuple[lgb.Dataset, np.ndarray | None]:
        every = np.flatnonzero(self.valid)
        sample = self._bin_sample(j, shaping)
        names = self.mats[j].names
        if sample.size == every.size:
            dataset = lgb.Dataset(*self.rows(j, every), feature_name=names, params=build,
                                  free_raw_data=True).construct()
            where = np.full(self.valid.size * self._design(j)[1], -1, dtype=np.int64)
            where[self._expand(j, every)] = np.arange(self._expand(j, every).size)
            return dataset, where
        views = self.views[j]
        matrices = [X for X, _ in views]
        reference = lgb.Dataset(*self.rows(j, sample), feature_name=names, params=build)
        return lgb.Dataset(matrices if len(matrices) > 1 else matrices[0],
                           np.concatenate([y for _, y in views]), feature_name=names,
                           reference=reference, params=build, free_raw_data=True).construct(), None

    def _bin_sample(self, j: int, shaping: dict[str, Any]) -> np.ndarray:
        """The frame rows whose values choose base j's bins: every valid one, or as many
        as LightGBM samples (`bin_construct_sample_cnt`), drawn with its seed. For a
        pooled base, a row stands for itself as every core's target."""
        every = np.flatnonzero(self.valid)
        n = max(1, int(shaping.get("bin_construct_sample_cnt", 200_000)) // self._design(j)[1])
        if every.size <= n:
            return every
        rng = np.random.default_rng(int(shaping.get("data_random_seed", 1)))
        return np.sort(rng.choice(every, n, replace=False))

    def bin(self, params: dict[str, dict[str, Any]], threads: int) -> None:
        """Bin every LightGBM base's design before the fits, one after another on all the
        `threads` the fits share: binned inside a fit, on that fit's one thread, the other
        cores would idle, and the fits on the same design wait for it."""
        for j, spec in enumerate(self.stack.base_specs_):
            if spec.learner == "lgbm":
                self.binned(j, params[spec.name], threads)

    def dataset(self, j: int, params: dict[str, Any], rows: np.ndarray) -> lgb.Dataset:
        """A LightGBM Dataset of some rows for base j: a subset of the Dataset of every
        valid row, binned once per design and binning parameters.

        Built here, one at a time, with the fit's own thread count: LightGBM keeps one
        process-wide OpenMP thread count that each call sets, so a subset built inside a
        fit with the binning's count while other fits run on theirs crashed the process
        (segmentation fault in LGBM_DatasetGetSubset beside LGBM_BoosterCreate)."""
        full, where = self.binned(j, params, self.threads({"": params}))
        index = self._expand(j, rows) if where is None else where[self._expand(j, rows)]
        threads = int(params.get("n_jobs") or 0)
        subset_params = None if threads <= 0 else {
            **full.params, **{k: v for k, v in params.items() if k not in ("n_estimators", "n_jobs")},
            "num_threads": threads}  # the fit's parameters, which LightGBM checks against these
        with self._lock:
            return full.subset(index.astype(np.int32),
                               params=subset_params).construct()

    def fit(self, j: int, params: dict[str, Any], rows: np.ndarray, on_round,
            stop: RoundsTold | None = None) -> FittedBase:
        """Base j trained on some rows; `stop` tells it, while it runs, where to end."""
        if self._is_shared(j) and stop is None:
            spec = self.stack.base_specs_[j]
            key = ("fit", spec.name, _features_key(spec), spec.learner,
                   json.dumps(params, sort_keys=True, default=str),
                   _digest(rows))
            return self.shared.get(key, lambda: self._fit(j, params, rows, on_round, stop))
        return self._fit(j, params, rows, on_round, stop)

    def _fit(self, j: int, params: dict[str, Any], rows: np.ndarray, on_round,
             stop: RoundsTold | None) -> FittedBase:
        spec = self.stack.base_specs_[j]
        if spec.learner != "lgbm":
            return fit_base(spec, params, *self.rows(j, rows), self.mats[j].names)
        booster = train_lgbm(params, self.dataset(j, params, rows), on_round, stop=stop)
        return LightGBMModel(spec.name, self.mats[j].names, booster)

    def predict(self, j: int, model: FittedBase, rows: np.ndarray) -> np.ndarray:
        """Base j's predictions of some rows, gathered a chunk at a time: one copy of a
        fold's block, at millions of rows, is gigabytes of fresh memory."""
        X = self.mats[j].X
        chunks = np.array_split(rows, max(1, -(-rows.size // PREDICT_CHUNK_ROWS)))
        return np.concatenate([model.predict(X[chunk]) for chunk in chunks])

    def fit_stopping(self, j: int, params: dict[str, Any], train: np.ndarray, val: np.ndarray,
                     on_round) -> tuple[int, np.ndarray]:
        """Base j trained on `train`, stopped early on `val`: the rounds it chose, and its
        predictions of `val` at those rounds."""
        booster, predictions = train_lgbm_stopping(params, self.dataset(j, params, train),
                                                   self.dataset(j, params, val), on_round)
        if predictions is None:  # no round scored (a non-finite error): predict them
            model = LightGBMModel(self.stack.base_specs_[j].name, self.mats[j].names, booster)
            predictions = self.predict(j, model, val)
        return max(int(booster.best_iteration or params["n_estimators"]), 1), predictions


class PooledRows(LocalRows):
    """A machine twin's training rows: every core's rows as targets, stacked core by core
    (row i of the frame, as core k's target, is stacked row k × rows + i). Every base is
    pooled, so each trains once on all of them, and the out-of-fold predictions of every
    core reach the meta-model."""

    def __init__(self, stack: TwinStack, frame: pl.DataFrame) -> None:
        self.stack = stack
        self.shared = None  # one stack for every core: nothing to share with another
        self._built = []
        cores = stack.targets_
        per_core = [[self._matrix(frame, base, core) for base in stack.base_specs_]
                    for core in cores]
        self.mats = per_core[0]
        valid = np.logical_and.reduce([m.valid for m in self.mats])
        k = len(cores)
        self.valid = np.tile(valid, k)
        self.position = np.tile(self.mats[0].keys["position"].to_numpy(), k)
        self.n_in_run = np.tile(frame.select(pl.len().over(RUN_COLUMN))[:, 0].to_numpy(), k)
        self.target = np.concatenate([frame[c].to_numpy() for c in cores])
        self.workloads = np.tile(frame[WORKLOAD].to_numpy(), k)
        stacked: dict[int, np.ndarray] = {}  # one stacked matrix per feature set
        self.stacked = [stacked.setdefault(id(mat), np.vstack([m[j].X for m in per_core]))
                        for j, mat in enumerate(self.mats)]
        self.views = [[(X, self.target)] for X in self.stacked]
        self._init_datasets()

    def predict(self, j: int, model: FittedBase, rows: np.ndarray) -> np.ndarray:
        return model.predict(self.stacked[j][rows])
