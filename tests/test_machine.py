"""A machine twin: one file, pooled bases, every core watched."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cputwin import TwinStack
from cputwin.errors import ModelError
from cputwin.live.detector import Detector, calibrate
from cputwin.live.stream import OnlineTwin, replay
from cputwin.models import BUILTIN_BASES
from cputwin.models.meta import LinearMeta
from helpers import synthetic_run

FAST = {name: {"n_estimators": 30} for name in BUILTIN_BASES}


@pytest.fixture(scope="module")
def machine(sample_frame):
    return TwinStack(bases="detect", target="all", mode="independent", meta_model="auto",
                     base_params=FAST).fit(sample_frame)


def test_a_machine_twin_watches_every_core_with_one_model_set(machine, sample_frame):
    assert machine.targets_ == ["cpu_util_core_0", "cpu_util_core_1"]
    pred = machine.predict(sample_frame)
    assert pred.shape == (sample_frame.height, 2)
    # the same pooled bases predict each core: core 1's column is what a twin of core 1
    # built from the very same models and meta-model gives
    np.testing.assert_array_equal(pred[:, 1], machine.predict_core(sample_frame, "cpu_util_core_1"))
    ok = ~np.isnan(pred).any(axis=1)
    assert ok.sum() > 0.8 * sample_frame.height
    assert np.all((pred[ok] >= 0) & (pred[ok] <= 100))


def test_the_online_machine_twin_is_the_batch_one_on_every_core(machine, sample_frame):
    batch = machine.predict(sample_frame)
    online = replay(machine, sample_frame)
    assert online.shape == batch.shape
    np.testing.assert_allclose(online, batch, atol=1e-6, equal_nan=True)


def test_a_tick_names_every_core_and_each_core_has_its_detector(machine, sample_frame):
    detectors = calibrate(machine, sample_frame)
    assert set(detectors) == set(machine.targets_)
    twin = OnlineTwin(machine, detector=detectors)
    stream = twin.stream()
    cores = sample_frame.select(machine.targets_).to_numpy()
    ticks = [stream.update(cores[i], float(sample_frame["cpu_util_overall"][i]),
                           sample_frame["workload_type"][i]) for i in range(60)]
    last = ticks[-1]
    assert [c.target for c in last.cores] == machine.targets_
    assert all(c.score is not None for c in last.cores)
    assert last.prediction == last.cores[0].prediction


def test_a_machine_twin_needs_pooled_bases(sample_frame):
    with pytest.raises(ModelError, match="pool across cores; not pooled: physics_linear"):
        TwinStack(bases=["physics_linear", "gbm_pooled"], target="all",
                  base_params=FAST).fit(sample_frame)


RUN = [sys.executable, "-m", "cputwin"]


@pytest.fixture(scope="module")
def machine_file(sample_data, tmp_path_factory):
    """A machine twin trained by the CLI, and what `train --json` said."""
    twin = tmp_path_factory.mktemp("machine") / "machine.cputwin"
    done = subprocess.run([*RUN, "train", str(sample_data), "--target", "all", "--mode",
                           "independent", "--bases", "detect", "--max-rounds", "30", "-o",
                           str(twin), "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return twin, json.loads(done.stdout)


def test_a_machine_twin_file_round_trips_through_the_cli(tmp_path, sample_data, machine_file):
    twin, result = machine_file
    run = RUN
    assert set(result["detector"]) == {"cpu_util_core_0", "cpu_util_core_1"}
    for core in result["detector"].values():
        assert core["power"]["*"] > 0
    assert set(result["out_of_fold"]["per_core"]) == {"cpu_util_core_0", "cpu_util_core_1"}
    out = tmp_path / "p.parquet"
    done = subprocess.run([*run, "predict", str(twin), str(sample_data), "-o", str(out),
                           "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    table = pl.read_parquet(out)
    for k in (0, 1):
        assert {f"twin_cpu_util_core_{k}", f"residual_cpu_util_core_{k}"} <= set(table.columns)
    assert set(json.loads(done.stdout)["scores"]) == {"cpu_util_core_0", "cpu_util_core_1"}


def test_an_eight_core_machine_twin_predicts_each_core(tmp_path):
    frame = pl.concat([synthetic_run(300, cores=8, seed=s, workload=w).with_columns(
        pl.lit(f"r{s}").alias("run")) for s, w in ((0, "a"), (1, "b"), (2, "a"))])
    from cputwin import load_runs

    for i, part in enumerate(frame.partition_by("run")):
        part.drop("run").write_parquet(tmp_path / f"r{i}.parquet")
    data = load_runs(tmp_path)
    twin = TwinStack(bases="detect", target="all", mode="independent", base_params=FAST).fit(data)
    assert twin.predict(data).shape == (data.height, 8)
    assert len(calibrate(twin, data)) == 8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4), min_size=2, max_size=2),
       st.floats(-500, 500), st.lists(st.floats(-3, 3), min_size=2, max_size=2))
def test_a_twin_value_is_a_utilisation_on_both_paths(p, intercept, weights):
    meta = LinearMeta("ridge", ["a", "b"], {"*": np.array(weights)}, {"*": intercept})
    batch = meta.predict(np.array([p]))[0]
    assert 0.0 <= batch <= 100.0
    assert meta.predict_one(p, "w") == pytest.approx(batch, abs=1e-9)


def test_detector_files_without_durations_keep_their_ticks():
    old = Detector(threshold=3.0, centre={"*": 0.0}, scale={"*": 3.0}, raise_ticks=5).to_dict()
    old.update(old.pop("settings"))  # as files kept settings beside the fitted state
    for name in ("smoothing_s", "raise_s", "clear_s", "rate_hz", "power", "smoother",
                 "window_s", "window_ticks"):
        old.pop(name)
    det = Detector.from_dict(old)
    assert (det.alpha, det.raise_ticks, det.clear_ticks) == (0.3, 5, 10)
    assert det.settings.smoother == "ewma"


def test_serve_answers_for_every_core_of_a_machine_twin(machine_file, sample_frame):
    from test_serve import serving

    twin, _ = machine_file
    cores = ["cpu_util_core_0", "cpu_util_core_1"]
    with serving(twin) as client:
        health = client.get("/healthz").json()
        assert health["targets"] == cores and set(health["detectors"]) == set(cores)
        for detector in health["detectors"].values():
            assert detector["threshold"] > 0 and detector["power"]["*"] > 0
        rows = sample_frame.head(40).select("timestamp", "cpu_util_overall", *cores).to_dicts()
        # no workload label: the sample is of the unlabelled workload
        answer = client.post("/v1/streams/m/samples", json={"samples": rows})
        assert answer.status_code == 200, answer.text
        last = answer.json()["results"][-1]
        assert set(last["cores"]) == set(cores)
        assert all(c["prediction"] is not None for c in last["cores"].values())
        metrics = client.get("/metrics").text
        for core in cores:
            assert f'cputwin_score{{core="{core}",stream="m"}}' in metrics


def test_an_opened_twin_names_its_parts_and_still_unpacks(machine_file):
    from cputwin import Twin, open_twin

    path, _ = machine_file
    twin = open_twin(path)
    assert isinstance(twin, Twin) and twin.stack.machine_
    assert set(twin.detectors) == {"cpu_util_core_0", "cpu_util_core_1"}
    stack, detector, payload = twin  # the older (stack, detector, payload) form
    assert stack is twin.stack and detector is twin.detector and "detectors" in payload


def test_the_plain_machine_twin_command_works_and_says_what_sensor_mode_cannot_see(
        tmp_path, sample_data):
    twin = tmp_path / "m.cputwin"
    done = subprocess.run([*RUN, "train", str(sample_data), "--target", "all", "-o", str(twin),
                           "--max-rounds", "20", "--json"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "sensor mode" in done.stderr and "independent mode" in done.stderr
    from cputwin import open_twin

    stack = open_twin(twin).stack
    assert stack.machine_ and [b.name for b in stack.base_specs_][0] == "physics_pooled"
