"""The online engine is the batch engine, one sample at a time."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cputwin import TwinStack, load_runs
from cputwin.features import BUILTIN_SPECS, build_features
from cputwin.features.engine import compile_spec
from cputwin.features.online import OnlineFeatures
from cputwin.live.stream import replay
from cputwin.models import BUILTIN_BASES
from cputwin.telemetry.ingest import DataWarning
from helpers import synthetic_run, with_workload_cpu, write_run

FAST = {name: {"n_estimators": 25} for name in BUILTIN_BASES}


@pytest.mark.parametrize("spec", list(BUILTIN_SPECS.values()), ids=lambda s: s.name)
@pytest.mark.parametrize("mode", ["sensor", "independent"])
def test_online_features_equal_batch_features(sample_frame, spec, mode):
    spec = spec.for_mode(mode)
    sample_frame = with_workload_cpu(sample_frame)
    own = sample_frame["workload_cpu_percent"].fill_null(float("nan")).to_numpy()
    target = "cpu_util_core_1"
    workloads = sorted(set(sample_frame["workload_type"]))
    batch = build_features(sample_frame, spec, target, workloads)
    compiled = compile_spec(spec, target, ["cpu_util_core_0", "cpu_util_core_1"], workloads)
    cores = sample_frame.select("cpu_util_core_0", "cpu_util_core_1").to_numpy()
    overall = sample_frame["cpu_util_overall"].to_numpy()
    runs = sample_frame["run"].to_list()
    online, current = None, None
    for i, wl in enumerate(sample_frame["workload_type"].to_list()):
        if runs[i] != current:
            online, current = OnlineFeatures(compiled), runs[i]
        x = online.update(cores[i], overall[i], wl, workload_cpu=own[i])
        assert (x is not None) == batch.valid[i]
        if x is not None:
            np.testing.assert_allclose(x, batch.X[i], rtol=0, atol=1e-9)


def _check_replay(frame, stack):
    batch = stack.predict(frame)
    online = replay(stack, frame)
    np.testing.assert_array_equal(np.isnan(batch), np.isnan(online))
    ok = ~np.isnan(batch)
    assert ok.sum() > 0
    np.testing.assert_allclose(online[ok], batch[ok], rtol=0, atol=1e-6)


@pytest.mark.parametrize("bases", ["seed", "twin"])
def test_replayed_sample_matches_batch_predictions(sample_frame, bases):
    stack = TwinStack(bases=bases, base_params=FAST, meta_model="auto",
                      early_stopping_fraction=0).fit(sample_frame)
    _check_replay(sample_frame, stack)


def test_replayed_seed_data_matches_batch_predictions(seed_data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        frame = load_runs(seed_data)
    stack = TwinStack(bases="twin", base_params=FAST, meta_model="per_workload",
                      early_stopping_fraction=0).fit(frame)
    _check_replay(frame, stack)


def test_replayed_twin_reading_the_workload_cpu_matches_batch(sample_frame):
    frame = with_workload_cpu(sample_frame)
    stack = TwinStack(bases="detect_wcpu", base_params=FAST, meta_model="auto",
                      mode="independent", early_stopping_fraction=0).fit(frame)
    _check_replay(frame, stack)


def test_replayed_fleet_matches_batch_with_host_categories(tmp_path):
    for h, host in enumerate(("alpha", "beta")):
        for i in range(2):
            write_run(synthetic_run(n=250, cores=3, seed=10 * h + i, t0=1e9 + 1e4 * i),
                      tmp_path / host, f"r{i}")
    frame = load_runs(sorted(tmp_path.glob("*/*.parquet")))
    stack = TwinStack(bases=["physics_linear", "gbm_l2"], base_params=FAST, meta_model="nnls",
                      early_stopping_fraction=0, host_category=True).fit(frame)
    assert stack.hosts_ == ["alpha", "beta"]
    assert {"host_alpha", "host_beta"} <= set(stack.bases_[1].feature_names)
    _check_replay(frame, stack)
