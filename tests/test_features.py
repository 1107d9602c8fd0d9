from __future__ import annotations

import warnings

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cputwin import load_runs
from cputwin.errors import ContractError, FeatureError
from cputwin.features import FeatureSpec, build_features, get_spec
from cputwin.features.engine import WORKLOAD_EXCESS, derive
from cputwin.features.reference import reference_features
from cputwin.telemetry.ingest import DataWarning
from helpers import synthetic_run, with_workload_cpu

WITH_WINDOWS = FeatureSpec(
    name="windows",
    lags={"overall": (1, 3), "other_cores": (2,)},
    windows={"overall": ((5, "mean"), (5, "std")), "other_cores": ((3, "std"),)},
)
SPECS = [get_spec(n) for n in ("v2.0", "v2.3", "physics", "rich", "portable", "pooled",
                                "pooled_wcpu")] + [WITH_WINDOWS]



def _multi_run(n_runs=3, n=80, cores=4):
    return pl.concat([
        synthetic_run(n=n, cores=cores, seed=i, workload=["a", "b"][i % 2]).with_columns(
            pl.lit(f"run{i}").alias("run"))
        for i in range(n_runs)
    ]).select("run", pl.exclude("run"))


def _check_equal_to_reference(frame, spec, target, workloads):
    mat = build_features(frame, spec, target, workloads)
    ref, ref_valid = reference_features(frame.to_pandas(), spec, target, workloads)
    assert mat.names == list(ref.columns)
    np.testing.assert_array_equal(mat.valid, ref_valid)
    np.testing.assert_allclose(mat.X[mat.valid], ref.to_numpy()[mat.valid], rtol=0, atol=1e-9)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_engine_equals_pandas_reference_on_seed_data(seed_data, spec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        frame = load_runs(seed_data)
    if spec.reads_workload_cpu:
        frame = with_workload_cpu(frame)
    _check_equal_to_reference(frame, spec, "cpu_util_core_0", sorted(set(frame["workload_type"])))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_engine_equals_pandas_reference_on_sample(sample_frame, spec):
    wl = sorted(set(sample_frame["workload_type"]))
    _check_equal_to_reference(with_workload_cpu(sample_frame), spec, "cpu_util_core_1", wl)


def test_the_workload_cpu_needs_data_that_has_it(seed_data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        frame = load_runs(seed_data)
    workloads = sorted(set(frame["workload_type"]))
    with pytest.raises(ContractError, match="reads 'workload_cpu_percent'.*seed's data has none"):
        build_features(frame, get_spec("pooled_wcpu"), "cpu_util_core_0", workloads)
    with pytest.raises(ContractError, match="reads 'workload_cpu_percent'"):
        build_features(frame.drop("workload_cpu_percent"), get_spec("pooled_wcpu"),
                       "cpu_util_core_0", workloads)


def test_the_workload_share_the_other_cores_cannot_hold():
    """workload_excess = clip(workload CPU − Σ other cores, 0, 100): on the target."""
    frame = pl.DataFrame({
        "run": ["r"] * 4, "timestamp": [0.0, 0.1, 0.2, 0.3],
        "cpu_util_overall": [50.0, 50.0, 100.0, 0.0],
        "cpu_util_core_0": [100.0, 0.0, 100.0, 0.0], "cpu_util_core_1": [0.0, 100.0, 100.0, 0.0],
        "workload_cpu_percent": [100.0, 100.0, 250.0, None], "workload_type": ["a"] * 4,
    })
    spec = FeatureSpec(name="own", current=("workload_cpu",), workload=False)
    mat = build_features(frame, spec, "cpu_util_core_0", ["a"])
    assert mat.names == ["workload_cpu_percent", "workload_excess"]
    np.testing.assert_array_equal(mat.X[:, 1], [100.0, 0.0, 100.0, np.nan])


@settings(max_examples=30, deadline=None)
@given(n_runs=st.integers(1, 4), n=st.integers(1, 60), cores=st.integers(2, 6),
       target=st.integers(0, 5), spec=st.sampled_from(SPECS))
def test_engine_equals_reference_for_any_runs(n_runs, n, cores, target, spec):
    frame = _multi_run(n_runs, n, cores)
    _check_equal_to_reference(frame, spec, f"cpu_util_core_{target % cores}", ["a", "b"])


def test_no_lag_or_window_crosses_a_run_boundary():
    frame = _multi_run(n_runs=2, n=50)
    mat = build_features(frame, WITH_WINDOWS, "cpu_util_core_0", ["a", "b"])
    second = frame.filter(pl.col("run") == "run1")
    alone = build_features(second, WITH_WINDOWS, "cpu_util_core_0", ["a", "b"])
    rows = (frame["run"] == "run1").to_numpy()
    # run1's features are the same whether or not run0 sits before it in the frame
    np.testing.assert_array_equal(mat.X[rows][alone.valid], alone.X[alone.valid])
    np.testing.assert_array_equal(mat.valid[rows], alone.valid)
    assert not mat.valid[rows][: WITH_WINDOWS.history].any()


def test_target_never_appears_among_inputs():
    frame = _multi_run()
    for spec in SPECS:
        names = build_features(frame, spec, "cpu_util_core_2", ["a", "b"]).names
        assert not any(n.startswith("cpu_util_core_2") for n in names)


def test_seed_sets_have_the_seed_feature_counts(sample_frame):
    frame = _multi_run(cores=8)
    assert len(build_features(frame, get_spec("v2.0"), "cpu_util_core_0", list("abcde")).names) == 48
    assert len(build_features(frame, get_spec("v2.3"), "cpu_util_core_0", list("abcde")).names) == 83


def test_unseen_workload_gets_zeros_and_a_warning():
    frame = _multi_run()
    with pytest.warns(DataWarning, match="not seen in training: b"):
        mat = build_features(frame, get_spec("v2.0"), "cpu_util_core_0", ["a"])
    col = mat.names.index("workload_a")
    b_rows = (frame["workload_type"] == "b").to_numpy()
    assert (mat.X[b_rows, col] == 0).all()


def test_keys_carry_run_and_timestamp():
    frame = _multi_run()
    mat = build_features(frame, get_spec("v2.0"), "cpu_util_core_0", ["a", "b"])
    assert mat.keys.select("run", "timestamp").equals(frame.select("run", "timestamp"))


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"current": ("gpu",)}, "unknown group 'gpu'"),
    ({"lags": {"overall": (0,)}}, "must be >= 1"),
    ({"windows": {"overall": ((1, "mean"),)}}, "length >= 2"),
    ({"windows": {"overall": ((5, "median"),)}}, "statistic in"),
])
def test_bad_specs_are_rejected(kwargs, fragment):
    with pytest.raises(FeatureError, match=fragment):
        FeatureSpec(name="bad", **kwargs)


def test_unknown_builtin_and_spec_round_trip():
    with pytest.raises(FeatureError, match="unknown feature set 'v9'"):
        get_spec("v9")
    assert FeatureSpec.from_dict(WITH_WINDOWS.to_dict()) == WITH_WINDOWS


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_interleaved_runs_give_the_same_features_row_for_row(spec):
    frame = _multi_run(n_runs=3, n=60).with_columns(pl.int_range(pl.len()).alias("i"))
    # round-robin over runs: no run is contiguous, each run keeps its own order
    shuffled = frame.sort(pl.int_range(pl.len()).over("run"), "run")
    a = build_features(frame, spec, "cpu_util_core_0", ["a", "b"])
    b = build_features(shuffled.drop("i"), spec, "cpu_util_core_0", ["a", "b"])
    order = shuffled["i"].to_numpy()
    np.testing.assert_array_equal(a.valid[order], b.valid)
    np.testing.assert_allclose(a.X[order][b.valid], b.X[b.valid], rtol=0, atol=1e-12)


def test_float32_matrix_is_the_float64_one_rounded_once(sample_frame):
    sample_frame = with_workload_cpu(sample_frame)
    wl = sorted(set(sample_frame["workload_type"]))
    for spec in SPECS:
        wide = build_features(sample_frame, spec, "cpu_util_core_0", wl)
        narrow = build_features(sample_frame, spec, "cpu_util_core_0", wl, dtype=np.float32)
        assert narrow.X.dtype == np.float32
        np.testing.assert_array_equal(narrow.X, wide.X.astype(np.float32))


def test_large_frames_written_by_threads_equal_the_reference():
    # enough cells for the threaded writer (PARALLEL_CELLS), several runs and workloads
    from cputwin.features.engine import PARALLEL_CELLS

    frame = _multi_run(n_runs=16, n=2500, cores=6)
    spec = get_spec("v2.3")
    n_columns = len(build_features(frame.head(40), spec, "cpu_util_core_3", ["a", "b"]).names)
    assert frame.height * n_columns >= PARALLEL_CELLS
    _check_equal_to_reference(frame, spec, "cpu_util_core_3", ["a", "b"])


def test_host_categories_are_one_hot_columns_like_the_reference():
    frame = _multi_run(n_runs=4, n=50).with_columns(
        pl.when(pl.col("run").is_in(["run0", "run1"])).then(pl.lit("alpha"))
        .otherwise(pl.lit("beta")).alias("host"))
    spec = FeatureSpec(name="h", lags={"other_cores": (1,)}, host=True)
    mat = build_features(frame, spec, "cpu_util_core_0", ["a", "b"], hosts=["alpha", "beta"])
    ref, _ = reference_features(frame.to_pandas(), spec, "cpu_util_core_0", ["a", "b"],
                                hosts=["alpha", "beta"])
    assert {"host_alpha", "host_beta"} <= set(mat.names)
    assert mat.names == list(ref.columns)
    np.testing.assert_array_equal(mat.X[mat.valid], ref.to_numpy()[mat.valid])
    alpha = mat.X[:, mat.names.index("host_alpha")]
    assert alpha.sum() == 100 and set(alpha.tolist()) == {0.0, 1.0}
    # an unseen host (or no host column at all) has every host column at zero
    bare = build_features(frame.drop("host"), spec, "cpu_util_core_0", ["a", "b"],
                          hosts=["alpha", "beta"])
    assert not bare.X[:, [bare.names.index("host_alpha"), bare.names.index("host_beta")]].any()


utilisation = st.one_of(st.floats(0, 100), st.sampled_from([0.0, 100.0, 12.5]))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), width=st.integers(1, 9), rows=st.integers(1, 6))
def test_derived_columns_are_bitwise_what_numpy_clip_mean_std_give(data, width, rows):
    """`derive` spells np.clip / mean / std / min / max out as ufuncs (their wrappers cost
    more than a live tick's arithmetic): the values must stay the very same bits, or twins
    saved before would see other features."""
    others = np.array(data.draw(st.lists(st.lists(utilisation, min_size=width, max_size=width),
                                         min_size=rows, max_size=rows)))
    overall = np.array(data.draw(st.lists(utilisation, min_size=rows, max_size=rows)))
    own = np.array(data.draw(st.lists(st.floats(0, 200), min_size=rows, max_size=rows)))
    out = derive(overall, others, width + 1, own)
    physics = (width + 1) * overall - others.sum(axis=1)
    np.testing.assert_array_equal(out["physics_clipped"], np.clip(physics, 0.0, 100.0))
    np.testing.assert_array_equal(out[WORKLOAD_EXCESS],
                                  np.clip(own - others.sum(axis=1), 0.0, 100.0))
    np.testing.assert_array_equal(out["others_mean"], others.mean(axis=1))
    np.testing.assert_array_equal(out["others_std"], others.std(axis=1))
    np.testing.assert_array_equal(out["others_min"], others.min(axis=1))
    np.testing.assert_array_equal(out["others_max"], others.max(axis=1))
