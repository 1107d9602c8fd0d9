"""The compiled trees answer what LightGBM answers, row for row, or step aside."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cputwin.models.base import LightGBMModel
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
    model = LightGBMModel("t", [f"f{i}" for i in range(N_FEATURES)], booster)
    X = np.array(rows, dtype=np.float64)
    expected = booster.predict(X, num_threads=1)
    got = np.array([model.predict_one(x) for x in X])
    np.testing.assert_array_equal(got, expected)
    # a machine twin's tick: every row in one call, the rows the kernel leaves to LightGBM too
    np.testing.assert_array_equal(model.predict_rows(X), expected)


@pytest.mark.parametrize("name", list(MODELS))
def test_regression_models_compile_and_the_fast_path_answers_plain_rows(name):
    forest = CompiledForest.from_booster(MODELS[name])
    assert forest is not None
    X, _ = _data(9)
    got = np.array([forest(x) for x in X])
    assert not np.isnan(got).any()  # no NaN, no zero-ish value below 1e-35: answered here
    np.testing.assert_array_equal(got, MODELS[name].predict(X, num_threads=1))


def _going_right(forest: CompiledForest, x: np.ndarray) -> float:
    """The share of the forest's splits at which `x` goes right."""
    start = forest.feature_start
    return sum(np.searchsorted(forest.splits["threshold"][start[f]:start[f + 1]], x[f])
               for f in range(len(x))) / forest.splits.size


def test_rows_scored_from_either_side_land_where_lightgbm_does():
    """A row scans the splits it goes right at (leftmost leaf alive) or, where those are
    more than half, the splits it goes left at (rightmost leaf alive): both sides agree
    with LightGBM to the bit, at the extremes (every split one way) and in between."""
    booster = MODELS["l2"]
    forest = CompiledForest.from_booster(booster)
    X, _ = _data(10)
    quantiles = np.linspace(0, 1, 41)
    X = np.vstack([X, np.quantile(X, quantiles, axis=0), np.full((1, N_FEATURES), -1e9),
                   np.full((1, N_FEATURES), 1e9)])
    shares = np.array([_going_right(forest, x) for x in X])
    assert (shares < 0.5).sum() > 50 and (shares > 0.5).sum() > 50
    assert shares.min() == 0.0 and shares.max() == 1.0
    np.testing.assert_array_equal([forest(x) for x in X], booster.predict(X, num_threads=1))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), leaves=st.integers(2, 64),
       n_features=st.integers(1, 12), min_child=st.integers(1, 20))
def test_any_tree_shape_scores_as_lightgbm_does(seed, leaves, n_features, min_child):
    """Forests of random shape (balanced or lopsided, 2 to 64 leaves, few or many features,
    coarse or fine thresholds) score every row exactly as LightGBM does."""
    rng = np.random.default_rng(seed)
    X = rng.normal(0, 10, size=(600, n_features)).round(int(rng.integers(0, 3)))
    y = np.tanh(X[:, 0] / 5) * 30 + X[:, -1] ** 2 / 20 + rng.normal(0, 1, len(X))
    booster = lgb.train(dict(objective="regression", num_leaves=leaves, learning_rate=0.2,
                             min_child_samples=min_child, min_child_weight=0, verbose=-1,
                             deterministic=True, force_col_wise=True, seed=0),
                        lgb.Dataset(X, y), num_boost_round=15)
    forest = CompiledForest.from_booster(booster)
    rows = np.vstack([X[:200], rng.normal(0, 20, size=(100, n_features))])
    np.testing.assert_array_equal([forest(x) for x in rows], booster.predict(rows, num_threads=1))


def test_trees_of_one_leaf_and_of_64_leaves_are_scored():
    X, y = _data(11)
    flat = _train({"objective": "regression"}, X, np.full(len(y), 3.25))
    assert set(flat.trees_to_dataframe().groupby("tree_index").size()) == {1}
    wide = _train({"objective": "regression", "num_leaves": 64, "min_child_samples": 2}, X, y)
    leaves = wide.dump_model()["tree_info"]
    assert max(tree["num_leaves"] for tree in leaves) == 64
    for booster in (flat, wide):
        forest = CompiledForest.from_booster(booster)
        np.testing.assert_array_equal([forest(x) for x in X], booster.predict(X, num_threads=1))


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
    ({"objective": "regression", "num_leaves": 100, "min_child_samples": 2}, {}),  # > 64 leaves
])
def test_models_outside_the_fast_path_are_left_to_lightgbm(params, dataset):
    X, y = _data(5)
    X[:, 3] = np.floor(X[:, 3] / 20)
    booster = _train(params, X, np.abs(y), **dataset)
    assert CompiledForest.from_booster(booster) is None
    model = LightGBMModel("t", [f"f{i}" for i in range(N_FEATURES)], booster)
    np.testing.assert_allclose([model.predict_one(x) for x in X[:50]],
                               booster.predict(X[:50]), rtol=1e-12)
