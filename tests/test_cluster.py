"""Fitting on a Dask LocalCluster: runs stay whole, the twin matches one machine's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("distributed", reason="Dask is an optional extra: pip install 'cputwin[dask]'")

from cputwin.evaluation.protocols import evaluate_honest  # noqa: E402
from cputwin.models.cluster import connect, fit_on_dask, partition_by_run  # noqa: E402
from cputwin.pipeline import make_stack  # noqa: E402

BASES = ["physics_linear", "gbm_l2", "gbm_pooled"]


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 50), min_size=1, max_size=20), parts=st.integers(1, 8))
def test_partitions_hold_whole_runs_in_order(lengths, parts):
    frame = pl.DataFrame({"run": np.repeat([f"r{i}" for i in range(len(lengths))], lengths),
                          "x": np.arange(sum(lengths))})
    pieces = partition_by_run(frame, parts)
    assert pl.concat(pieces).equals(frame)
    assert len(pieces) <= parts
    seen = [set(p["run"].to_list()) for p in pieces]
    assert all(a.isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1:])


@pytest.fixture(scope="module")
def client():
    with connect("local:2") as c:
        yield c


def _pools() -> dict[str, int]:
    """In a worker: its Polars, BLAS (numpy's) and OpenMP (LightGBM's) pool sizes."""
    import lightgbm  # noqa: F401 (loads OpenMP)
    import polars
    from threadpoolctl import threadpool_info

    return {"polars": polars.thread_pool_size(),
            **{i["user_api"]: i["num_threads"] for i in threadpool_info()}}


def test_local_workers_run_every_library_on_one_thread(client):
    for pools in client.run(_pools).values():
        assert pools == {"polars": 1, "blas": 1, "openmp": 1}


def test_dask_twin_scores_within_0_01_of_one_machine(sample_frame, client):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        here, _ = evaluate_honest(sample_frame, make_stack(bases=BASES, max_rounds=150))
        there, stack = evaluate_honest(
            sample_frame, make_stack(bases=BASES, max_rounds=150),
            fit=lambda st, fr, pr=None: fit_on_dask(st, fr, client, pr, n_parts=3))
    assert there.summary.r2["stack"] == pytest.approx(here.summary.r2["stack"], abs=0.01)
    assert stack.fold_plan_ and stack.oof_predictions_.shape[1] == len(BASES)
    assert here.summary.rows == there.summary.rows


def _crash_rank_0_at_round(n: int, once: str) -> None:
    """In a worker: this process kills itself with SIGSEGV at the n-th boosting round it
    runs as rank 0 of LightGBM's network (as LightGBM's network training now and then does),
    so its peer loses the socket mid-fit; only the first worker to create the file `once`."""
    import signal

    import lightgbm

    update, rounds = lightgbm.Booster.update, []

    def crashing(self, *args, **kwargs):
        machines, port = self.params.get("machines", ""), self.params.get("local_listen_port")
        if machines.split(",")[0].endswith(f":{port}"):
            rounds.append(1)
            if len(rounds) == n and _created(once):
                os.kill(os.getpid(), signal.SIGSEGV)
        return update(self, *args, **kwargs)

    lightgbm.Booster.update = crashing


def _created(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def test_a_fit_goes_on_when_a_worker_crashes_in_lightgbm(sample_frame, tmp_path):
    bases = ["physics_linear", "gbm_l2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        here, _ = evaluate_honest(sample_frame, make_stack(bases=bases, max_rounds=60))
    with connect("local:2") as crashing:
        before = set(crashing.run(os.getpid).values())
        crashing.run(_crash_rank_0_at_round, 20, str(tmp_path / "crashed"))
        with pytest.warns(RuntimeWarning, match="a Dask worker died while fitting gbm_l2"):
            there, _ = evaluate_honest(
                sample_frame, make_stack(bases=bases, max_rounds=60),
                fit=lambda st, fr, pr=None: fit_on_dask(st, fr, crashing, pr, n_parts=3))
        assert set(crashing.run(os.getpid).values()) != before  # one really died
    assert there.summary.r2["stack"] == pytest.approx(here.summary.r2["stack"], abs=0.01)
    assert here.summary.rows == there.summary.rows


def test_fold_plan_on_dask_is_the_local_one(sample_frame, client):
    local = make_stack(bases=["physics_linear"]).fit(sample_frame)
    remote = fit_on_dask(make_stack(bases=["physics_linear"]), sample_frame, client, n_parts=4)
    for a, b in zip(local.fold_plan_, remote.fold_plan_, strict=True):
        np.testing.assert_array_equal(a["train"], b["train"])
        np.testing.assert_array_equal(a["predict"], b["predict"])
    np.testing.assert_allclose(local.oof_predictions_, remote.oof_predictions_, atol=1e-9)


def test_cli_train_on_a_local_cluster_gives_an_ordinary_twin(sample_data, tmp_path):
    twin = tmp_path / "t.cputwin"
    cmd = [sys.executable, "-m", "cputwin", "train", str(sample_data), "-o", str(twin),
           "--bases", "physics_linear,gbm_l2", "--max-rounds", "60", "--dask", "local:2", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["twin"] == str(twin)  # stdout is one JSON object
    pred = subprocess.run([sys.executable, "-m", "cputwin", "predict", str(twin), str(sample_data),
                           "-o", str(tmp_path / "p.parquet"), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert pred.returncode == 0, pred.stderr
    assert json.loads(pred.stdout)["scores"]["r2"] > 0.8


def test_bad_dask_address_is_one_line(sample_data):
    cmd = [sys.executable, "-m", "cputwin", "train", str(sample_data), "-o", "x.cputwin",
           "--dask", "local:zero"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "local:N" in done.stderr
