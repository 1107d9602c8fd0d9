"""Sensor and independent twins, the physics and pooled bases, meta-model choice, transfer."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from cputwin import TwinStack
from cputwin.contract import ContractError
from cputwin.errors import ModelError
from cputwin.features import BUILTIN_SPECS, build_features
from cputwin.features.spec import TARGET_CARRYING
from cputwin.models.base import BUILTIN_BASES, BaseSpec
from cputwin.models.meta import (
    GLOBAL,
    META_KINDS,
    _convex_with_intercept,
    _nnls_with_intercept,
    choose_meta,
    fit_meta,
)
from helpers import synthetic_run

FAST_ALL = {name: {"n_estimators": 30} for name in BUILTIN_BASES}


def _runs(n_runs=3, n=220, cores=4, seed=0):
    return pl.concat([
        synthetic_run(n=n, cores=cores, seed=seed + i, workload=["a", "b"][i % 2],
                      t0=1e9 + 1e4 * i).with_columns(pl.lit(f"r{i}").alias("run"))
        for i in range(n_runs)
    ]).select("run", pl.exclude("run"))


@pytest.mark.parametrize("spec", list(BUILTIN_SPECS.values()), ids=lambda s: s.name)
def test_independent_inputs_never_carry_the_target(spec):
    """By construction: change the target and the overall load, and no input moves."""
    frame = _runs()
    target = "cpu_util_core_1"
    independent = spec.for_mode("independent")
    assert not independent.groups & TARGET_CARRYING
    base = build_features(frame, independent, target, ["a", "b"])
    rng = np.random.default_rng(1)
    shaken = frame.with_columns(
        pl.Series(target, rng.uniform(0, 100, frame.height)),
        pl.Series("cpu_util_overall", rng.uniform(0, 100, frame.height)),
    )
    moved = build_features(shaken, independent, target, ["a", "b"])
    np.testing.assert_array_equal(base.X, moved.X)
    assert not any("overall" in n or "physics" in n or n.startswith(target) for n in base.names)


def test_sensor_mode_reads_the_physics_estimate():
    frame = _runs()
    mat = build_features(frame, BUILTIN_SPECS["rich"], "cpu_util_core_0", ["a", "b"])
    col = mat.names.index("physics_estimate")
    others = frame.select([f"cpu_util_core_{i}" for i in (1, 2, 3)]).to_numpy().sum(axis=1)
    expected = 4 * frame["cpu_util_overall"].to_numpy() - others
    np.testing.assert_allclose(mat.X[:, col], expected, atol=1e-9)


def test_mode_is_kept_by_the_fitted_twin_and_its_dict():
    frame = _runs()
    stack = TwinStack(bases="twin", mode="independent", base_params=FAST_ALL,
                      early_stopping_fraction=0, meta_model="auto").fit(frame)
    assert stack.to_dict()["mode"] == "independent"
    for spec in stack.base_specs_:
        assert not spec.features.groups & TARGET_CARRYING
    assert TwinStack.from_dict(stack.to_dict()).mode == "independent"


def test_pooled_base_needs_features_that_mean_the_same_for_every_core():
    with pytest.raises(ModelError, match="pooled base needs"):
        BaseSpec("bad", BUILTIN_SPECS["rich"], "lgbm", pooled=True)


def test_pooled_base_learns_from_every_core():
    frame = _runs()
    params = {"gbm_pooled": {"n_estimators": 5, "subsample": 1.0}}
    stack = TwinStack(bases=["gbm_pooled"], base_params=params, early_stopping_fraction=0,
                      meta_model="best").fit(frame)
    booster = stack.bases_[0].booster
    # trained on 4 cores' rows: the root's data count is 4 × the target's valid rows
    root_count = booster.dump_model()["tree_info"][0]["tree_structure"]["internal_count"]
    assert root_count == 4 * stack.n_train_rows_


@pytest.mark.parametrize("kind", [k for k in META_KINDS if k != "auto"])
def test_every_meta_kind_fits_and_predicts(kind):
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 100, 300)
    P = np.column_stack([y + rng.normal(0, s, 300) for s in (1, 5, 20)])
    wl = np.array(["c", "a", "b"] * 100)
    meta = fit_meta(kind, ["x", "y", "z"], P, y, wl)
    pred = meta.predict(P, wl)
    assert pred.shape == y.shape and np.isfinite(pred).all()
    assert np.corrcoef(pred, y)[0, 1] > 0.9
    if kind in ("nnls", "per_workload", "best", "top_mean", "average"):
        assert all((w >= 0).all() for w in meta.weights.values())
    if kind == "per_workload":  # in the labels' order, whatever order the rows give
        assert list(meta.weights) == [GLOBAL, "a", "b", "c"]
        w, b = _convex_with_intercept(P[wl == "b"], y[wl == "b"])
        assert np.allclose(meta.weights["b"], w) and meta.intercepts["b"] == pytest.approx(b)


def test_a_per_workload_meta_model_keeps_following_its_bases():
    """Session 6's missed hidden processes: in training, a single-threaded job sat on the
    target core, so that workload's target was 100 on every out-of-fold row. Free weights
    fit it as weights 0 and intercept 100, and the twin then said 100 whatever the bases
    said after the scheduler moved the job; weights summing to 1 keep it on the bases."""
    rng = np.random.default_rng(0)
    y = np.concatenate([rng.uniform(0, 100, 300), np.full(300, 100.0)])
    P = np.column_stack([y + rng.normal(0, s, 600) for s in (2, 4)])
    wl = np.array(["mixed"] * 300 + ["single"] * 300)
    meta = fit_meta("per_workload", ["a", "b"], P, y, wl)
    for group, w in meta.weights.items():
        assert (w >= 0).all()
        if group != GLOBAL:
            assert w.sum() == pytest.approx(1.0)
    moved = np.array([[7.0, 9.0]])  # the bases see the job gone from the target core
    assert meta.predict(moved, np.array(["single"]))[0] < 15
    assert meta.predict_one(moved[0], "single") < 15
    single = wl == "single"
    w, b = _nnls_with_intercept(P[single], y[single])  # free weights: a constant
    assert w @ moved[0] + b > 90


def test_auto_prefers_the_simplest_meta_model_when_none_is_clearly_better():
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 100, 600)
    P = np.column_stack([y + rng.normal(0, 0.01, 600), y + rng.normal(0, 30, 600)])
    blocks = np.repeat([0, 1, 2], 200)
    meta, scores = choose_meta(["good", "noisy"], P, y, np.array(["a"] * 600), blocks)
    assert meta.kind == "auto:best"
    assert meta.global_weights == {"good": 1.0, "noisy": 0.0}
    assert set(scores) >= {"best", "nnls", "ridge"}


def test_auto_blends_when_blending_clearly_helps():
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 100, 900)
    P = np.column_stack([y + rng.normal(0, 10, 900), y + rng.normal(0, 10, 900)])
    meta, _ = choose_meta(["a", "b"], P, y, np.array(["w"] * 900), np.repeat([0, 1, 2], 300))
    assert meta.kind in ("auto:top_mean", "auto:average", "auto:nnls", "auto:ridge")
    assert min(meta.global_weights.values()) > 0.3


def test_a_portable_twin_moves_to_a_machine_with_another_core_count(sample_frame):
    frame = _runs(cores=4)
    portable = TwinStack(bases="portable", base_params=FAST_ALL, early_stopping_fraction=0,
                         meta_model="auto").fit(frame)
    pred = portable.predict(sample_frame)  # 2 cores
    assert np.isfinite(pred[~np.isnan(pred)]).all() and (~np.isnan(pred)).sum() > 1000
    seed_like = TwinStack(bases="seed", base_params=FAST_ALL, early_stopping_fraction=0).fit(frame)
    with pytest.raises(ContractError, match="trained on 4 cores, the data has 2"):
        seed_like.predict(sample_frame)


@pytest.mark.parametrize("cores", [1, 3, 16])
def test_any_core_count_and_any_target(cores):
    frame = _runs(cores=cores, n=200)
    target = f"cpu_util_core_{cores - 1}"
    for mode in ("sensor", "independent"):
        stack = TwinStack(bases="twin", target=target, mode=mode, base_params=FAST_ALL,
                          early_stopping_fraction=0, meta_model="auto").fit(frame)
        pred = stack.predict(frame)
        position = frame.select(pl.int_range(pl.len()).over("run"))[:, 0].to_numpy()
        assert np.isfinite(pred[position >= stack.history_]).all()
        assert np.isnan(pred[position < stack.history_]).all()
