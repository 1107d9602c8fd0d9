"""`TwinStack`: base models on several feature sets under a meta-model, fitted honestly.

The meta-model learns only from out-of-fold predictions made by forward-chaining folds
inside the training period: for fold k, each run's rows are split in time; base models
train on a run's rows that end `gap` samples before the block they predict, so neither
the predicted rows nor the history their features read was seen in training. The bases
are then refitted on the whole training period. scikit-learn's `StackingRegressor`
cannot do this: `cross_val_predict` needs folds that partition the data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import polars as pl
from sklearn.base import BaseEstimator, RegressorMixin, clone
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score

from cputwin.errors import ModelError
from cputwin.features import FeatureMatrix, FeatureSpec, build_features, get_spec
from cputwin.models.base import BaseModel, fit_lgbm, params_for
from cputwin.telemetry.ingest import schema_of
from cputwin.telemetry.schema import RUN_COLUMN, WORKLOAD, Schema

Progress = Callable[[str, float], None]  # (what is running, fraction of fit done)


def _noop(_: str, __: float) -> None:
    return None


class TwinStack(RegressorMixin, BaseEstimator):
    """A stacked twin of one core.

    Parameters
    ----------
    feature_sets : names of built-in specs or `FeatureSpec` objects, one base model each.
    target : the core column to twin.
    n_folds : forward-chaining folds that produce the meta-model's training rows.
    gap : samples between a fold's training rows and the rows it predicts; None means
        the longest history any feature set needs.
    early_stopping_fraction : tail of each run's training period used once to choose
        the number of boosting rounds (l1, patience 100); 0 keeps the seed's counts.
    base_params : feature-set name -> LightGBM parameters overriding the seed's.
    meta_model : a scikit-learn regressor; None means a fresh `RidgeCV()`.
    """

    def __init__(
        self,
        feature_sets: Sequence[str | FeatureSpec] = ("v2.0", "v2.3"),
        target: str = "cpu_util_core_0",
        n_folds: int = 3,
        gap: int | None = None,
        early_stopping_fraction: float = 0.15,
        base_params: dict[str, dict[str, Any]] | None = None,
        meta_model: Any = None,
    ) -> None:
        self.feature_sets = feature_sets
        self.target = target
        self.n_folds = n_folds
        self.gap = gap
        self.early_stopping_fraction = early_stopping_fraction
        self.base_params = base_params
        self.meta_model = meta_model

    # ------------------------------------------------------------------ fit
    def fit(self, X: pl.DataFrame, y: Any = None, progress: Progress | None = None) -> TwinStack:
        """Fit on a telemetry frame (as `load_runs` gives); `y` is read from `target`."""
        progress = progress or _noop
        self._validate_params()
        frame = X
        self.schema_ = schema_of(frame)
        self.schema_.check_target(self.target)
        self.workloads_ = sorted(frame[WORKLOAD].unique().to_list())
        self.specs_ = [s if isinstance(s, FeatureSpec) else get_spec(s) for s in self.feature_sets]
        names = [s.name for s in self.specs_]
        if len(set(names)) != len(names):
            raise ModelError(f"feature_sets must have distinct names, got {names}")
        mats = self._features(frame)
        valid = np.logical_and.reduce([m.valid for m in mats])
        target = frame[self.target].to_numpy()
        position = mats[0].keys["position"].to_numpy()
        run_length = frame.group_by(RUN_COLUMN).len().rename({"len": "n"})
        n_in_run = frame.select(RUN_COLUMN).join(run_length, on=RUN_COLUMN, how="left")["n"]
        n_in_run = n_in_run.to_numpy()
        self.history_ = max(s.history for s in self.specs_)
        self.gap_ = self.history_ if self.gap is None else int(self.gap)
        if not valid.any():
            raise ModelError("no training row has the history the feature sets need")

        n_steps = len(self.specs_) * (self.n_folds + 1 + (self.early_stopping_fraction > 0))
        done = iter(range(n_steps))

        def step(message: str) -> None:
            progress(message, next(done) / n_steps)

        params = {s.name: params_for(s.name, (self.base_params or {}).get(s.name)) for s in self.specs_}
        if self.early_stopping_fraction > 0:
            for spec, mat in zip(self.specs_, mats, strict=True):
                step(f"choosing rounds for {spec.name}")
                params[spec.name]["n_estimators"] = self._rounds(
                    mat, target, valid, position, n_in_run, params[spec.name]
                )
        self.base_params_ = params

        self.fold_plan_ = self._fold_plan(valid, position, n_in_run)
        oof_rows = np.concatenate([f["predict"] for f in self.fold_plan_])
        oof = np.empty((oof_rows.size, len(self.specs_)))
        for j, (spec, mat) in enumerate(zip(self.specs_, mats, strict=True)):
            start = 0
            for k, fold in enumerate(self.fold_plan_):
                step(f"fold {k + 1}/{len(self.fold_plan_)} of {spec.name}")
                model = fit_lgbm(params[spec.name], mat.X[fold["train"]], target[fold["train"]],
                                 mat.names)
                n = fold["predict"].size
                oof[start:start + n, j] = model.booster_.predict(mat.X[fold["predict"]])
                start += n
        self.oof_predictions_ = oof
        self.oof_index_ = oof_rows
        self.meta_ = clone(self.meta_model) if self.meta_model is not None else RidgeCV()
        self.meta_.fit(oof, target[oof_rows])
        self.meta_weights_ = dict(zip(names, map(float, np.ravel(self.meta_.coef_)), strict=True))
        self.meta_intercept_ = float(np.ravel(self.meta_.intercept_)[0]) \
            if np.ndim(self.meta_.intercept_) else float(self.meta_.intercept_)

        self.bases_ = []
        rows = np.flatnonzero(valid)
        for spec, mat in zip(self.specs_, mats, strict=True):
            step(f"refitting {spec.name}")
            model = fit_lgbm(params[spec.name], mat.X[rows], target[rows], mat.names)
            self.bases_.append(BaseModel(spec.name, mat.names, model.booster_))
        self.n_train_rows_ = int(rows.size)
        progress("fitted", 1.0)
        return self

    def _validate_params(self) -> None:
        if not isinstance(self.n_folds, int) or self.n_folds < 2:
            raise ModelError(f"n_folds must be an int >= 2, got {self.n_folds!r}")
        if self.gap is not None and (not isinstance(self.gap, int) or self.gap < 0):
            raise ModelError(f"gap must be None or an int >= 0, got {self.gap!r}")
        if not 0 <= self.early_stopping_fraction < 0.5:
            raise ModelError(
                f"early_stopping_fraction must be in [0, 0.5), got {self.early_stopping_fraction!r}"
            )
        if not self.feature_sets:
            raise ModelError("feature_sets must name at least one feature set")

    def _features(self, frame: pl.DataFrame) -> list[FeatureMatrix]:
        return [build_features(frame, s, self.target, self.workloads_) for s in self.specs_]

    def _rounds(self, mat, target, valid, position, n_in_run, params) -> int:
        """Boosting rounds chosen by l1 early stopping on the tail of each run's period."""
        cut = np.floor(n_in_run * (1 - self.early_stopping_fraction))
        train = valid & (position < cut - self.gap_)
        val = valid & (position >= cut)
        if train.sum() < 50 or val.sum() < 10:
            return int(params["n_estimators"])
        model = fit_lgbm(params, mat.X[train], target[train], mat.names,
                         eval_set=(mat.X[val], target[val]))
        return max(int(model.best_iteration_ or params["n_estimators"]), 1)

    def _fold_plan(self, valid, position, n_in_run) -> list[dict[str, np.ndarray]]:
        """Forward-chaining blocks per run: fold k predicts block k, trains on earlier rows."""
        first = self.history_
        span = np.maximum(n_in_run - first, 0)
        block = np.where(valid, np.floor((position - first) * (self.n_folds + 1) / np.maximum(span, 1)), -1)
        plan = []
        for k in range(1, self.n_folds + 1):
            start = first + np.ceil(span * k / (self.n_folds + 1))
            predict = np.flatnonzero(valid & (block == k))
            train = np.flatnonzero(valid & (position < start - self.gap_))
            if predict.size and train.size:
                plan.append({"train": train, "predict": predict})
        if not plan:
            need = int(np.ceil(first + self.gap_ + first / self.n_folds + 1))
            raise ModelError(
                f"training period too short for out-of-fold stacking: a run needs about {need} "
                f"training rows ({self.n_folds} folds, {self.gap_}-sample gap), the longest has "
                f"{int(n_in_run.max())}; record longer runs"
            )
        return plan

    # -------------------------------------------------------------- predict
    def _check_fitted(self) -> None:
        if not hasattr(self, "bases_"):
            raise ModelError("this TwinStack is not fitted yet: call fit first")

    def predict_bases(self, X: pl.DataFrame) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Each base model's prediction per input row (NaN before enough history), and the
        mask of rows where every base has its history."""
        self._check_fitted()
        frame = X
        got = schema_of(frame)
        if got != self.schema_:
            raise ModelError(
                f"this twin was trained on {self.schema_.n_cores} cores, data has {got.n_cores}"
            )
        mats = self._features(frame)
        valid = np.logical_and.reduce([m.valid for m in mats])
        out = {}
        for base, mat in zip(self.bases_, mats, strict=True):
            pred = np.full(len(mat), np.nan)
            if valid.any():
                pred[valid] = base.predict(mat.X[valid])
            out[base.feature_set] = pred
        return out, valid

    def combine(self, base_predictions: dict[str, np.ndarray]) -> np.ndarray:
        """The meta-model applied to base predictions (a linear combination)."""
        self._check_fitted()
        P = np.column_stack([base_predictions[b.feature_set] for b in self.bases_])
        w = np.array([self.meta_weights_[b.feature_set] for b in self.bases_])
        return self.meta_intercept_ + P @ w

    def predict(self, X: pl.DataFrame) -> np.ndarray:
        """The twin's value for each input row; NaN where history is not yet complete."""
        bases, _ = self.predict_bases(X)
        return self.combine(bases)

    def score(self, X: pl.DataFrame, y: Any = None, sample_weight: Any = None) -> float:
        """R² on the rows that have full history."""
        pred = self.predict(X)
        ok = ~np.isnan(pred)
        return float(r2_score(X[self.target].to_numpy()[ok], pred[ok]))

    # ------------------------------------------------------------- persist
    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "target": self.target,
            "n_cores": self.schema_.n_cores,
            "workloads": self.workloads_,
            "feature_specs": [s.to_dict() for s in self.specs_],
            "bases": [b.to_dict() for b in self.bases_],
            "meta": {"kind": "linear", "weights": self.meta_weights_,
                     "intercept": self.meta_intercept_},
            "history": self.history_,
            "params": {"n_folds": self.n_folds, "gap": self.gap_,
                       "early_stopping_fraction": self.early_stopping_fraction},
            "base_params": self.base_params_,
            "n_train_rows": self.n_train_rows_,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TwinStack:
        specs = [FeatureSpec.from_dict(s) for s in data["feature_specs"]]
        stack = cls(feature_sets=specs, target=data["target"], n_folds=data["params"]["n_folds"],
                    gap=data["params"]["gap"],
                    early_stopping_fraction=data["params"]["early_stopping_fraction"])
        stack.schema_ = Schema(n_cores=int(data["n_cores"]))
        stack.workloads_ = list(data["workloads"])
        stack.specs_ = specs
        stack.bases_ = [BaseModel.from_dict(b) for b in data["bases"]]
        stack.meta_weights_ = {k: float(v) for k, v in data["meta"]["weights"].items()}
        stack.meta_intercept_ = float(data["meta"]["intercept"])
        stack.history_ = int(data["history"])
        stack.gap_ = int(data["params"]["gap"])
        stack.base_params_ = data["base_params"]
        stack.n_train_rows_ = int(data["n_train_rows"])
        return stack
