"""The alarm webhook: Alertmanager JSON to a real HTTP receiver on loopback."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cputwin.live.alerts import AlertSender


@contextmanager
def receiver(fail_first: int = 0, hold: threading.Event | None = None):
    """An HTTP server on a free loopback port that records each POSTed body; it answers
    503 to the first `fail_first` requests and, given `hold`, waits on it before answering."""
    got: list = []
    calls = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            calls["n"] += 1
            if hold is not None:
                hold.wait(10)
            if calls["n"] <= fail_first:
                self.send_response(503)
            else:
                got.append((self.path, self.headers["Content-Type"], json.loads(body)))
                self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api/v2/alerts", got, calls
    finally:
        if hold is not None:
            hold.set()
        server.shutdown()
        server.server_close()


def _wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_raise_then_a_clear_arrive_as_alertmanager_alerts():
    with receiver() as (url, got, _):
        sender = AlertSender(url)
        sender.event("raise", "web1", "cpu_util_core_3", "host-a", {"score": 7.5})
        sender.event("clear", "web1", "cpu_util_core_3", "host-a", {"score": 0.4})
        assert sender.flush(10)
        sender.close()
    assert [p for p, _, _ in got] == ["/api/v2/alerts"] * 2
    assert {ct for _, ct, _ in got} == {"application/json"}
    (raised,), (cleared,) = (body for _, _, body in got)
    labels = {"alertname": "CputwinAlarm", "stream": "web1", "core": "cpu_util_core_3",
              "host": "host-a"}
    assert raised["labels"] == labels and cleared["labels"] == labels
    assert raised["annotations"]["score"] == "7.5"
    assert "endsAt" not in raised and cleared["startsAt"] == raised["startsAt"]
    assert cleared["endsAt"] >= cleared["startsAt"] and cleared["endsAt"].endswith("Z")
    assert sender.counts == {"sent": 2, "dropped": 0, "failed": 0}


def test_a_failing_receiver_is_retried_with_backoff():
    with receiver(fail_first=2) as (url, got, calls):
        sender = AlertSender(url, retries=3, backoff_s=0.05)
        sender.event("raise", "s", "c", "h")
        assert sender.flush(10)
        sender.close()
    assert calls["n"] == 3 and len(got) == 1 and sender.counts["sent"] == 1


def test_an_unreachable_receiver_gives_up_and_counts_it():
    with receiver() as (url, _, _):
        pass  # closed: nothing listens there any more
    sender = AlertSender(url, retries=1, backoff_s=0.01, timeout_s=1)
    sender.event("raise", "s", "c", "h")
    assert sender.flush(10)
    sender.close()
    assert sender.counts == {"sent": 0, "dropped": 0, "failed": 1}


def test_a_full_queue_drops_the_oldest_and_counts_it():
    hold = threading.Event()
    with receiver(hold=hold) as (url, got, calls):
        sender = AlertSender(url, max_queue=3)
        sender.event("raise", "s", "c0", "h")  # taken by the thread, held by the receiver
        _wait_for(lambda: calls["n"] == 1)
        start = time.perf_counter()
        for i in range(1, 11):
            sender.event("raise", "s", f"c{i}", "h")
        # the caller never waits for the receiver, which holds its answer for 10 s
        assert time.perf_counter() - start < 3
        assert sender.counts["dropped"] == 7
        hold.set()
        assert sender.flush(10)
        sender.close()
    assert [body[0]["labels"]["core"] for _, _, body in got] == ["c0", "c8", "c9", "c10"]


def test_a_url_that_is_not_http_is_refused():
    with pytest.raises(ValueError, match="http"):
        AlertSender("ftp://example/alerts")


@pytest.fixture(scope="module")
def seed_twin(sample_data, tmp_path_factory):
    from cputwin.pipeline import train

    twin = tmp_path_factory.mktemp("alerts") / "t.cputwin"
    train(sample_data, twin, bases="seed", mode="independent")
    return twin


def _samples(n: int, busy: range, t0: float = 1000.0) -> list[dict]:
    """Idle samples, with core 0 at 95 % over `busy` while the rest stays idle."""
    out = []
    for i in range(n):
        c0 = 95.0 if i in busy else 10.0
        out.append({"timestamp": t0 + i * 0.1, "cpu_util_overall": (c0 + 12) / 2,
                    "cpu_util_core_0": c0, "cpu_util_core_1": 12.0, "workload_type": "idle",
                    "host": "box-7"})
    return out


def test_serve_posts_each_alarm_raise_and_clear_to_the_webhook(seed_twin):
    from test_serve import serving

    with receiver() as (url, got, _), serving(seed_twin, alert_webhook=url) as client:
        results = []
        for sample in _samples(120, range(40, 70)):
            r = client.post("/v1/streams/web1/samples", json={"samples": [sample]})
            assert r.status_code == 200, r.text
            results += r.json()["results"]
        events = [(r["cores"]["cpu_util_core_0"]["event"]) for r in results if r["event"]]
        assert events == ["raise", "clear"], events
        # the sender posts from its own thread, and counts a post once it is answered
        _wait_for(lambda: "cputwin_alert_webhook_sent_total 2.0" in client.get("/metrics").text)
        metrics = client.get("/metrics").text
    assert 'cputwin_alarms_total{core="cpu_util_core_0",stream="web1"} 1.0' in metrics
    assert "cputwin_alert_webhook_sent_total 2.0" in metrics
    raised, cleared = (body[0] for _, _, body in got)
    assert raised["labels"] == {"alertname": "CputwinAlarm", "stream": "web1",
                                "core": "cpu_util_core_0", "host": "box-7"}
    assert "endsAt" not in raised and cleared["endsAt"] >= cleared["startsAt"]
    assert float(raised["annotations"]["score"]) > float(raised["annotations"]["threshold"])


def test_watch_refuses_a_webhook_that_is_not_http(seed_twin):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "cputwin", "watch", str(seed_twin), "--seconds",
                        "0.5", "--alert-webhook", "mailto:ops"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith("error: --alert-webhook")


def test_watch_sends_through_the_webhook_and_stops_cleanly(seed_twin):
    import subprocess
    import sys

    with receiver() as (url, _, _):
        r = subprocess.run([sys.executable, "-m", "cputwin", "watch", str(seed_twin), "--seconds",
                            "1", "--alert-webhook", url, "--json"], capture_output=True, text=True,
                           timeout=60)
    assert r.returncode == 0, r.stderr
    assert 0 < json.loads(r.stdout)["ticks"] <= 10  # 1 s at 10 Hz; a stalled tick is skipped
