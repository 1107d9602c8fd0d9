"""Alarm raises and clears POSTed to a webhook as Alertmanager-compatible JSON.

Each event is a one-alert list in the format of Alertmanager's `POST /api/v2/alerts`
(labels alertname, stream, core, host; annotations; startsAt; endsAt on a clear), so the
URL can be an Alertmanager itself or any receiver that reads that format. Sending happens
on a background thread: the caller (a stream update, a watch tick) only appends to a
bounded queue; when the receiver is slow or down the oldest events are dropped and
counted, never the caller blocked.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from datetime import UTC, datetime
from typing import Any

ALERT_NAME = "CputwinAlarm"


def _rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


class AlertSender:
    """Posts alarm events to `url` from a daemon thread, with retry and backoff.

    max_queue: events waiting at most; a new event beyond it drops the oldest (`dropped`).
    retries: further attempts after a failed POST (connection error, 5xx, 429), waiting
    backoff_s, 2 × backoff_s, ... between them; an event that still fails is `failed`.
    counters: optional prometheus_client Counters `sent`, `dropped`, `failed` to keep in step.
    """

    def __init__(self, url: str, max_queue: int = 1000, retries: int = 4,
                 backoff_s: float = 0.5, timeout_s: float = 5.0,
                 counters: dict[str, Any] | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"alert webhook must be an http(s) URL, not {url!r}")
        self.url, self.retries, self.backoff_s, self.timeout_s = url, retries, backoff_s, timeout_s
        self.queue: deque[list[dict]] = deque()
        self.max_queue = max_queue
        self.counts = {"sent": 0, "dropped": 0, "failed": 0}
        self.counters = counters or {}
        self.raised: dict[tuple[str, str], str] = {}  # (stream, core) -> startsAt of its alarm
        self.cond = threading.Condition()
        self.closing = False
        self.busy = False
        self.thread = threading.Thread(target=self._run, name="cputwin-alerts", daemon=True)
        self.thread.start()

    def event(self, kind: str, stream: str, core: str, host: str,
              annotations: dict[str, Any] | None = None, at: float | None = None) -> None:
        """Queue one alarm `kind` ("raise" or "clear") of `core` in `stream`."""
        now = _rfc3339(time.time() if at is None else at)
        key = (stream, core)
        alert: dict[str, Any] = {
            "labels": {"alertname": ALERT_NAME, "stream": stream, "core": core,
                       "host": host or "unknown"},
            "annotations": {k: str(v) for k, v in (annotations or {}).items()},
        }
        if kind == "raise":
            self.raised[key] = alert["startsAt"] = now
        else:
            alert["startsAt"] = self.raised.pop(key, now)
            alert["endsAt"] = now
        self._put([alert])

    def forget(self, stream: str) -> None:
        """Drop the raise times of an expired stream (bounded memory)."""
        for key in [k for k in self.raised if k[0] == stream]:
            del self.raised[key]

    def _put(self, body: list[dict]) -> None:
        with self.cond:
            if len(self.queue) >= self.max_queue:
                self.queue.popleft()
                self._count("dropped")
            self.queue.append(body)
            self.cond.notify()

    def _count(self, name: str) -> None:
        self.counts[name] += 1
        if name in self.counters:
            self.counters[name].inc()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if not self.queue:
                    return
                body = self.queue.popleft()
                self.busy = True
            self._count("sent" if self._deliver(body) else "failed")
            with self.cond:
                self.busy = False
                self.cond.notify_all()

    def _deliver(self, body: list[dict]) -> bool:
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s):
                    return True
            except urllib.error.HTTPError as exc:
                if exc.code < 500 and exc.code != 429:
                    return False  # the receiver refuses this event: retrying will not help
            except (urllib.error.URLError, OSError):
                pass
            if self.closing:
                return False
        return False

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued event is delivered or given up; True if all went."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while self.queue or self.busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (within `timeout_s`), then stop the thread."""
        self.flush(timeout_s)
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.thread.join(1.0)


def tick_events(sender: AlertSender, stream: str, host: str, tick,
                detectors: dict[str, Any], timestamp: float | None = None) -> None:
    """Queue every core's raise/clear of one tick (`Tick.cores`); `detectors` (by core,
    `OnlineTwin.detectors`) give each alert its core's threshold."""
    for core in tick.cores:
        if core.event:
            threshold = getattr(detectors.get(core.target), "threshold", None)
            sender.event(core.event, stream, core.target, host, {
                "summary": f"{core.target} of {host or stream} departs from its twin",
                "score": core.score, "residual": core.residual,
                "prediction": core.prediction, "threshold": threshold,
                "sample_timestamp": timestamp})
