"""The HTTP service, started for real on a free loopback port."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import polars as pl
import pytest
import uvicorn

from cputwin import load_runs
from cputwin.live.serve import create_app
from cputwin.pipeline import open_twin, train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(twin, app=None, **limits):
    """A real uvicorn server for `twin` (or `app`) on a free loopback port, and a client."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the server's own socket: no other process can take the port
    port = sock.getsockname()[1]
    config = uvicorn.Config(app or create_app(twin, **limits), host="127.0.0.1", port=port,
                            log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield client
    srv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def seed_twin(sample_data, tmp_path_factory):
    twin = tmp_path_factory.mktemp("serve") / "t.cputwin"
    train(sample_data, twin, bases="seed", mode="independent")
    return twin


@pytest.fixture(scope="module")
def server(seed_twin):
    with serving(seed_twin, max_streams=3, stream_ttl_s=60, max_body_bytes=50_000) as client:
        yield client


@pytest.fixture(scope="module")
def roomy(seed_twin):
    """A server whose stream cap the tests below do not reach."""
    with serving(seed_twin, max_streams=1000, stream_ttl_s=60, max_body_bytes=50_000) as client:
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
    ref = stream["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
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
    assert "cputwin_streams 3.0" in text
    assert 'path="/v1/streams/{stream_id}/samples",status="429"' in text


def test_metrics_label_the_documents_by_path_and_unknown_paths_as_unmatched(server):
    assert server.get("/openapi.json").status_code == 200
    assert server.get("/no/such/path").status_code == 404
    text = server.get("/metrics").text
    assert 'path="/openapi.json",status="200"' in text
    assert 'path="unmatched",status="404"' in text
    assert "/no/such/path" not in text


def test_idle_streams_expire_and_free_their_place(seed_twin):
    with serving(seed_twin, max_streams=2, stream_ttl_s=3.0) as client:
        def post(stream_id: str, t: float) -> int:
            return client.post(f"/v1/streams/{stream_id}/samples",
                               json={"samples": [_sample(t)]}).status_code

        assert post("a", 1.0) == 200
        time.sleep(2.0)
        assert post("b", 1.0) == 200
        assert post("c", 1.0) == 429  # at the cap, nothing idle long enough yet
        time.sleep(2.0)  # a idle 4 s: expired; b idle 2 s: live (1 s either side of the TTL)
        assert post("c", 1.0) == 200
        assert post("b", 0.5) == 409  # b kept its state (its last timestamp)
        text = client.get("/metrics").text
        assert "cputwin_streams 2.0" in text
        assert 'stream="a"' not in text and 'stream="b"' in text  # a's series went with it


def test_a_stream_carries_its_host_to_a_host_category_twin(tmp_path):
    from cputwin.live.stream import replay
    from cputwin.pipeline import open_twin
    from helpers import synthetic_run, write_run

    for h, host in enumerate(("alpha", "beta")):
        for i in range(2):
            run = synthetic_run(n=250, cores=2, seed=10 * h + i, t0=1e9 + 1e4 * i)
            if host == "beta":  # beta's core 0 runs 30 points hotter: only the host says so
                run = run.with_columns(pl.col("cpu_util_core_0").mul(0.5).add(30)).with_columns(
                    pl.mean_horizontal("cpu_util_core_0", "cpu_util_core_1")
                    .alias("cpu_util_overall"))
            write_run(run, tmp_path / "fleet" / host, f"r{i}")
    files = sorted((tmp_path / "fleet").glob("*/*.parquet"))
    twin = tmp_path / "fleet.cputwin"
    train(files, twin, bases=["physics_linear", "gbm_l2"], host_category=True, max_rounds=40,
          mode="independent")
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


# --- hardening (issue 17) and Prometheus metrics (issue 16) ---------------------------------

def _strict_json(text: str):
    """JSON as the standard defines it: NaN and Infinity are not numbers there."""
    def refuse(token: str):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_predict_answers_in_request_order(roomy):
    rows = [_sample(1000 + i * 0.1, core0=i % 50, core1=(3 * i) % 60) for i in range(60)]
    forward = roomy.post("/v1/predict", json={"rows": rows}).json()["predictions"]
    backward = roomy.post("/v1/predict", json={"rows": rows[::-1]}).json()["predictions"]
    assert backward == forward[::-1]
    assert forward[0] is None and backward[-1] is None  # the first in time has no history


def test_a_machine_twin_predicts_every_core_in_request_order(sample_data, tmp_path):
    twin = tmp_path / "machine.cputwin"
    train(sample_data, twin, bases=["physics_pooled", "gbm_pooled"], target="all",
          mode="independent", max_rounds=30)
    run = load_runs(sample_data).head(60)
    rows = run.drop("run", "host", strict=False).to_dicts()
    stack, _, _ = open_twin(twin)
    expected = stack.predict(run)
    with serving(twin) as client:
        r = client.post("/v1/predict", json={"rows": rows[::-1]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["target"] == "all" and body["predictions"] is None
    assert list(body["cores"]) == ["cpu_util_core_0", "cpu_util_core_1"]
    for i, values in enumerate(body["cores"].values()):
        got = np.array([np.nan if v is None else v for v in values[::-1]])
        np.testing.assert_allclose(got, expected[:, i], rtol=1e-9)
        assert np.isnan(got[0]) and np.isfinite(got[-1])


def test_a_gap_longer_than_the_history_starts_the_stream_history_again(roomy):
    # a skipped tick or two (0.5 s) is no gap; an hour is: the lags would be of another time
    first = [_sample(5000 + i * 0.1 + (0.4 if i >= 20 else 0)) for i in range(40)]
    r = roomy.post("/v1/streams/gap/samples", json={"samples": first}).json()
    assert r["results"][-1]["prediction"] is not None and "warnings" not in r
    later = [_sample(8600 + i * 0.1, core0=i % 40) for i in range(40)]
    r = roomy.post("/v1/streams/gap/samples", json={"samples": later}).json()
    assert len(r["warnings"]) == 1 and "its history starts again" in r["warnings"][0]
    fresh = roomy.post("/v1/streams/fresh/samples", json={"samples": later}).json()
    assert [x["prediction"] for x in r["results"]] == [x["prediction"] for x in fresh["results"]]
    assert r["results"][0]["prediction"] is None


def test_a_stream_says_once_which_labels_the_twin_never_saw(roomy):
    def send(t0: float, workload: str) -> dict:
        samples = [_sample(t0 + i * 0.1, workload=workload) for i in range(5)]
        return roomy.post("/v1/streams/labels/samples", json={"samples": samples}).json()

    assert "warnings" not in send(7000, "idle")
    first = send(7001, "batch")
    assert len(first["warnings"]) == 1
    assert "stream 'labels': workload labels not seen in training: batch" in first["warnings"][0]
    assert "warnings" not in send(7002, "batch")  # said once per stream


def test_predict_with_a_repeated_timestamp_is_a_422(roomy):
    rows = [_sample(1000 + i * 0.1) for i in range(30)] + [_sample(1000.5)]
    r = roomy.post("/v1/predict", json={"rows": rows})
    assert r.status_code == 422 and "same timestamp" in r.json()["detail"]


@pytest.mark.parametrize("raw", [
    b'{"samples": [{"timestamp": NaN, "cpu_util_overall": 1, "cpu_util_core_0": 1, '
    b'"cpu_util_core_1": 1, "workload_type": "idle"}]}',
    b'{"samples": [{"timestamp": 1e999, "cpu_util_overall": 1, "cpu_util_core_0": 1, '
    b'"cpu_util_core_1": 1, "workload_type": "idle"}]}',
    b'{"samples": [{"timestamp": Infinity, "cpu_util_overall": 1, "cpu_util_core_0": 1, '
    b'"cpu_util_core_1": 1, "workload_type": "idle"}]}',
    b'{"samples": [{"timestamp": 5, "cpu_util_overall": NaN, "cpu_util_core_0": 1, '
    b'"cpu_util_core_1": 1, "workload_type": "idle"}]}',
    b'{"samples": [{"timestamp": 5, "cpu_util_overall": 1, "cpu_util_core_0": Infinity, '
    b'"cpu_util_core_1": 1, "workload_type": "idle"}]}',
    b'{"samples": [{"timestamp": 5, "cpu_util_overall": 1, "cpu_util_core_0": 1, '
    b'"cpu_util_core_1": 1, "workload_type": "idle", "workload_cpu_percent": NaN}]}',
])
@pytest.mark.parametrize("route", ["/v1/streams/nan/samples", "/v1/predict"])
def test_non_finite_numbers_are_a_422_in_json_and_never_wedge_a_stream(roomy, raw, route):
    body = raw.replace(b'"samples"', b'"rows"') if route == "/v1/predict" else raw
    r = roomy.post(route, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    _strict_json(r.text)
    if route.startswith("/v1/streams"):  # the stream still takes an ordinary sample
        ok = roomy.post(route, json={"samples": [_sample(time.time())]})
        assert ok.status_code == 200, ok.text
        _strict_json(ok.text)


@pytest.mark.parametrize("route", ["/v1/streams/utf/samples", "/v1/predict"])
def test_a_body_that_is_not_utf8_is_a_4xx(roomy, route):
    body = b'{"samples": [{"workload_type": "\xff\xfe"}]}'
    r = roomy.post(route, content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    _strict_json(r.text)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_the_posts_refuse_bodies_not_sent_as_json(roomy, content_type):
    body = json.dumps({"samples": [_sample(1.0)]}).encode()
    headers = {"content-type": content_type} if content_type else {}
    for route in ("/v1/streams/ct/samples", "/v1/predict"):
        client = roomy.build_request("POST", route, content=body, headers=headers)
        if content_type is None:
            client.headers.pop("content-type", None)
        r = roomy.send(client)
        assert r.status_code == 415, (route, r.text)


def test_a_500_is_counted_in_the_metrics(seed_twin):
    app = create_app(seed_twin)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a handler that fails")

    with serving(seed_twin, app=app) as client:
        assert client.get("/boom").status_code == 500
        text = httpx.get(f"{client.base_url}/metrics").text  # uvicorn closed that connection
    assert 'cputwin_requests_total{path="/boom",status="500"} 1.0' in text


def test_unseen_labels_come_back_as_warnings_in_the_response(roomy):
    rows = [_sample(1000 + i * 0.1, workload="never\nseen") for i in range(30)]
    body = roomy.post("/v1/predict", json={"rows": rows}).json()
    assert any("never\\nseen" in w for w in body["warnings"]), body["warnings"]
    quiet = roomy.post("/v1/predict", json={"rows": [_sample(1000 + i * 0.1) for i in range(30)]})
    assert quiet.json()["warnings"] == []  # nothing carried over from the request before


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_openapi_document_is_self_consistent(roomy):
    doc = roomy.get("/openapi.json").json()
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"], f"dangling {ref}"
    stream = doc["paths"]["/v1/streams/{stream_id}/samples"]["post"]["responses"]
    assert {"200", "409", "413", "415", "422", "429"} <= set(stream)
    assert {"413", "415", "422"} <= set(doc["paths"]["/v1/predict"]["post"]["responses"])
    sample = doc["components"]["schemas"]["Sample"]
    assert {"cpu_util_core_0", "cpu_util_core_1"} <= set(sample["required"])
    assert sample["properties"]["cpu_util_core_1"]["maximum"] == 100
    for page in ("/docs", "/redoc"):  # they would load assets from a CDN: not served
        assert roomy.get(page).status_code == 404


def test_metrics_pass_promtool_or_the_prometheus_parser(roomy):
    for i in range(25):
        assert roomy.post("/v1/streams/prom/samples",
                           json={"samples": [_sample(5000 + i * 0.1, core0=(7 * i) % 90)]}
                           ).status_code == 200
    text = roomy.get("/metrics").text
    for family in ("cputwin_requests_total", "cputwin_request_seconds", "cputwin_streams",
                   "cputwin_observed", "cputwin_prediction", "cputwin_residual", "cputwin_score",
                   "cputwin_alarm", "cputwin_blind", "cputwin_alarms_total"):
        name = family.removesuffix("_total")
        assert f"# HELP {name}" in text and f"# TYPE {name}" in text, family
    assert 'cputwin_prediction{core="cpu_util_core_0",stream="prom"}' in text
    assert 'cputwin_alarms_total{core="cpu_util_core_0",stream="prom"} 0.0' in text
    _check_metrics_text(text)


def _check_metrics_text(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool:
        r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
    else:
        from prometheus_client.parser import text_string_to_metric_families

        assert list(text_string_to_metric_families(text))


def test_stream_results_list_every_watched_core(roomy):
    results = []
    for i in range(30):
        r = roomy.post("/v1/streams/cores/samples", json={"samples": [_sample(9000 + i * 0.1)]})
        results += r.json()["results"]
    assert results[0]["cores"] == {}
    last = results[-1]
    assert set(last["cores"]) == set(roomy.get("/healthz").json()["targets"])
    core = last["cores"]["cpu_util_core_0"]
    assert core["prediction"] == last["prediction"] and core["alarm"] == last["alarm"]


def test_a_large_batch_does_not_hold_up_other_clients(seed_twin):
    samples = [_sample(1e6 + i * 0.1, core0=(7 * i) % 90) for i in range(7000)]
    with serving(seed_twin, max_body_bytes=5_000_000) as client:
        done = threading.Event()
        took = {}

        def big() -> None:
            start = time.perf_counter()
            with httpx.Client(base_url=client.base_url, timeout=60) as other:
                other.post("/v1/streams/big/samples", json={"samples": samples})
            took["batch"] = time.perf_counter() - start
            done.set()

        threading.Thread(target=big).start()
        time.sleep(0.05)
        waits = []
        while not done.is_set():
            start = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            waits.append(time.perf_counter() - start)
        assert took["batch"] > 0.3, "the batch is too quick to show anything on this machine"
        # held up for the whole batch, a client would wait about as long as the batch; on a
        # busy 2-core machine one wait may still catch a long GIL-holding step of the batch
        assert len(waits) >= 3, waits
        assert max(waits) < took["batch"] / 2, (max(waits), took["batch"])
        assert sorted(waits)[len(waits) // 2] < took["batch"] / 10, (waits, took["batch"])


def _cli_server(twin, *args, env=None):
    """`cputwin serve` in its own process on a free port: (process, base URL)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cputwin", "serve", str(twin), "--port",
                             str(port), *args], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    first = proc.stderr.readline()
    assert f"http://127.0.0.1:{port}" in first, first  # its address, printed at start
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            httpx.get(f"{url}/healthz", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    return proc, url


def test_serve_logs_warnings_as_they_happen_in_one_line_each(seed_twin):
    proc, url = _cli_server(seed_twin)
    try:
        rows = [_sample(1000 + i * 0.1, workload="odd\nlabel") for i in range(30)]
        for _ in range(3):
            assert httpx.post(f"{url}/v1/predict", json={"rows": rows}).status_code == 200
        lines = [proc.stderr.readline() for _ in range(3)]  # while it still runs
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert all("odd\\nlabel" in line and line.endswith("\n") for line in lines), lines


@contextmanager
def _stalled_client(url: str):
    """A connection that sent half a request body and then nothing."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as stalled:
        stalled.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Content-Type: application/json"
                        b"\r\nContent-Length: 1000\r\n\r\n{\"rows\": [")
        time.sleep(0.3)
        yield


def test_a_stalled_client_does_not_hold_shutdown_and_a_second_sigterm_exits(seed_twin):
    proc, url = _cli_server(seed_twin)
    with _stalled_client(url):
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        finally:
            proc.kill()
    assert time.monotonic() - start < 5


def test_a_stalled_client_is_dropped_after_the_graceful_timeout(seed_twin):
    from cputwin.live.serve import GRACEFUL_SHUTDOWN_S

    proc, url = _cli_server(seed_twin)
    with _stalled_client(url):
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(GRACEFUL_SHUTDOWN_S + 10)
        finally:
            proc.kill()
    assert time.monotonic() - start < GRACEFUL_SHUTDOWN_S + 5


@pytest.mark.parametrize(("args", "fragment"), [
    (["--port", "99999"], "port must be in 1..65535"),
    (["--port", "0"], "port must be in 1..65535"),
    (["--max-body", "-1"], "max_body_bytes must be positive"),
    (["--max-streams", "0"], "max_streams must be positive"),
    (["--stream-ttl", "-5"], "stream_ttl_s must be positive"),
    (["--alert-webhook", "ftp://x"], "--alert-webhook must be an http(s) URL"),
])
def test_serve_refuses_bad_options_in_one_line(seed_twin, args, fragment):
    r = subprocess.run([sys.executable, "-m", "cputwin", "serve", str(seed_twin), *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error:") and fragment in r.stderr


def test_serve_refuses_a_taken_port_in_one_line(seed_twin):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "cputwin", "serve", str(seed_twin), "--port",
                            str(port)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: cannot listen on"), r.stderr


def test_a_token_guards_every_route_but_healthz(seed_twin):
    proc, url = _cli_server(seed_twin, env={"CPUTWIN_TOKEN": "s3cret"})
    try:
        sample = {"samples": [_sample(1.0)]}
        assert httpx.get(f"{url}/healthz").status_code == 200
        for method, path, kw in (("POST", "/v1/streams/t/samples", {"json": sample}),
                                 ("GET", "/metrics", {}), ("GET", "/openapi.json", {})):
            assert httpx.request(method, f"{url}{path}", **kw).status_code == 401
            wrong = {"authorization": "Bearer nope"}
            assert httpx.request(method, f"{url}{path}", headers=wrong, **kw).status_code == 401
            right = {"authorization": "Bearer s3cret"}
            assert httpx.request(method, f"{url}{path}", headers=right, **kw).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_on_loopback_only_loopback_names_and_allowed_hosts_are_answered(seed_twin):
    # A page on evil.example whose name is rebound to 127.0.0.1 reaches the server with
    # "Host: evil.example": refused. A reverse proxy's own name is allowed by option.
    proc, url = _cli_server(seed_twin, "--allowed-host", "twin.internal")
    port = url.rsplit(":", 1)[1]
    try:
        for name, status in (("evil.example", 400), (f"evil.example:{port}", 400),
                             (f"localhost:{port}", 200), (f"127.0.0.1:{port}", 200),
                             (f"[::1]:{port}", 200), ("twin.internal", 200),
                             ("TWIN.internal:443", 200)):
            answer = httpx.get(f"{url}/metrics", headers={"host": name})
            assert answer.status_code == status, (name, answer.text)
        refused = httpx.post(f"{url}/v1/predict", json={"rows": [_sample(1.0)]},
                             headers={"host": "evil.example"})
        assert refused.status_code == 400 and "--allowed-host" in refused.json()["detail"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_allowed_hosts_follow_the_bound_address():
    from cputwin.live.serve import allowed_hosts, host_name

    assert set(allowed_hosts("127.0.0.1", [])) >= {"localhost", "127.0.0.1", "::1"}
    assert "proxy" in allowed_hosts("::1", ["proxy"])
    assert allowed_hosts("0.0.0.0", []) is None  # public: the token guards it
    assert allowed_hosts("0.0.0.0", ["twin.example"]) == ["twin.example"]
    assert [host_name(h) for h in (b"[::1]:80", b"Example.COM:8000", b"", b"::1")] == [
        "::1", "example.com", "", "::1"]


def _bench_serve():
    """bench/serve.py by path (bench/ on sys.path would shadow dask with bench/dask.py)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize("saturated", [False, True])
def test_the_serve_bench_names_its_load_generator_and_refuses_a_saturated_clients_figure(
        monkeypatch, capsys, saturated, as_json):
    bench = _bench_serve()
    measured = {"requests": 24_000, "seconds": 24.0, "updates_per_s": 987.0, "p50_ms": 1.9,
                "p99_ms": 4.2, "errors": 0, "client": "httpx", "client_cpu": 0.97 if saturated
                else 0.4, "saturated": saturated, "server_cpu": 0.6, "concurrency": 2,
                "bases": "seed", "target": "cpu_util_core_0", "cores": 2, "watched_cores": 1}
    monkeypatch.setattr(bench, "run", lambda *_, **__: dict(measured))
    monkeypatch.setattr(sys, "argv", ["serve.py", *(["--json"] if as_json else [])])
    bench.main()
    out = capsys.readouterr().out
    if as_json:
        got = json.loads(out)
        assert got["client"] == "httpx" and got["saturated"] is saturated
        figures = [got[k] for k in ("updates_per_s", "p50_ms", "p99_ms")]
        assert figures == ([None] * 3 if saturated else [987.0, 1.9, 4.2])
    else:
        assert "client httpx" in out
        assert ("no server figure" in out) is saturated
        assert ("987" in out) is not saturated  # the client's own rate is never shown as the server's
