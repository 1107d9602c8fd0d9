"""Evaluation summaries are typed objects; the JSON they render to keeps its keys."""

from __future__ import annotations

import json
import math

import numpy as np

from cputwin.evaluation.metrics import score_table, scores
from cputwin.evaluation.summary import (
    ComparisonSummary,
    Headline,
    MetaSummary,
    OutOfFold,
    PredictResult,
    ProtocolSummary,
    Rows,
    TargetsSummary,
)

KEYS = ["protocol", "target", "mode", "bases", "rows", "r2", "mae", "rmse", "per_workload",
        "meta", "verdict"]


def summary(**changes) -> ProtocolSummary:
    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 5.0])
    pred = {"a": y + 0.5, "stack": y}
    table = score_table({n: y for n in pred}, pred,
                        {"a": np.array(["w1"] * 3 + ["w2"] * 3),
                         "stack": np.array(["w1"] * 6)})
    fields = dict(protocol="honest", target="cpu_util_core_0", mode="sensor", bases=["a"],
                  rows=Rows(train=10, test=6), **vars(table),
                  meta=MetaSummary(kind="best", weights={"a": 1.0}, intercept=0.0),
                  verdict="R² 1.0000")
    return ProtocolSummary(**{**fields, **changes})


def test_a_summary_renders_only_the_fields_it_has():
    plain = summary().to_dict()
    assert list(plain) == KEYS  # per_host, notes, timing… only where they exist
    assert plain["rows"] == {"train": 10, "test": 6}
    assert plain["meta"] == {"kind": "best", "weights": {"a": 1.0}, "intercept": 0.0}
    assert plain["per_workload"]["w1"]["rows"] == 6
    assert list(summary(timing={"rate_hz": 10}).to_dict())[-1] == "timing"
    json.dumps(plain)  # plain data all the way down


def test_a_model_without_rows_in_a_group_scores_nan_there():
    group = summary().per_workload["w2"]
    assert set(group.r2) == {"a"}  # the stack was scored on w1's rows only
    assert math.isnan(group.score("r2", "stack")) and group.score("mae", "a") == 0.5


def test_the_three_evaluate_shapes_and_their_headline():
    one = summary()
    both = ComparisonSummary(seed=summary(protocol="seed"), honest=one, audit={"x": 1},
                             compares="seed against honest")
    every = TargetsSummary(targets={"cpu_util_core_0": one}, mean=Headline(0.5, 1.0, 2.0))
    assert list(both.to_dict()) == ["seed", "honest", "audit", "compares"]
    assert list(every.to_dict()) == ["targets", "mean"]
    assert every.to_dict()["mean"] == {"r2": 0.5, "mae": 1.0, "rmse": 2.0}
    assert both.headline() == one.headline() == Headline(1.0, 0.0, 0.0)


def test_out_of_fold_scores_render_flat():
    y = np.arange(10.0)
    oof = OutOfFold(models={"a": scores(y, y), "stack": scores(y, y + 1)},
                    per_core={"cpu_util_core_0": scores(y, y)})
    plain = oof.to_dict()
    assert list(plain) == ["a", "stack", "per_core"]
    assert plain["stack"] == {"r2": plain["stack"]["r2"], "mae": 1.0, "rmse": 1.0, "n": 10}
    assert "per_core" not in OutOfFold(models=oof.models).to_dict()


def test_predict_renders_one_cores_scores_flat_and_a_machines_per_core():
    y = np.arange(10.0)
    one = PredictResult(predictions="p.parquet", target="cpu_util_core_0", mode="sensor",
                        rows=12, predicted=10, scores={"cpu_util_core_0": scores(y, y)})
    assert list(one.to_dict()) == ["predictions", "target", "mode", "rows", "predicted",
                                   "scores"]
    assert one.to_dict()["scores"]["n"] == 10
    cores = ["cpu_util_core_0", "cpu_util_core_1"]
    machine = PredictResult(predictions="p.parquet", target="all", cores=cores,
                            mode="independent", rows=12, predicted=10,
                            scores={c: scores(y, y) for c in cores})
    assert list(machine.to_dict()["scores"]) == cores
    assert "scores" not in PredictResult(predictions="p.parquet", target="all", cores=cores,
                                         mode="independent", rows=1, predicted=0).to_dict()


def test_predict_with_a_machine_twin_prints_each_cores_scores(sample_data, tmp_path):
    from typer.testing import CliRunner

    from cputwin.cli import app

    twin, runner = tmp_path / "m.cputwin", CliRunner()
    trained = runner.invoke(app, ["train", str(sample_data), "--target", "all", "--mode",
                                  "independent", "--bases", "detect", "--max-rounds", "10",
                                  "-o", str(twin)])
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["predict", str(twin), str(sample_data),
                                 "-o", str(tmp_path / "p.parquet")])
    assert result.exit_code == 0, result.output
    scored = [line for line in result.stdout.splitlines() if "against the measured core" in line]
    assert [line.split(": against the measured core: R² ")[0] for line in scored] == [
        "cpu_util_core_0", "cpu_util_core_1"]
