"""The HTTP service, started for real on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn

from cputwin.live.serve import create_app
from cputwin.pipeline import train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(sample_data, tmp_path_factory):
    twin = tmp_path_factory.mktemp("serve") / "t.cputwin"
    train(sample_data, twin, bases="seed", mode="independent")
    port = _free_port()
    config = uvicorn.Config(create_app(twin, max_streams=3, stream_ttl_s=60, max_body_bytes=50_000),
                            host="127.0.0.1", port=port, log_level="warning")
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


def _sample(t, core0=10.0, core1=20.0, overall=15.0, workload="idle"):
    return {"timestamp": t, "cpu_util_overall": overall, "cpu_util_core_0": core0,
            "cpu_util_core_1": core1, "workload_type": workload}


def test_health_and_openapi(server):
    health = server.get("/healthz").json()
    assert health["status"] == "ok" and health["mode"] == "independent" and health["cores"] == 2
    spec = server.get("/openapi.json").json()
    assert "/v1/predict" in spec["paths"] and "/v1/streams/{stream_id}/samples" in spec["paths"]


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
    assert 'status="429"' in text
