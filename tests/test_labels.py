"""Telemetry without workload labels, labelled and unlabelled runs mixed, and the rate a
twin works at: end to end through the CLI on the embedded sample, labels removed."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from cputwin import load_runs
from cputwin.cli import app
from cputwin.models import TwinStack
from cputwin.pipeline import make_stack, open_twin
from cputwin.telemetry.ingest import DataWarning, resample
from cputwin.telemetry.schema import UNLABELLED
from helpers import synthetic_run, write_run

runner = CliRunner()
FAST = ("--bases", "physics_linear,gbm_portable", "--max-rounds", "30")  # portable: runs here


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _copy(src: Path, dst: Path, change) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.parquet")):
        change(pl.read_parquet(path)).write_parquet(dst / path.name)
    return dst


@pytest.fixture(scope="module")
def unlabelled(sample_data, tmp_path_factory) -> Path:
    return _copy(sample_data, tmp_path_factory.mktemp("unlabelled"),
                 lambda f: f.drop("workload_type"))


@pytest.fixture(scope="module")
def twins(sample_data, unlabelled, tmp_path_factory) -> dict[str, Path]:
    """A twin trained without labels and one trained with them."""
    folder = tmp_path_factory.mktemp("twins")
    out = {}
    for name, data in (("unlabelled", unlabelled), ("labelled", sample_data)):
        out[name] = folder / f"{name}.cputwin"
        result = run("train", data, "-o", out[name], *FAST, "--json")
        assert result.exit_code == 0, result.output
    return out


def test_evaluate_without_labels_scores_one_unlabelled_workload(unlabelled):
    result = run("evaluate", unlabelled, *FAST, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert set(summary["per_workload"]) == {UNLABELLED}
    assert summary["r2"]["stack"] > 0.5
    timing = summary["timing"]
    assert timing["step_s"] == pytest.approx(0.1, abs=1e-3)
    assert timing["rate_hz"] == pytest.approx(10, abs=0.1)
    for span in ("history", "longest_lag", "longest_window"):
        assert timing[span]["seconds"] == round(timing[span]["samples"] * timing["step_s"], 3)
    assert timing["history"]["samples"] >= max(timing["longest_lag"]["samples"],
                                               timing["longest_window"]["samples"] - 1)
    table = run("evaluate", unlabelled, *FAST)
    assert table.exit_code == 0
    assert "unlabelled" in table.stdout
    assert f"history {timing['history']['samples']} samples = " in table.stdout


def test_a_twin_trained_without_labels_records_its_rate_and_calibrates(twins, unlabelled):
    stack, detector, _ = open_twin(twins["unlabelled"])
    assert stack.workloads_ == [UNLABELLED]
    assert stack.step_s_ == pytest.approx(0.1, abs=1e-3)
    assert stack.sample_rate_hz_ == pytest.approx(10, abs=0.1)
    assert UNLABELLED in detector.scale  # its own calibration, as any workload with the rows
    out = run("predict", twins["unlabelled"], unlabelled, "-o",
              twins["unlabelled"].with_suffix(".parquet"), "--json")
    assert out.exit_code == 0, out.output
    assert "warning" not in out.stderr
    assert json.loads(out.stdout)["scores"]["r2"] > 0.5


def test_train_prints_what_the_history_covers(twins, unlabelled, tmp_path):
    result = run("train", unlabelled, "-o", tmp_path / "t.cputwin", *FAST)
    assert result.exit_code == 0, result.output
    assert "history " in result.stdout and " s (longest lag " in result.stdout
    assert "one sample every 0.1 s (10 Hz)" in result.stdout


@pytest.mark.parametrize(("twin", "data", "says"), [
    ("labelled", "unlabelled", "samples without a label are 'unlabelled', and this twin was "
                               "trained on labelled runs"),
    ("unlabelled", "labelled", "this twin was trained without labels: leave them out"),
])
def test_labels_a_twin_never_saw_warn_once_and_still_predict(twins, sample_data, unlabelled,
                                                             tmp_path, twin, data, says):
    path = {"labelled": sample_data, "unlabelled": unlabelled}[data]
    out = run("predict", twins[twin], path, "-o", tmp_path / "p.parquet", "--json")
    assert out.exit_code == 0, out.output
    assert out.stderr.count("not seen in training") == 1
    assert says in out.stderr
    assert json.loads(out.stdout)["predicted"] > 0


def test_mixed_labelled_and_unlabelled_runs_train_as_categories(sample_data, unlabelled, tmp_path):
    mixed = tmp_path / "mixed"
    _copy(sample_data, mixed / "labelled", lambda f: f)
    for path in sorted(unlabelled.glob("*.parquet")):
        pl.read_parquet(path).write_parquet(mixed / "labelled" / f"u_{path.name}")
    frame = load_runs(mixed / "labelled")
    assert UNLABELLED in set(frame["workload_type"])
    result = run("evaluate", mixed / "labelled", *FAST, "--json")
    assert result.exit_code == 0, result.output
    per_workload = json.loads(result.stdout)["per_workload"]
    assert {UNLABELLED, "cpu_bound", "idle"} <= set(per_workload)


def test_a_twin_file_without_a_rate_still_loads(twins):
    stack, _, _ = open_twin(twins["labelled"])
    data = stack.to_dict()
    assert data["step_s"] == pytest.approx(0.1, abs=1e-3)
    del data["step_s"]  # as written before the rate was recorded
    old = TwinStack.from_dict(data)
    assert old.step_s_ is None and old.sample_rate_hz_ is None
    assert old.time_span()["history"]["seconds"] is None


def test_a_twin_at_1hz_works_at_1hz_and_warns_on_10hz_data(tmp_path):
    for i in range(3):  # 250 s each at 10 Hz: 250 samples at 1 Hz
        write_run(synthetic_run(n=2500, cores=2, seed=i, t0=1e9 + 1e4 * i), tmp_path, f"r{i}")
    frame = load_runs(tmp_path)
    slow = resample(frame, 1.0)
    assert frame.height / 11 < slow.height < frame.height / 9
    stack = make_stack(bases=["physics_linear", "gbm_portable"], max_rounds=30).fit(slow)
    assert stack.step_s_ == pytest.approx(1.0, abs=0.01)
    assert stack.time_span()["history"]["seconds"] == pytest.approx(stack.history_, abs=0.05)
    with pytest.warns(DataWarning, match=r"data sampled every 0\.1 s, this twin's training "
                                         r"data every 1 s"):
        stack.predict(frame)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        assert np.isfinite(stack.predict(slow)).any()


@pytest.mark.parametrize(("twin", "warned"), [("unlabelled", False), ("labelled", True)])
def test_watch_without_a_workload_samples_unlabelled(twins, twin, warned):
    result = run("watch", twins[twin], "--seconds", "1", "--json")
    assert result.exit_code == 0, result.output
    assert ("samples without a label are 'unlabelled'" in result.stderr) is warned
    assert json.loads(result.stdout)["ticks"] >= 5
