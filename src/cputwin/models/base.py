"""Base models: a feature spec plus a learner (LightGBM, or a ridge line).

Training goes through LightGBM's scikit-learn wrapper; what is kept is the native
`Booster`, whose text form (`model_to_string`) is the persisted, pickle-free model. A
linear base keeps its coefficients as numbers.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import lightgbm as lgb
import numpy as np
from sklearn.linear_model import RidgeCV

from cputwin.errors import ModelError
from cputwin.features.spec import FeatureSpec, get_spec
from cputwin.models.lgbm_text import check_model_text

# Early stopping always names its metric: in LightGBM 4.7 'r2' is a real metric that
# is maximised by stopping at iteration 1, which silently ruins the seed's V2.3 call.
EARLY_STOPPING_METRIC = "l1"
EARLY_STOPPING_ROUNDS = 100
LEARNERS = ("lgbm", "linear")

SEED_PARAMS: dict[str, dict[str, Any]] = {
    "v2.0": dict(
        objective="regression_l1", n_estimators=1000, learning_rate=0.05, num_leaves=31,
        n_jobs=-1, random_state=42,
    ),
    "v2.3": dict(
        objective="regression_l1", n_estimators=2000, learning_rate=0.01, num_leaves=50,
        colsample_bytree=0.7, subsample=0.7, reg_alpha=0.1, reg_lambda=0.1,
        random_state=42, n_jobs=-1,
    ),
}
# Where every LightGBM base that is not a seed set starts: the seed's V2.0 parameters
# (l1 objective, 31 leaves, 1,000 rounds at 0.05); a base's own params override them.
LIGHTGBM_DEFAULTS = SEED_PARAMS["v2.0"]
# The twin's boosted bases: 100 rounds at 0.15. Chosen on out-of-fold scores of the seed
# data's training period (the stack's meta-model rows, never the test rows): there the
# stack scored as well as with 600 rounds at 0.03, in both modes, at a sixth of the
# rounds. Row-wise histograms: on tens of features and one thread per fit, faster than
# column-wise for the same trees.
_BOOSTED = dict(n_estimators=100, learning_rate=0.15, subsample=0.8, subsample_freq=1,
                colsample_bytree=0.8, random_state=42, n_jobs=-1, force_row_wise=True)


@dataclass(frozen=True)
class BaseSpec:
    """One base model: its name, its features, its learner and the learner's parameters.

    early_stopping: choose the rounds by l1 early stopping on the training period's tail
    (the seed's sets were trained so). pooled: train on every core's rows as targets, each
    with features relative to that core (needs a poolable spec): N times the data for a
    relation, the physics of utilisation, that is the same for every core.
    """

    name: str
    features: FeatureSpec
    learner: str = "lgbm"
    params: dict[str, Any] = field(default_factory=dict)
    early_stopping: bool = False
    pooled: bool = False

    def __post_init__(self) -> None:
        if self.learner not in LEARNERS:
            raise ModelError(f"base {self.name!r}: learner must be one of {LEARNERS}, "
                             f"got {self.learner!r}")
        if self.pooled and not self.features.poolable:
            raise ModelError(f"base {self.name!r}: a pooled base needs features that mean the "
                             "same for every target core (no other_cores group)")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "features": self.features.to_dict(),
                "learner": self.learner, "params": self.params,
                "early_stopping": self.early_stopping, "pooled": self.pooled}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseSpec:
        return cls(data["name"], FeatureSpec.from_dict(data["features"]), data["learner"],
                   dict(data["params"]), bool(data["early_stopping"]), bool(data["pooled"]))


BUILTIN_BASES: dict[str, BaseSpec] = {b.name: b for b in (
    BaseSpec("v2.0", get_spec("v2.0"), "lgbm", SEED_PARAMS["v2.0"], early_stopping=True),
    BaseSpec("v2.3", get_spec("v2.3"), "lgbm", SEED_PARAMS["v2.3"], early_stopping=True),
    BaseSpec("physics_linear", get_spec("physics"), "linear"),
    BaseSpec("physics_pooled", get_spec("physics"), "linear", pooled=True),
    BaseSpec("gbm_l2", get_spec("rich"), "lgbm", dict(_BOOSTED, objective="regression",
                                                       num_leaves=15)),
    BaseSpec("gbm_l1", get_spec("rich"), "lgbm", dict(_BOOSTED, objective="regression_l1",
                                                       num_leaves=31, random_state=7)),
    BaseSpec("gbm_portable", get_spec("portable"), "lgbm", dict(_BOOSTED, objective="regression",
                                                                num_leaves=15)),
    BaseSpec("gbm_pooled", get_spec("pooled"), "lgbm",
             dict(_BOOSTED, objective="regression", num_leaves=31), pooled=True),
    BaseSpec("gbm_pooled_portable", get_spec("portable"), "lgbm",
             dict(_BOOSTED, objective="regression", num_leaves=31), pooled=True),
    BaseSpec("gbm_pooled_wcpu", get_spec("pooled_wcpu"), "lgbm",
             dict(_BOOSTED, objective="regression", num_leaves=31), pooled=True),
)}


def reseeded(base: BaseSpec, seed: int) -> BaseSpec:
    """The same base with another random seed: a second bagging draw.

    With subsample/colsample 0.8 another seed draws other rows and columns, so the errors
    are partly independent and averaging two draws lowers the variance the subsampling adds
    (on the seed data two draws each of gbm_l2 and gbm_pooled, averaged, beat every single
    base on held-out rows; one draw each did not).
    """
    return replace(base, name=f"{base.name}_seed{seed}", params={**base.params, "random_state": seed})


BUILTIN_BASES.update({b.name: b for b in (reseeded(BUILTIN_BASES[n], 7)
                                          for n in ("gbm_l2", "gbm_pooled", "gbm_pooled_wcpu"))})

PRESETS: dict[str, tuple[str, ...]] = {
    "seed": ("v2.0", "v2.3"),
    # The seed's sets are left out: with the overall load in view they add nothing but
    # training time (bench/accuracy.py scores them beside the twin).
    "twin": ("physics_linear", "gbm_l2", "gbm_pooled", "gbm_l2_seed7", "gbm_pooled_seed7"),
    "portable": ("physics_linear", "gbm_portable", "gbm_pooled_portable"),
    # For independent-mode twins that watch for anomalies: the pooled bases learn from every
    # core's rows, so a workload the scheduler puts on another core than it did in training
    # is a situation they have seen (a per-core model extrapolates there, and a hidden
    # process on the target then looks like the workload).
    "detect": ("physics_pooled", "gbm_pooled", "gbm_pooled_seed7"),
    # `detect` that also reads the labelled workload's own CPU use (runs recorded by
    # `cputwin collect`; the seed's data has none): the workload moving onto the target is
    # then expected, and only load that no known process accounts for stands out.
    "detect_wcpu": ("physics_pooled", "gbm_pooled_wcpu", "gbm_pooled_wcpu_seed7"),
}


def get_base(name: str | BaseSpec) -> BaseSpec:
    if isinstance(name, BaseSpec):
        return name
    try:
        return BUILTIN_BASES[name]
    except KeyError:
        raise ModelError(
            f"unknown base model {name!r}; built in: {', '.join(BUILTIN_BASES)}"
        ) from None


def resolve_bases(bases: str | tuple | list) -> list[BaseSpec]:
    """A preset name, or a list of base names / BaseSpec objects."""
    if isinstance(bases, str):
        if bases not in PRESETS:
            raise ModelError(f"unknown preset {bases!r}; presets: {', '.join(PRESETS)}")
        bases = PRESETS[bases]
    return [get_base(b) for b in bases]


def params_for(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A base's LightGBM parameters: a seed set's own (`SEED_PARAMS`), or for any other
    base LIGHTGBM_DEFAULTS; then `overrides` (the base's params, the user's) on top."""
    params = dict(SEED_PARAMS.get(name, LIGHTGBM_DEFAULTS))
    params.update(overrides or {})
    params.setdefault("verbose", -1)
    # Same result on every run: LightGBM otherwise times col-wise against row-wise
    # histogram building at start-up and picks the faster, which a busy machine changes.
    params.setdefault("deterministic", True)
    if not params.get("force_row_wise"):
        params.setdefault("force_col_wise", True)
    return params


def dataset_params(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters of `params` that shape a LightGBM Dataset (binning), as LightGBM
    itself lists them: bases whose features and these agree can share one binned Dataset."""
    shaping = lgb.Dataset(None, params=params).get_params()
    return {**shaping, "verbose": -1}


RoundsTold = Callable[[bool], int | None]  # (at the last round?) -> rounds to keep, if known


def stop_when_told(rounds: RoundsTold) -> Callable[[Any], None]:
    """A LightGBM callback that ends a fit at a round count told while it runs (chosen by
    another fit beside it), asking again after every round and, at the last, waiting for
    the answer. A fit past that count keeps only its first trees: in gradient boosting
    each tree depends on the trees before it alone, so that is the fit of exactly those
    rounds (not in DART, which rescales earlier trees: `stack.cut_back_exact`)."""
    def callback(env: Any) -> None:
        done = env.iteration + 1
        keep = rounds(done == env.end_iteration)
        if keep is not None and done >= keep:
            # lgb.train keeps best_iteration + 1 trees when it returns the booster
            raise lgb.callback.EarlyStopException(keep - 1, [])
    return callback


def train_lgbm(
    params: dict[str, Any],
    train_set: lgb.Dataset,
    on_round: Callable[[float], None] | None = None,
    stop: RoundsTold | None = None,
) -> lgb.Booster:
    """`fit_lgbm` on a ready Dataset (a fold's subset of one binned Dataset, so the
    binning is done once for all folds): LightGBM's native API, which reads the
    scikit-learn names in `params` as aliases. With `stop`, end at the round count it
    tells (`stop_when_told`)."""
    params = dict(params)
    rounds = int(params.pop("n_estimators", 100))
    callbacks = _progress(on_round)
    if stop is not None:
        callbacks.append(stop_when_told(stop))
    return lgb.train(params, train_set, num_boost_round=rounds, callbacks=callbacks)


def train_lgbm_stopping(params: dict[str, Any], train_set: lgb.Dataset, valid_set: lgb.Dataset,
                        on_round: Callable[[float], None] | None = None
                        ) -> tuple[lgb.Booster, np.ndarray | None]:
    """`train_lgbm` stopped early on l1 over `valid_set` after 100 flat rounds, keeping the
    best round count, and its predictions of `valid_set` at that round: LightGBM scores
    those rows round by round to stop, so they are kept as it goes (when the error falls)
    rather than predicted again afterwards, a second pass over rows that may be millions
    (None where no round's error was a number)."""
    params = {**params, "metric": EARLY_STOPPING_METRIC}
    rounds = int(params.pop("n_estimators", 100))
    kept: dict[str, Any] = {"error": np.inf, "predictions": None}

    def keep(predictions: np.ndarray, _: Any) -> tuple[str, float, bool]:
        kept["predictions"] = np.array(predictions, dtype=float)
        return "kept", 0.0, False

    def keep_best(env: Any) -> None:
        error = env.evaluation_result_list[0][2]
        if error < kept["error"]:  # as lgb.early_stopping counts a round better
            kept["error"] = error
            env.model.eval_valid(keep)

    booster = lgb.train(params, train_set, num_boost_round=rounds, valid_sets=[valid_set],
                        callbacks=[keep_best, lgb.early_stopping(EARLY_STOPPING_ROUNDS, verbose=False),
                                   *_progress(on_round)])
    return booster, kept["predictions"]


def _progress(on_round: Callable[[float], None] | None) -> list[Callable[[Any], None]]:
    return [] if on_round is None else [
        lambda env: on_round((env.iteration + 1 - env.begin_iteration)
                             / max(env.end_iteration - env.begin_iteration, 1))]


class FittedBase(Protocol):
    feature_set: str
    feature_names: list[str]

    def predict(self, X: np.ndarray) -> np.ndarray: ...

    def predict_one(self, x: np.ndarray) -> float: ...

    def prepare_online(self, compiled_trees: bool = True) -> None: ...

    def to_dict(self) -> dict[str, Any]: ...


class SingleRowPredictor:
    """LightGBM's fast single-row C entry point, set up once per booster.

    `Booster.predict` validates and converts its input on every call, which costs far
    more than walking the trees for one row; the C API's FastInit/Fast pair does that
    set-up once. Same trees, same arithmetic: the result equals `Booster.predict`.
    """

    def __init__(self, booster: lgb.Booster) -> None:
        from lightgbm.basic import _LIB, _safe_call

        self._lib, self._safe_call = _LIB, _safe_call
        self.n_features = booster.num_feature()
        self.handle = ctypes.c_void_p()
        _safe_call(_LIB.LGBM_BoosterPredictForMatSingleRowFastInit(
            booster._handle, ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(-1),
            ctypes.c_int(1), ctypes.c_int32(self.n_features), ctypes.c_char_p(b"num_threads=1"),
            ctypes.byref(self.handle)))
        # buffers and pointers made once: building ctypes pointers costs more than the trees
        self._row = np.zeros(self.n_features, dtype=np.float64)
        self._row_ptr = ctypes.c_void_p(self._row.ctypes.data)
        self._out = np.zeros(1, dtype=np.float64)
        self._out_ptr = ctypes.c_void_p(self._out.ctypes.data)
        self._out_len = ctypes.c_int64(0)
        self._out_len_ref = ctypes.byref(self._out_len)
        self._predict = _LIB.LGBM_BoosterPredictForMatSingleRowFast

    def __call__(self, x: np.ndarray) -> float:
        self._row[:] = x
        self._safe_call(self._predict(self.handle, self._row_ptr, self._out_len_ref,
                                      self._out_ptr))
        return float(self._out[0])

    def __del__(self) -> None:
        if getattr(self, "handle", None) is not None and self.handle.value:
            self._lib.LGBM_FastConfigFree(self.handle)


@dataclass
class LightGBMModel:
    """One fitted LightGBM model and the feature names it expects, in order."""

    feature_set: str
    feature_names: list[str]
    booster: lgb.Booster
    _single: SingleRowPredictor | None = field(default=None, repr=False, compare=False)
    _forest: Any = field(default=None, repr=False, compare=False)  # CompiledForest
    _forest_built: bool = field(default=False, repr=False, compare=False)  # even if None

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.booster.predict(X, num_threads=1)

    def prepare_online(self, compiled_trees: bool = True) -> None:
        """Set up the single-row paths and compile (or load) the tree kernel, so that a
        stream's first tick costs what the others do. compiled_trees=False: LightGBM walks
        every row (to compare the two)."""
        if self._single is None:
            self._single = SingleRowPredictor(self.booster)
        if compiled_trees and not self._forest_built:  # parse a model once, kernel or not
            from cputwin.models.forest import CompiledForest  # Numba loads only for live use

            self._forest = CompiledForest.from_booster(self.booster)
            self._forest_built = True
            if self._forest is not None:
                self._forest(np.zeros(self._single.n_features))
        elif not compiled_trees:
            self._forest, self._forest_built = None, False

    def predict_one(self, x: np.ndarray) -> float:
        """One float64 row (live streams): the compiled trees, or LightGBM's single-row path
        for what they leave to it (see `forest.py`)."""
        if self._single is None:
            self.prepare_online()
        if self._forest is not None:
            value = self._forest(x)
            if not math.isnan(value):
                return value
        return self._single(x)

    def predict_rows(self, X: np.ndarray) -> np.ndarray:
        """`predict_one` of each row of `X` (a machine twin's tick: one row per core), with
        one kernel call for all of them."""
        if self._single is None:
            self.prepare_online()
        if self._forest is None:
            return np.array([self._single(x) for x in X])
        out = self._forest.rows(np.ascontiguousarray(X, dtype=np.float64))
        for r in np.flatnonzero(np.isnan(out)):
            out[r] = self._single(X[r])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "learner": "lgbm",
            "feature_set": self.feature_set,
            "feature_names": self.feature_names,
            "lightgbm_model": self.booster.model_to_string(),
        }


@dataclass
class LinearModel:
    """A fitted ridge line: prediction = intercept + X · coef."""

    feature_set: str
    feature_names: list[str]
    coef: np.ndarray
    intercept: float

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.intercept + X @ self.coef

    def prepare_online(self, compiled_trees: bool = True) -> None:
        pass

    def predict_one(self, x: np.ndarray) -> float:
        return float(self.intercept + x @ self.coef)

    def predict_rows(self, X: np.ndarray) -> np.ndarray:
        return self.intercept + X @ self.coef

    def to_dict(self) -> dict[str, Any]:
        return {"learner": "linear", "feature_set": self.feature_set,
                "feature_names": self.feature_names, "coef": self.coef.tolist(),
                "intercept": self.intercept}


def base_from_dict(data: dict[str, Any]) -> FittedBase:
    if data.get("learner", "lgbm") == "linear":
        return LinearModel(data["feature_set"], list(data["feature_names"]),
                           np.asarray(data["coef"], dtype=float), float(data["intercept"]))
    check_model_text(data["lightgbm_model"])  # a malformed text aborts LightGBM's parser
    booster = lgb.Booster(model_str=data["lightgbm_model"])
    return LightGBMModel(data["feature_set"], list(data["feature_names"]), booster)


def fit_lgbm(
    params: dict[str, Any],
    X: np.ndarray,
    y: np.ndarray,
    feature_names: list[str],
    eval_set: tuple[np.ndarray, np.ndarray] | None = None,
    on_round: Callable[[float], None] | None = None,
) -> lgb.LGBMRegressor:
    """Fit one LGBMRegressor; with `eval_set`, stop early on l1 after 100 flat rounds.

    on_round: called after each boosting round with the share of rounds done (progress
    bars on millions of rows, where one fit takes minutes).
    """
    model = lgb.LGBMRegressor(**params)
    callbacks = [] if on_round is None else [
        lambda env: on_round((env.iteration + 1 - env.begin_iteration)
                             / max(env.end_iteration - env.begin_iteration, 1))]
    if eval_set is None:
        model.fit(X, y, feature_name=feature_names, callbacks=callbacks)
    else:
        model.fit(
            X, y, feature_name=feature_names,
            eval_X=(eval_set[0],), eval_y=(eval_set[1],), eval_metric=EARLY_STOPPING_METRIC,
            callbacks=[lgb.early_stopping(EARLY_STOPPING_ROUNDS, verbose=False), *callbacks],
        )
    return model


def fit_linear(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Ridge on standardised columns (alpha by leave-one-out), returned on the raw scale."""
    mean, scale = X.mean(axis=0), X.std(axis=0)
    scale[scale == 0] = 1.0
    model = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit((X - mean) / scale, y)
    coef = model.coef_ / scale
    return coef, float(model.intercept_ - mean @ coef)


def fit_base(
    spec: BaseSpec,
    params: dict[str, Any],
    X: np.ndarray,
    y: np.ndarray,
    feature_names: list[str],
    on_round: Callable[[float], None] | None = None,
) -> FittedBase:
    if spec.learner == "linear":
        coef, intercept = fit_linear(X, y)
        return LinearModel(spec.name, feature_names, coef, intercept)
    model = fit_lgbm(params, X, y, feature_names, on_round=on_round)
    return LightGBMModel(spec.name, feature_names, model.booster_)
