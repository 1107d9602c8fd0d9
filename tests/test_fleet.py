"""Many hosts at once: `train --per-host` and `evaluate --per-host`, one after another, in
local processes (-j) and on a Dask LocalCluster, with hosts that fail beside hosts that
train. Hosts are made from the embedded sample (real recorded runs)."""

from __future__ import annotations

import json
import os

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from cputwin.cli import app
from cputwin.evaluation.summary import Headline, TargetsSummary
from cputwin.models.cluster import THREAD_VARIABLES, run_each
from cputwin.pipeline import fleet_scores

runner = CliRunner()
FAST = ["--bases", "physics_linear,gbm_l2", "--max-rounds", "40"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def fleet(sample_data, tmp_path_factory):
    """alpha: the sample; beta: the sample with noise and its two cores swapped; broken:
    a file that is not parquet; short: runs too short to stack."""
    root = tmp_path_factory.mktemp("fleet")
    rng = np.random.default_rng(0)
    for path in sorted(sample_data.glob("*.parquet")):
        frame = pl.read_parquet(path)  # written again without the collector's host name
        (root / "alpha").mkdir(exist_ok=True)
        frame.write_parquet(root / "alpha" / path.name)
        noise = rng.normal(0, 2, frame.height)
        swapped = frame.with_columns(
            pl.col("cpu_util_core_1").alias("cpu_util_core_0"),
            (pl.col("cpu_util_core_0") + noise).clip(0, 100).alias("cpu_util_core_1"))
        (root / "beta").mkdir(exist_ok=True)
        swapped.write_parquet(root / "beta" / path.name)
        (root / "short").mkdir(exist_ok=True)
        frame.head(12).write_parquet(root / "short" / path.name)
    (root / "broken").mkdir()
    (root / "broken" / "run.parquet").write_bytes(b"not a parquet file")
    return root


def _files(root):
    return sorted(str(p) for p in root.glob("*/*.parquet"))


@pytest.mark.parametrize("how", [[], ["-j", "2"], ["--dask", "local:2"]],
                         ids=["sequential", "jobs2", "dask2"])
def test_train_per_host_keeps_every_good_host_when_others_fail(fleet, tmp_path, how):
    out = tmp_path / "twins"
    result = run("train", *_files(fleet), "-o", out, "--per-host", *how, *FAST, "--json")
    assert result.exit_code == 1, result.output
    body = json.loads(result.stdout)
    assert set(body["hosts"]) == {"alpha", "beta"}
    assert set(body["failed"]) == {"broken", "short"}
    assert "history the feature sets need" in body["failed"]["short"]
    assert body["failed"]["broken"].startswith(str(fleet / "broken" / "run.parquet"))
    assert sorted(p.name for p in out.iterdir()) == ["alpha.cputwin", "beta.cputwin"]
    for host in ("alpha", "beta"):
        assert body["hosts"][host]["out_of_fold"]["stack"]["r2"] > 0.5
        pred = run("predict", out / f"{host}.cputwin", fleet / host, "-o",
                   tmp_path / f"{host}.parquet", "--json")
        assert pred.exit_code == 0, pred.output


def test_parallel_hosts_train_the_same_twins_as_sequential(fleet, tmp_path):
    good = [f for f in _files(fleet) if "/alpha/" in f or "/beta/" in f]
    one = json.loads(run("train", *good, "-o", tmp_path / "a", "--per-host", *FAST,
                         "--json").stdout)
    two = run("train", *good, "-o", tmp_path / "b", "--per-host", "-j", "2", *FAST, "--json")
    assert two.exit_code == 0, two.output
    for host, res in json.loads(two.stdout)["hosts"].items():
        assert res["out_of_fold"] == one["hosts"][host]["out_of_fold"]
    assert json.loads(two.stdout)["failed"] == {}


def test_evaluate_per_host_shows_each_host_and_the_fleet(fleet, tmp_path):
    result = run("evaluate", *_files(fleet), "--per-host", "-j", "2", *FAST, "--json")
    assert result.exit_code == 1, result.output
    body = json.loads(result.stdout)
    assert set(body["hosts"]) == {"alpha", "beta"} and set(body["failed"]) == {"broken", "short"}
    fleet_ = body["fleet"]
    r2 = {h: s["r2"]["stack"] for h, s in body["hosts"].items()}
    assert fleet_["hosts"] == 2 and fleet_["failed"] == 2
    assert fleet_["r2"]["median"] == pytest.approx(np.median(list(r2.values())))
    assert fleet_["worst"][0] == {"host": min(r2, key=r2.get), "r2": min(r2.values())}
    text = run("evaluate", *_files(fleet), "--per-host", *FAST)
    assert text.exit_code == 1
    assert "fleet R²: median" in text.stdout
    assert "host broken failed:" in text.stdout and "host short failed:" in text.stdout


def test_jobs_needs_per_host(fleet, tmp_path):
    alpha = fleet / "alpha"
    for cmd in (["train", alpha, "-o", tmp_path / "t.cputwin"], ["evaluate", alpha]):
        result = run(*cmd, "-j", "2", *FAST)
        assert result.exit_code == 2 and result.stderr.strip() == (
            "error: --jobs runs hosts side by side: it needs --per-host")


def test_fleet_scores_name_the_worst_hosts():
    summaries = {h: TargetsSummary(targets={}, mean=Headline(r, 1.0, 2.0))
                 for h, r in {"a": 0.9, "b": 0.5, "c": 0.8, "d": float("nan")}.items()}
    got = fleet_scores(summaries, failed=1, n_worst=2)
    assert got.r2.median == pytest.approx(0.8)
    assert [w.host for w in got.worst] == ["b", "c"]
    assert got.hosts == 4 and got.failed == 1
    assert got.to_dict()["worst"] == [{"host": "b", "r2": 0.5}, {"host": "c", "r2": 0.8}]


def _thread_pools(threads: int | None = None) -> tuple:
    """In a worker: the threads it was given, and the sizes of its libraries' pools."""
    import polars
    from threadpoolctl import threadpool_info

    return threads, polars.thread_pool_size(), {i["user_api"]: i["num_threads"]
                                                for i in threadpool_info()}


def test_jobs_workers_share_the_cores_out():
    before = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    got = run_each(_thread_pools, {"a": (), "b": ()}, jobs=2)
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    for threads, polars_pool, pools in got.values():
        assert threads == polars_pool == share
        assert pools["blas"] == pools["openmp"] == share  # numpy's BLAS, LightGBM's OpenMP
    assert {k: os.environ.get(k) for k in THREAD_VARIABLES} == before
