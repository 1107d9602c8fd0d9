"""The compiled trees answer what LightGBM answers, row for row, or step aside."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cputwin.models.base import BaseModel
from cputwin.models.forest import CompiledForest

N_FEATURES = 4


def _train(params: dict, X: np.ndarray, y: np.ndarray, **dataset) -> lgb.Booster:
    base = dict(n_estimators=60, num_leaves=15, learning_rate=0.1, min_child_samples=5,
                verbose=-1, random_state=0, deterministic=True, force_col_wise=True)
    return lgb.train({**base, **params}, lgb.Dataset(X, y, **dataset),
                     num_boost_round=base["n_estimators"])


def _data(seed: int = 0, zeros: bool = False, nans: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 100, size=(800, N_FEATURES)).round(1)
    if zeros:
        X[rng.random(X.shape) < 0.2] = 0.0
    y = X[:, 0] * 0.5 + np.sin(X[:, 1] / 10) * 20 + (X[:, 2] > 50) * 10
    if nans:
        X[rng.random(X.shape) < 0.1] = np.nan
    return X, y


MODELS = {
    "l2": _train({"objective": "regression"}, *_data()),
    "l1": _train({"objective": "regression_l1"}, *_data(1)),
    "nan_missing": _train({"objective": "regression"}, *_data(2, nans=True)),
    "zero_as_missing": _train({"objective": "regression", "zero_as_missing": True},
                              *_data(3, zeros=True)),
    "zeros_seen": _train({"objective": "huber"}, *_data(4, zeros=True)),
}


def _thresholds(booster: lgb.Booster) -> list[float]:
    frame = booster.trees_to_dataframe()
    return sorted(set(frame["threshold"].dropna().astype(float)))


cell = st.one_of(
    st.floats(-10, 110, allow_nan=False),
    st.sampled_from([0.0, -0.0, 1e-40, -1e-40, 1e-35, float("nan")]),
    st.sampled_from(_thresholds(MODELS["l2"]) + _thresholds(MODELS["zero_as_missing"])),
)


@pytest.mark.parametrize("name", list(MODELS))
@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.lists(cell, min_size=N_FEATURES, max_size=N_FEATURES),
                     min_size=1, max_size=8))
def test_single_row_prediction_equals_lightgbm(name, rows):
    booster = MODELS[name]
    model = BaseModel("t", [f"f{i}" for i in range(N_FEATURES)], booster)
    X = np.array(rows, dtype=np.float64)
    expected = booster.predict(X, num_threads=1)
    got = np.array([model.predict_one(x) for x in X])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", list(MODELS))
def test_regression_models_compile_and_the_fast_path_answers_plain_rows(name):
    forest = CompiledForest.from_booster(MODELS[name])
    assert forest is not None
    X, _ = _data(9)
    got = np.array([forest(x) for x in X])
    assert not np.isnan(got).any()  # no NaN, no zero-ish value below 1e-35: answered here
    np.testing.assert_allclose(got, MODELS[name].predict(X), rtol=0, atol=1e-9)


@pytest.mark.parametrize("cover", [0.0, 0.5, 1.0])
def test_trees_deeper_than_the_branch_free_walk_finish_exactly(monkeypatch, cover):
    """The branch-free phase stops at the depth most training rows reach; rows going
    deeper finish one tree at a time. cover 0 leaves every step to that finish."""
    from cputwin.models import forest as forest_module

    monkeypatch.setattr(forest_module, "COVER", cover)
    booster = MODELS["l1"]
    forest = CompiledForest.from_booster(booster)
    deepest = _deepest_leaf(booster)
    if cover < 1:  # the branch-free phase stops short of the deepest leaves
        assert forest.steps.sum() < sum(deepest[i:i + 16].max()
                                        for i in range(0, len(deepest), 16))
    X, _ = _data(10)
    got = np.array([forest(x) for x in X])
    np.testing.assert_allclose(got, booster.predict(X), rtol=0, atol=1e-9)


def _deepest_leaf(booster: lgb.Booster) -> np.ndarray:
    """Each tree's deepest leaf, sorted (as the forest orders its blocks)."""
    frame = booster.trees_to_dataframe()
    return np.sort(frame.groupby("tree_index")["node_depth"].max().to_numpy() - 1)


def test_rows_the_fast_path_cannot_state_exactly_go_to_lightgbm():
    assert np.isnan(CompiledForest.from_booster(MODELS["nan_missing"])(
        np.array([np.nan, 1.0, 2.0, 3.0])))
    assert np.isnan(CompiledForest.from_booster(MODELS["l2"])(np.array([1e-40, 1.0, 2.0, 3.0])))
    zero_missing = CompiledForest.from_booster(MODELS["zero_as_missing"])
    assert zero_missing.zero_missing and np.isnan(zero_missing(np.array([0.0, 1.0, 2.0, 3.0])))


@pytest.mark.parametrize("params,dataset", [
    ({"objective": "poisson"}, {}),  # a link function: raw score is not the prediction
    ({"objective": "regression"}, {"categorical_feature": [3]}),
    ({"objective": "regression", "linear_tree": True}, {}),
    ({"objective": "regression", "boosting": "rf", "bagging_freq": 1, "bagging_fraction": 0.5}, {}),
])
def test_models_outside_the_fast_path_are_left_to_lightgbm(params, dataset):
    X, y = _data(5)
    X[:, 3] = np.floor(X[:, 3] / 20)
    booster = _train(params, X, np.abs(y), **dataset)
    assert CompiledForest.from_booster(booster) is None
    model = BaseModel("t", [f"f{i}" for i in range(N_FEATURES)], booster)
    np.testing.assert_allclose([model.predict_one(x) for x in X[:50]],
                               booster.predict(X[:50]), rtol=1e-12)
