from __future__ import annotations

import os

import lightgbm as lgb
import numpy as np
import polars as pl
import pytest
from sklearn.base import clone

from conftest import FAST
from cputwin import TwinStack
from cputwin.contract import ContractError
from cputwin.errors import ModelError
from cputwin.models.base import (
    dataset_params,
    fit_lgbm,
    params_for,
    train_lgbm,
    train_lgbm_stopping,
)
from cputwin.models.stack import LocalRows, SharedFits
from helpers import synthetic_run

SEED_PAIR = {"bases": "seed", "meta_model": "ridge"}  # TwinStack's defaults are the CLI's

# LightGBM that memorises its training rows: a row it trained on is predicted exactly.
MEMORISE = {"objective": "regression", "n_estimators": 300, "learning_rate": 1.0,
            "num_leaves": 255, "min_child_samples": 1, "min_child_weight": 0.0,
            "min_split_gain": 0.0, "subsample": 1.0, "colsample_bytree": 1.0}


def _noise_runs(n_runs=3, n=240, seed=0):
    """Runs whose target core is pure noise: only memorisation can predict it."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n_runs):
        f = synthetic_run(n=n, cores=4, seed=seed + i, workload="w").with_columns(
            pl.Series("cpu_util_core_0", rng.uniform(0, 100, n)), pl.lit(f"r{i}").alias("run"))
        frames.append(f.select("run", pl.exclude("run")))
    return pl.concat(frames)


class LeakyStack(TwinStack):
    """A stack whose first fold trains on one of the rows it predicts."""

    def _fold_plan(self, *args, **kwargs):
        plan = super()._fold_plan(*args, **kwargs)
        leaked = plan[0]["predict"][:1]
        plan[0]["train"] = np.union1d(plan[0]["train"], leaked)
        return plan


def _memorised_rows(stack, frame):
    y = frame[stack.target].to_numpy()[stack.oof_index_]
    return int((np.abs(stack.oof_predictions_ - y[:, None]) < 1e-3).any(axis=1).sum())


def _memorising(cls):
    return cls(**SEED_PAIR, base_params={"v2.0": MEMORISE, "v2.3": MEMORISE},
               early_stopping_fraction=0)


def test_no_out_of_fold_row_was_seen_by_its_base_model():
    frame = _noise_runs()
    assert _memorised_rows(_memorising(TwinStack).fit(frame), frame) == 0


def test_the_leak_check_catches_a_single_leaked_row():
    frame = _noise_runs()
    assert _memorised_rows(_memorising(LeakyStack).fit(frame), frame) >= 1


def test_fold_plan_is_forward_chaining_with_a_gap():
    frame = _noise_runs()
    stack = TwinStack(**SEED_PAIR, base_params=FAST, early_stopping_fraction=0).fit(frame)
    runs = frame["run"].to_numpy()
    pos = frame.select(pl.int_range(pl.len()).over("run"))[:, 0].to_numpy()
    assert stack.gap_ >= stack.history_ == 29
    assert len(stack.fold_plan_) == stack.n_folds
    for fold in stack.fold_plan_:
        assert not np.intersect1d(fold["train"], fold["predict"]).size
        for run in np.unique(runs):
            tr = fold["train"][runs[fold["train"]] == run]
            pr = fold["predict"][runs[fold["predict"]] == run]
            if tr.size and pr.size:
                # the history any predicted row reads ends after the last training row
                assert pos[pr].min() - stack.history_ > pos[tr].max()
                assert pos[pr].min() - pos[tr].max() > stack.gap_


def test_early_stopping_chooses_the_rounds_in_the_last_folds_own_fit(sample_frame):
    # The seed's sets stop early: on the last fold's block, which is each run's tail,
    # inside that fold's fit (no extra fit); the other folds and the refit train the
    # rounds it chose, and the last block's predictions are that fold's at those rounds.
    one_thread = {name: {**FAST[name], "n_estimators": 400, "learning_rate": 0.3, "n_jobs": 1}
                  for name in ("v2.0", "v2.3")}
    stack = TwinStack(**SEED_PAIR, base_params=one_thread, early_stopping_fraction=0.15,
                      target="cpu_util_core_1").fit(sample_frame)
    rows = LocalRows(stack, sample_frame)
    pos = rows.position
    n = rows.n_in_run
    last = stack.fold_plan_[-1]
    tail_start = stack.history_ + np.ceil((n - stack.history_) * 0.85)
    assert (pos[last["predict"]] >= tail_start[last["predict"]]).all()
    assert (pos[last["train"]] < tail_start[last["train"]] - stack.gap_).all()
    for j, spec in enumerate(stack.base_specs_):
        rounds = stack.base_params_[spec.name]["n_estimators"]
        assert 1 <= rounds < 400  # stopped early on the tail
        assert stack.bases_[j].booster.num_trees() == rounds  # the refit trains them
        again = rows.fit(j, stack.base_params_[spec.name], last["train"], None)
        expected = rows.predict(j, again, last["predict"])
        got = stack.oof_predictions_[-last["predict"].size:, j]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


def _trees(booster):
    """A model's trees, without the parameters it was trained with (num_iterations)."""
    return booster.model_to_string().split("\nparameters:")[0]


@pytest.mark.parametrize("told_after", [12, 20])  # in the run, and at its last round
def test_a_fit_told_its_rounds_while_it_runs_is_the_fit_of_those_rounds(told_after):
    # A fold beside the fit that chooses its rounds runs on, capped, until told them;
    # past them it keeps its first trees, which are the fit of exactly those rounds.
    rng = np.random.default_rng(3)
    X = rng.normal(size=(3000, 6))
    y = X[:, 0] + np.sin(3 * X[:, 1]) + rng.normal(scale=0.3, size=3000)
    params = params_for("v2.3", {"n_estimators": 20, "learning_rate": 0.3, "subsample_freq": 1,
                                 "n_jobs": 1})
    data = lgb.Dataset(X, y, params=dataset_params(params)).construct()
    asked = []

    def told(last: bool) -> int | None:
        asked.append(last)
        return 7 if len(asked) >= told_after else None

    cut = train_lgbm(params, data.subset(np.arange(2500, dtype=np.int32)), stop=told)
    exact = train_lgbm({**params, "n_estimators": 7}, data.subset(np.arange(2500, dtype=np.int32)))
    assert len(asked) == told_after and asked[-1] == (told_after == 20)
    assert cut.num_trees() == 7
    assert _trees(cut) == _trees(exact)


@pytest.mark.parametrize("rounds, rate", [(15, 0.05), (400, 0.3)])  # to the last round; stopped
def test_early_stopping_keeps_the_predictions_of_its_best_round(rounds, rate):
    rng = np.random.default_rng(5)
    X = rng.normal(size=(3000, 5))
    y = X[:, 0] + rng.normal(scale=1.0, size=3000)
    params = params_for("v2.3", {"n_estimators": rounds, "learning_rate": rate, "n_jobs": 1})
    data = lgb.Dataset(X, y, params=dataset_params(params)).construct()
    train, val = np.arange(2400, dtype=np.int32), np.arange(2400, 3000, dtype=np.int32)
    booster, kept = train_lgbm_stopping(params, data.subset(train), data.subset(val))
    best = booster.best_iteration
    assert (best == rounds) if rounds == 15 else (1 <= best < rounds - 50)
    np.testing.assert_allclose(kept, booster.predict(X[2400:], num_iteration=best),
                               rtol=0, atol=1e-9)


def test_fits_beside_the_early_stop_give_the_twin_of_fits_after_it(sample_frame):
    # With threads for several fits, a base's other folds and refit start beside the fit
    # that chooses its rounds: the twin is the one fitted after the choice.
    quick = {**FAST["v2.3"], "n_estimators": 400, "learning_rate": 0.3}
    side = TwinStack(bases=["v2.3"], meta_model="ridge", base_params={"v2.3": {**quick, "n_jobs": 2}},
                     target="cpu_util_core_1").fit(sample_frame)
    after = TwinStack(bases=["v2.3"], meta_model="ridge", base_params={"v2.3": {**quick, "n_jobs": 1}},
                      target="cpu_util_core_1").fit(sample_frame)
    rounds = after.base_params_["v2.3"]["n_estimators"]
    assert 1 <= rounds < 400 and side.base_params_["v2.3"]["n_estimators"] == rounds
    assert side.bases_[0].booster.num_trees() == rounds
    assert _trees(side.bases_[0].booster) == _trees(after.bases_[0].booster)
    np.testing.assert_array_equal(side.oof_predictions_, after.oof_predictions_)


def test_meta_weights_intercept_and_params_are_exposed():
    frame = _noise_runs()
    stack = TwinStack(**SEED_PAIR, base_params=FAST, early_stopping_fraction=0).fit(frame)
    assert set(stack.meta_weights_) == {"v2.0", "v2.3"}
    assert isinstance(stack.meta_intercept_, float)
    assert stack.get_params()["n_folds"] == 3
    fresh = clone(stack)
    assert not hasattr(fresh, "bases_")
    assert fresh.get_params()["base_params"] == FAST


def test_predict_is_nan_until_history_then_defined():
    frame = _noise_runs(n_runs=1)
    stack = TwinStack(**SEED_PAIR, base_params=FAST, early_stopping_fraction=0).fit(frame)
    pred = stack.predict(frame)
    assert np.isnan(pred[: stack.history_]).all()
    assert np.isfinite(pred[stack.history_:]).all()


def test_stack_learns_a_real_signal(sample_frame):
    stack = TwinStack(**SEED_PAIR, base_params=FAST, target="cpu_util_core_1").fit(sample_frame)
    assert stack.score(sample_frame) > 0.5


@pytest.mark.parametrize(("params", "fragment"), [
    ({"n_folds": 1}, "n_folds must be an int >= 2"),
    ({"gap": -1}, "gap must be None or an int >= 0"),
    ({"early_stopping_fraction": 0.7}, "early_stopping_fraction must be in"),
    ({"bases": ()}, "at least one base model"),
    ({"bases": ("v2.0", "v2.0")}, "distinct names"),
    ({"bases": "everything"}, "unknown preset 'everything'"),
    ({"bases": ("v9",)}, "unknown base model 'v9'"),
    ({"mode": "psychic"}, "mode must be one of"),
    ({"meta_model": "median"}, "meta_model must be one of"),
    ({"first_fold_fraction": 1.0}, "first_fold_fraction must be in"),
])
def test_bad_parameters_are_rejected_in_fit(params, fragment):
    with pytest.raises(ModelError, match=fragment):
        TwinStack(**params).fit(_noise_runs(n_runs=1))


def test_runs_shorter_than_the_history_say_how_long_a_run_must_be():
    short = synthetic_run(n=20).with_columns(pl.lit("r").alias("run"))
    stack = TwinStack()  # the default bases read 29 samples back
    with pytest.raises(ModelError, match=r"a run needs more than \d+ samples, the longest here "
                                         r"has 20; record longer runs"):
        stack.fit(short)


def test_predict_before_fit_and_wrong_core_count():
    with pytest.raises(ModelError, match="not fitted"):
        TwinStack().predict(_noise_runs(n_runs=1))
    stack = TwinStack(**SEED_PAIR, base_params=FAST, early_stopping_fraction=0).fit(
        _noise_runs(n_runs=1))
    other = synthetic_run(cores=2).with_columns(pl.lit("x").alias("run"))
    with pytest.raises(ContractError, match="trained on 4 cores, the data has 2"):
        stack.predict(other)


@pytest.mark.parametrize("base", ["gbm_l2", "gbm_pooled"])
def test_a_refit_on_the_shared_dataset_equals_a_plain_lightgbm_fit(sample_frame, base):
    """Folds and refits train on subsets of one binned Dataset; on every training row that
    is the very model a plain LightGBM fit of those rows gives."""
    stack = TwinStack(bases=["physics_linear", base], target="cpu_util_core_1",
                      base_params={base: {"n_estimators": 30}}).fit(sample_frame)
    rows = LocalRows(stack, sample_frame)
    X, y = rows.rows(1, np.flatnonzero(rows.valid))
    plain = fit_lgbm({**stack.base_params_[base], "n_jobs": 1}, X, y, rows.mats[1].names)
    np.testing.assert_array_equal(plain.booster_.predict(X), stack.bases_[1].predict(X))


def test_fits_side_by_side_give_the_twin_of_fits_one_after_another(sample_frame):
    bases = ["physics_linear", "gbm_l2", "gbm_pooled"]
    quick = {"n_estimators": 20}
    together = TwinStack(bases=bases, base_params={b: quick for b in bases[1:]}).fit(sample_frame)
    alone = TwinStack(bases=bases, base_params={b: {**quick, "n_jobs": 1} for b in bases[1:]}
                      ).fit(sample_frame)
    rows = LocalRows(together, sample_frame)
    assert rows.threads(together.base_params_) == len(os.sched_getaffinity(0))
    assert rows.threads(alone.base_params_) == 1
    np.testing.assert_array_equal(together.oof_predictions_, alone.oof_predictions_)
    np.testing.assert_array_equal(together.predict(sample_frame), alone.predict(sample_frame))


def test_binning_reads_the_valid_rows_or_lightgbms_sample_of_them(sample_frame):
    """The shared Dataset's bins come from valid rows only (rows without full history
    would give their lags a missing-value bin). Past `bin_construct_sample_cnt` rows they
    come from a seeded sample, and the Dataset holds every row: the matrices are binned
    where they lie, not copied."""
    quick = {"n_estimators": 5, "bin_construct_sample_cnt": 400}
    stack = TwinStack(bases=["physics_linear", "gbm_pooled"],
                      base_params={"gbm_pooled": quick}).fit(sample_frame)
    rows = LocalRows(stack, sample_frame)
    cores = stack.schema_.n_cores
    shaping = dataset_params(stack.base_params_["gbm_pooled"])
    sample = rows._bin_sample(1, shaping)
    assert sample.size == 400 // cores and rows.valid[sample].all() and (np.diff(sample) > 0).all()
    np.testing.assert_array_equal(sample, rows._bin_sample(1, shaping))
    assert not rows.valid.all()
    full, where = rows.binned(1, stack.base_params_["gbm_pooled"], 1)
    assert full.num_data() == rows.valid.size * cores and where is None
    alone = lgb.Dataset(*rows.rows(1, sample), params=shaping).construct()
    assert ([full.feature_num_bin(i) for i in range(full.num_feature())]
            == [alone.feature_num_bin(i) for i in range(alone.num_feature())])
    # below the sample size LightGBM reads every valid row: it bins a copy of those alone
    small, where = rows.binned(1, {**stack.base_params_["gbm_pooled"],
                                   "bin_construct_sample_cnt": 200_000}, 1)
    assert small.num_data() == rows.valid.sum() * cores and (where >= 0).sum() == small.num_data()


def test_the_twins_of_two_cores_share_their_pooled_fits_and_nothing_else(sample_frame):
    """A pooled base learns from every core's rows whatever the target: the twins of
    several cores of one frame fit it once (`evaluate --target all`) and are the twins
    they would be alone."""
    bases = ["physics_linear", "gbm_l2", "gbm_pooled"]
    quick = {b: {"n_estimators": 20} for b in bases[1:]}
    shared = SharedFits()
    together = [TwinStack(bases=bases, target=t, base_params=quick).fit(sample_frame, shared=shared)
                for t in ("cpu_util_core_0", "cpu_util_core_1")]
    alone = [TwinStack(bases=bases, target=t, base_params=quick).fit(sample_frame)
             for t in ("cpu_util_core_0", "cpu_util_core_1")]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_array_equal(a.oof_predictions_, b.oof_predictions_)
        np.testing.assert_array_equal(a.predict(sample_frame), b.predict(sample_frame))
    assert together[0].bases_[2] is together[1].bases_[2]  # the pooled refit, once
    assert together[0].bases_[1] is not together[1].bases_[1]
    other = sample_frame.with_columns(pl.col("cpu_util_core_1") * 0.5)
    with pytest.raises(ModelError, match="one training frame"):
        TwinStack(bases=bases, base_params=quick).fit(other, shared=shared)

