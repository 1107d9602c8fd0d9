"""LightGBM base models with the seed's hyperparameters (LINEAGE.md).

Training goes through LightGBM's scikit-learn wrapper; what is kept is the native
`Booster`, whose text form (`model_to_string`) is the persisted, pickle-free model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightgbm as lgb
import numpy as np

# Early stopping always names its metric: in LightGBM 4.7 'r2' is a real metric that
# is maximised by stopping at iteration 1, which silently ruins the seed's V2.3 call.
EARLY_STOPPING_METRIC = "l1"
EARLY_STOPPING_ROUNDS = 100

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


def params_for(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The seed's parameters for a feature set (v2.0's for others), with overrides on top."""
    params = dict(SEED_PARAMS.get(name, SEED_PARAMS["v2.0"]))
    params.update(overrides or {})
    params.setdefault("verbose", -1)
    return params


@dataclass
class BaseModel:
    """One fitted LightGBM model and the feature names it expects, in order."""

    feature_set: str
    feature_names: list[str]
    booster: lgb.Booster

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.booster.predict(X, num_threads=1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature_set": self.feature_set,
            "feature_names": self.feature_names,
            "lightgbm_model": self.booster.model_to_string(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseModel:
        booster = lgb.Booster(model_str=data["lightgbm_model"])
        return cls(data["feature_set"], list(data["feature_names"]), booster)


def fit_lgbm(
    params: dict[str, Any],
    X: np.ndarray,
    y: np.ndarray,
    feature_names: list[str],
    eval_set: tuple[np.ndarray, np.ndarray] | None = None,
) -> lgb.LGBMRegressor:
    """Fit one LGBMRegressor; with `eval_set`, stop early on l1 after 100 flat rounds."""
    model = lgb.LGBMRegressor(**params)
    if eval_set is None:
        model.fit(X, y, feature_name=feature_names)
    else:
        model.fit(
            X, y, feature_name=feature_names,
            eval_X=(eval_set[0],), eval_y=(eval_set[1],), eval_metric=EARLY_STOPPING_METRIC,
            callbacks=[lgb.early_stopping(EARLY_STOPPING_ROUNDS, verbose=False)],
        )
    return model
