"""The HTTP service, started for real on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import polars as pl
import pytest
import uvicorn

from cputwin.live.serve import create_app
from cputwin.pipeline import train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(twin, **limits):
    """A real uvicorn server for `twin` on a free loopback port, and a client to it."""
    port = _free_port()
    config = uvicorn.Config(create_app(twin, **limits), host="127.0.0.1", port=port,
                            log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield client
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def seed_twin(sample_data, tmp_path_factory):
    twin = tmp_path_factory.mktemp("serve") / "t.cputwin"
    train(sample_data, twin, bases="seed", mode="independent")
    return twin


@pytest.fixture(scope="module")
def server(seed_twin):
    with serving(seed_twin, max_streams=3, stream_ttl_s=60, max_body_bytes=50_000) as client:
        yield client


def _sample(t, core0=10.0, core1=20.0, overall=15.0, workload="idle"):
    return {"timestamp": t, "cpu_util_overall": overall, "cpu_util_core_0": core0,
            "cpu_util_core_1": core1, "workload_type": workload}


def test_health_and_openapi(server):
    health = server.get("/healthz").json()
    assert health["status"] == "ok" and health["mode"] == "independent" and health["cores"] == 2
    spec = server.get("/openapi.json").json()
    assert "/v1/predict" in spec["paths"] and "/v1/streams/{stream_id}/samples" in spec["paths"]
    stream = spec["paths"]["/v1/streams/{stream_id}/samples"]["post"]
    body = stream["requestBody"]["content"]["application/json"]["schema"]
    assert "samples" in body["properties"] and "200" in stream["responses"]


def test_batch_predict(server):
    rows = [_sample(1000 + i * 0.1, core0=i % 50, core1=(3 * i) % 60) for i in range(60)]
    body = server.post("/v1/predict", json={"rows": rows}).json()
    preds = body["predictions"]
    assert len(preds) == 60 and preds[0] is None and preds[-1] is not None


def test_stream_keeps_state_and_reports_verdicts(server):
    results = []
    for i in range(40):
        r = server.post("/v1/streams/s1/samples", json={"samples": [_sample(2000 + i * 0.1)]})
        assert r.status_code == 200, r.text
        results += r.json()["results"]
    assert results[0]["prediction"] is None and results[-1]["prediction"] is not None
    assert {"residual", "score", "alarm", "event"} <= set(results[-1])


@pytest.mark.parametrize(("payload", "status", "fragment"), [
    (b"{not json", 422, "JSON"),
    ({"samples": [{**_sample(1), "cpu_util_overall": "high"}]}, 422, "cpu_util_overall"),
    ({"samples": [{k: v for k, v in _sample(1).items() if k != "cpu_util_core_1"}]}, 422,
     "missing column 'cpu_util_core_1'"),
    ({"samples": [{**_sample(1), "cpu_util_core_2": 5.0}]}, 422, "core count does not match"),
    ({"samples": [_sample(1, core0=140.0)]}, 422, "outside [0, 100]"),
    ({"samples": [{**_sample(1), "cpu_util_overall": -3}]}, 422, "greater than or equal"),
    ({"samples": []}, 422, "at least 1"),
    ({"samples": [_sample(5.0), _sample(4.0)]}, 409, "timestamps must increase"),
])
def test_bad_input_is_a_4xx_with_a_clear_message(server, payload, status, fragment):
    kw = {"content": payload, "headers": {"content-type": "application/json"}} \
        if isinstance(payload, bytes) else {"json": payload}
    r = server.post("/v1/streams/bad/samples", **kw)
    assert r.status_code == status, r.text
    assert fragment in r.text


def test_oversized_body_is_413(server):
    rows = [_sample(i) for i in range(2000)]
    assert server.post("/v1/predict", json={"rows": rows}).status_code == 413


def test_timestamps_going_backwards_across_requests(server):
    assert server.post("/v1/streams/s2/samples", json={"samples": [_sample(10.0)]}).status_code == 200
    r = server.post("/v1/streams/s2/samples", json={"samples": [_sample(9.0)]})
    assert r.status_code == 409


def test_stream_cap_is_429_and_metrics_count(server):
    codes = [server.post(f"/v1/streams/cap{i}/samples", json={"samples": [_sample(1.0)]}).status_code
             for i in range(4)]
    assert 429 in codes
    text = server.get("/metrics").text
    assert "cputwin_requests_total" in text and "cputwin_request_seconds_bucket" in text
    assert "cputwin_streams 3" in text
    assert 'path="/v1/streams/{stream_id}/samples",status="429"' in text


def test_metrics_label_the_documents_by_path_and_unknown_paths_as_unmatched(server):
    assert server.get("/openapi.json").status_code == 200
    assert server.get("/no/such/path").status_code == 404
    text = server.get("/metrics").text
    assert 'path="/openapi.json",status="200"' in text
    assert 'path="unmatched",status="404"' in text
    assert "/no/such/path" not in text


def test_idle_streams_expire_and_free_their_place(seed_twin):
    with serving(seed_twin, max_streams=2, stream_ttl_s=2.0) as client:
        def post(stream_id: str, t: float) -> int:
            return client.post(f"/v1/streams/{stream_id}/samples",
                               json={"samples": [_sample(t)]}).status_code

        assert post("a", 1.0) == 200
        time.sleep(1.2)
        assert post("b", 1.0) == 200
        assert post("c", 1.0) == 429  # at the cap, nothing idle long enough yet
        time.sleep(1.2)  # a idle 2.4 s: expired; b idle 1.2 s: live
        assert post("c", 1.0) == 200
        assert post("b", 0.5) == 409  # b kept its state (its last timestamp)
        assert "cputwin_streams 2" in client.get("/metrics").text


def test_a_stream_carries_its_host_to_a_host_category_twin(tmp_path):
    from cputwin import load_runs
    from cputwin.live.stream import replay
    from cputwin.pipeline import open_twin
    from helpers import synthetic_run, write_run

    for h, host in enumerate(("alpha", "beta")):
        for i in range(2):
            run = synthetic_run(n=250, cores=2, seed=10 * h + i, t0=1e9 + 1e4 * i)
            if host == "beta":  # beta's core 0 runs 30 points hotter: only the host says so
                run = run.with_columns(pl.col("cpu_util_core_0").mul(0.5).add(30))
            write_run(run, tmp_path / "fleet" / host, f"r{i}")
    files = sorted((tmp_path / "fleet").glob("*/*.parquet"))
    twin = tmp_path / "fleet.cputwin"
    train(files, twin, bases=["physics_linear", "gbm_l2"], host_category=True, max_rounds=40)
    run = load_runs(files[0]).head(60)  # alpha's first run
    samples = [dict(zip(["timestamp", "cpu_util_overall", "cpu_util_core_0", "cpu_util_core_1",
                         "workload_type"], row, strict=True)) | {"host": "alpha"}
               for row in run.select("timestamp", "cpu_util_overall", "cpu_util_core_0",
                                     "cpu_util_core_1", "workload_type").rows()]
    stack, _, _ = open_twin(twin)
    expected = replay(stack, run)
    as_beta = [sample | {"host": "beta"} for sample in samples]
    with serving(twin) as client:
        got = client.post("/v1/streams/a/samples", json={"samples": samples}).json()["results"]
        other = client.post("/v1/streams/b/samples", json={"samples": as_beta}).json()["results"]
    served = np.array([np.nan if r["prediction"] is None else r["prediction"] for r in got])
    np.testing.assert_allclose(served, expected, atol=1e-6)  # NaN where history is short
    beta = np.array([np.nan if r["prediction"] is None else r["prediction"] for r in other])
    assert np.nanmean(beta - served) > 2  # the same samples as host beta: the twin expects more


def test_a_twin_that_reads_the_workload_cpu_gets_it_from_each_sample(tmp_path):
    from cputwin import load_runs
    from cputwin.live.stream import replay
    from cputwin.pipeline import open_twin
    from helpers import synthetic_run, write_run

    files = [write_run(synthetic_run(n=300, cores=2, seed=i, t0=1e9 + 1e4 * i), tmp_path, f"r{i}")
             for i in range(3)]
    twin = tmp_path / "wcpu.cputwin"
    train(files, twin, bases="detect_wcpu", mode="independent", max_rounds=30)
    run = load_runs(files[0]).head(50)
    keys = ["timestamp", "cpu_util_overall", "cpu_util_core_0", "cpu_util_core_1",
            "workload_type", "workload_cpu_percent"]
    samples = [dict(zip(keys, row, strict=True)) for row in run.select(keys).rows()]
    stack, _, _ = open_twin(twin)
    expected = replay(stack, run)
    with serving(twin) as client:
        got = client.post("/v1/streams/a/samples", json={"samples": samples})
        assert got.status_code == 200, got.text
        without = [{k: v for k, v in s.items() if k != "workload_cpu_percent"} for s in samples]
        missing = client.post("/v1/streams/b/samples", json={"samples": without[:2]})
        too_much = client.post("/v1/predict", json={"rows": [samples[0] | {
            "workload_cpu_percent": 250.0}]})
        batch = client.post("/v1/predict", json={"rows": samples})
    served = np.array([np.nan if r["prediction"] is None else r["prediction"]
                       for r in got.json()["results"]])
    np.testing.assert_allclose(served, expected, atol=1e-6)  # NaN where history is short
    assert missing.status_code == 422
    assert "missing 'workload_cpu_percent'" in missing.json()["detail"]
    assert too_much.status_code == 422 and "above 200" in too_much.json()["detail"]
    assert batch.status_code == 200, batch.text
