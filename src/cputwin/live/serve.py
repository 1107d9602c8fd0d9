"""The twin as an HTTP service (FastAPI): batch predictions and live streams.

    POST /v1/predict                       rows of one run -> the twin's value per row,
                                           in request order
    POST /v1/streams/{stream_id}/samples   new samples of a live stream -> prediction,
                                           residual, score, alarm per sample and core
    GET  /healthz   GET /metrics (Prometheus text)   GET /openapi.json

The twin is loaded once, in the lifespan; endpoints only read it. Every bad input is a 4xx
with a JSON `detail`: malformed JSON, wrong types or non-finite numbers (422), a missing or
out-of-range column, a core count that is not the twin's or a repeated timestamp (422), a
timestamp that does not increase in a stream (409), a body over the limit (413), a new
stream beyond the cap (429), a body that is not JSON (415), a missing or wrong token (401).
Idle streams expire with their metric series, so memory and label cardinality stay bounded.
Large batches run in a worker thread, so one big request does not stall the others.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import math
import socket
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match, Route

from cputwin.contract import InputContract
from cputwin.errors import CputwinError
from cputwin.features.engine import unseen_workloads
from cputwin.live.alerts import AlertSender, tick_events
from cputwin.telemetry.ingest import check_run
from cputwin.telemetry.schema import (
    HOST,
    OVERALL,
    RUN_COLUMN,
    UNLABELLED,
    WORKLOAD,
    WORKLOAD_CPU,
)

log = logging.getLogger("cputwin.serve")

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
INLINE_BYTES = 4096  # bodies up to this (tens of samples) are computed on the event loop;
# larger ones in a worker thread, where they cannot hold up other clients
MAX_WARNINGS, WARNING_CHARS = 10, 500  # per response; each logged as one line
GRACEFUL_SHUTDOWN_S = 5.0


class Sample(BaseModel):
    """One telemetry sample: timestamp, overall and per-core utilisation (cpu_util_core_<i>
    for every core of the twin's machine), workload label, the host (read by a twin
    trained with --host-category; a stream's host is its first sample's) and the workload's
    own CPU use in percent of one core (required by a twin that reads it, e.g. the
    detect_wcpu preset; null: not measured for this sample). Numbers must be finite."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    timestamp: float
    cpu_util_overall: float = Field(ge=0, le=100)
    workload_type: str = Field(default=UNLABELLED, min_length=1, max_length=200)
    host: str = Field(default="", max_length=200)
    workload_cpu_percent: float | None = Field(default=None, ge=0)


class Rows(BaseModel):
    rows: list[Sample] = Field(min_length=1)


class Samples(BaseModel):
    samples: list[Sample] = Field(min_length=1)


class Prediction(BaseModel):
    target: str
    mode: str
    predictions: list[float | None] | None = Field(
        description="The twin's value for each row, in the order of the request's rows "
                    "(null until the row's history is long enough); null from a twin of "
                    "every core, which answers in `cores`.")
    cores: dict[str, list[float | None]] | None = Field(
        None, description="A twin of every core (target `all`): each core's values, in the "
                          "order of the request's rows; null from a twin of one core.")
    warnings: list[str] = Field(description="What the twin noticed about these rows, "
                                            "e.g. workload labels it was not trained on.")


BLIND_HELP = ("True where the twin expects the core so busy that the extra load needed to "
              "alarm would take it past 100 %: a hidden process there cannot show.")


class CoreResult(BaseModel):
    prediction: float | None
    residual: float | None
    score: float | None
    alarm: bool
    event: str | None
    blind: bool = Field(False, description=BLIND_HELP)


class StreamResult(BaseModel):
    timestamp: float
    prediction: float | None
    residual: float | None
    score: float | None
    alarm: bool
    event: str | None
    blind: bool = Field(False, description=BLIND_HELP)
    cores: dict[str, CoreResult] = Field(
        description="Every watched core by column name (empty until history is complete); "
                    "the top-level fields are the first one's.")


class StreamResults(BaseModel):
    stream_id: str
    results: list[StreamResult]
    warnings: list[str] = Field(
        [], description="What the twin noticed about these samples, e.g. a gap longer than "
                        "its history (the history starts again after it).")


class CoreDetector(BaseModel):
    threshold: float | None = Field(description="The alarm threshold on the smoothed score.")
    power: dict[str, float | None] = Field(
        description="By workload ('*': any other), the smallest sustained extra load in "
                    "points that raises an alarm within `window_s` (null: none can).")
    window_s: float | None = Field(
        None, description="Seconds within which `power` alarms: 2, or the fewest samples an "
                          "alarm can take where samples come further apart.")
    blind: list[str] = Field(description="Workloads where that load is above 50 points.")


class Health(BaseModel):
    status: str
    target: str
    targets: list[str]
    mode: str
    cores: int
    streams: int
    detectors: dict[str, CoreDetector] = Field(
        description="What each watched core's detector can see (empty: not calibrated).")


class Error(BaseModel):
    detail: str | list[dict[str, Any]]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {401: "Missing or wrong bearer token (the server was started with --token).",
            409: "A timestamp that does not increase within the stream.",
            413: "Body over the server's --max-body.",
            415: "Body not sent as application/json.",
            422: "Malformed JSON, a wrong type, a non-finite number, a missing or "
                 "out-of-range column, a core count or a timestamp the twin cannot use.",
            429: "A new stream while --max-streams are live; retry later or reuse an id."}
    return {c: {"model": Error, "description": text[c]} for c in codes}


class CoreSeries(NamedTuple):
    """One stream's metric children for one core: its gauges by name, its raise counter."""

    gauges: dict[str, Any]
    raises: Any


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per app).

    Per stream and watched core: observed value, prediction, residual, score, alarm state,
    whether the detector is blind, and raises; the series of a stream go when it expires,
    so at most the stream cap of them exist."""

    CORE_GAUGES = {"observed": "Observed utilisation of the core, percent.",
                   "prediction": "The twin's prediction of the core, percent.",
                   "residual": "Observed minus the twin, percentage points.",
                   "score": "The detector's smoothed anomaly score.",
                   "alarm": "1 while the core's alarm is raised, else 0.",
                   "blind": "1 while the twin expects the core too busy for the extra load "
                            "that alarms to show (the detector is blind), else 0."}

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("cputwin_requests", "HTTP requests by route and status.",
                                ["path", "status"], registry=r)
        self.latency = Histogram("cputwin_request_seconds", "HTTP request latency, seconds.",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.streams = Gauge("cputwin_streams", "Live streams.", registry=r)
        self.warnings = Counter("cputwin_warnings", "Warnings about requests' data.", registry=r)
        self.gauges = {name: Gauge(f"cputwin_{name}", text, ["stream", "core"], registry=r)
                       for name, text in self.CORE_GAUGES.items()}
        self.alarms = Counter("cputwin_alarms", "Alarms raised, by stream and core.",
                              ["stream", "core"], registry=r)
        self.last_sample = Gauge("cputwin_last_sample_timestamp_seconds",
                                 "Unix time at which the stream last received samples.",
                                 ["stream"], registry=r)
        self.webhook = {k: Counter(f"cputwin_alert_webhook_{k}", text, registry=r) for k, text in
                        (("sent", "Alarm events delivered to --alert-webhook."),
                         ("dropped", "Alarm events dropped: the webhook queue was full."),
                         ("failed", "Alarm events given up after retries."))}

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests.labels(path, str(status)).inc()
        self.latency.observe(seconds)

    def series(self, stream_id: str, targets: list[str]
               ) -> tuple[dict[str, CoreSeries], Any]:
        """The children of one new stream: per core, and its last-sample time. Unknown
        values start as NaN."""
        out = {}
        for core in targets:
            children = {n: g.labels(stream_id, core) for n, g in self.gauges.items()}
            for name in ("observed", "prediction", "residual", "score"):
                children[name].set(math.nan)
            children["alarm"].set(0)
            children["blind"].set(0)
            out[core] = CoreSeries(children, self.alarms.labels(stream_id, core))
        return out, self.last_sample.labels(stream_id)

    def forget(self, stream_id: str, targets: list[str]) -> None:
        for core in targets:
            for family in (*self.gauges.values(), self.alarms):
                family.remove(stream_id, core)
        self.last_sample.remove(stream_id)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class Entry:
    """One live stream: its twin state, last timestamp, last use, metric series."""

    stream: Any
    host: str
    series: dict[str, CoreSeries]
    last_sample: Any
    last: float | None = None
    seen: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    labels: set[str] = field(default_factory=set)  # workload labels already judged


class Streams:
    """Live streams by id, with idle expiry and a cap.

    Kept in the order they were last seen, so expiry looks only at the oldest: a request
    costs O(1) however many streams are live, not a scan of all of them."""

    def __init__(self, twin, max_streams: int, ttl_s: float, metrics: Metrics,
                 alerts: AlertSender | None = None) -> None:
        self.twin, self.max_streams, self.ttl_s = twin, max_streams, ttl_s
        self.metrics, self.alerts = metrics, alerts
        self.items: OrderedDict[str, Entry] = OrderedDict()
        self.lock = threading.Lock()
        cols = twin.schema.core_columns
        self.observed_index = [(t, cols.index(t)) for t in twin.targets if t in cols]

    def expire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self.lock:
            while self.items and now - next(iter(self.items.values())).seen > self.ttl_s:
                stream_id, _ = self.items.popitem(last=False)
                self.metrics.forget(stream_id, self.twin.targets)
                if self.alerts:
                    self.alerts.forget(stream_id)
            self.metrics.streams.set(len(self.items))

    def get(self, stream_id: str, host: str = "") -> Entry:
        now = time.monotonic()
        self.expire(now)
        with self.lock:
            entry = self.items.get(stream_id)
            if entry is None:
                if len(self.items) >= self.max_streams:
                    raise HTTPException(429, f"too many live streams (cap {self.max_streams}); "
                                             "retry later or reuse a stream id")
                entry = self.items[stream_id] = Entry(
                    self.twin.stream(host), host,
                    *self.metrics.series(stream_id, self.twin.targets))
                self.metrics.streams.set(len(self.items))
            else:
                self.items.move_to_end(stream_id)
            entry.seen = now
            return entry


def _stream_rows(samples: list[Sample], contract: InputContract) -> np.ndarray:
    """Per-core values of stream samples, checked against the twin's contract without
    building a frame: a stream update is usually one sample, and a frame costs more than
    the prediction."""
    return np.array([contract.sample_cores(s.model_extra or {}, i)
                     for i, s in enumerate(samples)])


def _check_workload_cpu(samples: list[Sample], contract: InputContract) -> None:
    for i, sample in enumerate(samples):
        contract.check_sample_workload_cpu(
            sample.workload_cpu_percent, "workload_cpu_percent" in sample.model_fields_set, i)


def _frame(samples: list[Sample], contract: InputContract) -> pl.DataFrame:
    """Samples as a checked telemetry frame: the stream checks, then the ingest checks."""
    values = _stream_rows(samples, contract)
    _check_workload_cpu(samples, contract)
    data = {"timestamp": [s.timestamp for s in samples],
            OVERALL: [s.cpu_util_overall for s in samples],
            **{c: values[:, i] for i, c in enumerate(contract.core_columns())},
            WORKLOAD_CPU: pl.Series([s.workload_cpu_percent for s in samples],
                                    dtype=pl.Float64),
            WORKLOAD: [s.workload_type for s in samples]}
    frame = check_run(pl.DataFrame(data), "request")
    return frame.with_columns(pl.Series(HOST, [s.host for s in samples]))


def _parse(model: type[BaseModel], raw: bytes) -> Any:
    """A JSON body validated against `model`; a 422 in FastAPI's own format otherwise."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def _json_safe(value: Any) -> Any:
    """`value` as strict JSON can hold it: non-finite floats and bytes as their repr."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)[:200]


def _validation_body(errors: list[dict]) -> dict[str, Any]:
    """FastAPI's 422 body (loc, msg, type, input), safe to serialise whatever the input
    held (NaN, Infinity, bytes that are not UTF-8)."""
    return {"detail": [{k: _json_safe(e[k]) for k in ("type", "loc", "msg", "input") if k in e}
                       for e in errors]}


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def _one_line(message: str) -> str:
    """A warning as one bounded log line: newlines and control characters escaped."""
    text = message.encode("unicode_escape").decode("ascii")
    return text if len(text) <= WARNING_CHARS else text[:WARNING_CHARS] + "..."


def _report(caught: list[warnings.WarningMessage], metrics: Metrics) -> list[str]:
    """Log each distinct warning once as one line, count them; the first few for the caller."""
    seen: list[str] = []
    for w in caught:
        text = _one_line(str(w.message))
        if text not in seen and not issubclass(w.category, DeprecationWarning):
            seen.append(_report_one(text, metrics))
    return seen[:MAX_WARNINGS]


JSON_TYPES = (b"application/json",)


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    main = content_type.split(b";", 1)[0].strip().lower()
    return main in JSON_TYPES or (main.startswith(b"application/") and main.endswith(b"+json"))


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def host_name(header: bytes | None) -> str:
    """The name in a Host header, without its port ("[::1]:8000" -> "::1"), lower case."""
    value = (header or b"").decode("latin-1").strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def allowed_hosts(bound: str, names: Sequence[str]) -> list[str] | None:
    """The Host names a server bound to `bound` answers to: on loopback, the loopback names
    and `names` (a browser page cannot rebind its own name onto this server); elsewhere
    `names`, or any name when none is given (a token guards a public server)."""
    if host_name(bound.encode()) in LOOPBACK_NAMES or bound.startswith("127."):
        return [*LOOPBACK_NAMES, bound, *names]
    return list(names) or None


class Guard:
    """Pure ASGI middleware: Host header (400), bearer token (401), JSON bodies only (415),
    body limit (413), and every request counted and timed, a 500 included.

    The Host check refuses a page whose own name resolves to this address (DNS
    rebinding): a browser sends that name, never one of `allowed_hosts`.
    Starlette's BaseHTTPMiddleware costs a task and a queue per request; this does not."""

    OPEN_PATHS = frozenset({"/healthz"})

    def __init__(self, app, max_body_bytes: int, token: str | None = None,
                 allowed_hosts: Sequence[str] | None = None) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = f"Bearer {token}".encode() if token else None
        self.allowed = None if allowed_hosts is None else frozenset(
            host_name(h.encode()) for h in allowed_hosts)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}
        headers = dict(scope.get("headers") or ())
        size = headers.get(b"content-length")
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise _Refuse(413, f"body over {self.max_body_bytes} bytes")
            return message

        async def recording_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            self._check(scope, headers, size)
            await self.app(scope, limited_receive, recording_send)
        except _Refuse as refusal:
            extra = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else None
            response = JSONResponse({"detail": refusal.detail}, refusal.status, headers=extra)
            await response(scope, receive, recording_send)
        finally:
            path = getattr(scope.get("route"), "path", None) or _docs_path(scope)
            scope["app"].state.metrics.observe(path, status["code"],
                                               time.perf_counter() - start)

    def _check(self, scope, headers: dict[bytes, bytes], size: bytes | None) -> None:
        if self.allowed is not None and host_name(headers.get(b"host")) not in self.allowed:
            raise _Refuse(400, f"Host {host_name(headers.get(b'host'))!r} is not a name this "
                               "server answers to (serve --allowed-host adds one)")
        if self.expected is not None and scope["path"] not in self.OPEN_PATHS and not \
                hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            raise _Refuse(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        if scope["method"] == "POST" and not _is_json(headers.get(b"content-type")):
            raise _Refuse(415, "send the body as application/json")
        if size is not None and (not size.isdigit() or int(size) > self.max_body_bytes):
            raise _Refuse(413, f"body over {self.max_body_bytes} bytes")


def _docs_path(scope) -> str:
    """FastAPI serves its document (/openapi.json) through a plain Starlette route that does
    not name itself in the scope: label it by its own path, and anything else no route
    matched as "unmatched" (an unbounded label set otherwise)."""
    return scope["path"] if scope["path"] == scope["app"].openapi_url else "unmatched"


class _Refuse(Exception):
    def __init__(self, status: int, detail: str) -> None:
        self.status, self.detail = status, detail


STREAM_PATH = "/v1/streams/{stream_id}/samples"


class _NamedRoute(Route):
    """A Starlette route that puts itself in the scope, as FastAPI's routes do, so the
    metrics count its requests under its path."""

    def matches(self, scope) -> tuple[Match, dict[str, Any]]:
        match, child_scope = super().matches(scope)
        if match != Match.NONE:
            child_scope["route"] = self
        return match, child_scope


class _Busy(Exception):
    """The stream is being updated by a worker thread: wait for it there, not on the loop."""


async def stream_samples(request: Request) -> Response:
    """POST /v1/streams/{stream_id}/samples, served as a plain Starlette route (see
    `create_app`). Small bodies are computed on the event loop (a thread hop costs about as
    much as one sample); large ones, or one that would wait for its stream, in a thread."""
    raw = await request.body()
    args = (request.app.state, request.path_params["stream_id"], raw)
    if len(raw) <= INLINE_BYTES:
        try:
            return _stream_update(*args, wait=False)
        except _Busy:
            pass
    return await run_in_threadpool(_stream_update, *args)


def _stream_update(state, stream_id: str, raw: bytes, wait: bool = True) -> Response:
    """Check a stream update, feed it to the stream, answer with its verdicts."""
    if len(stream_id) > 200:
        raise HTTPException(422, "stream id longer than 200 characters")
    body = _parse(Samples, raw)
    streams: Streams = state.streams
    cores = _stream_rows(body.samples, state.contract)  # validates before any state changes
    _check_workload_cpu(body.samples, state.contract)
    entry = streams.get(stream_id, body.samples[0].host)
    if not entry.lock.acquire(blocking=wait):
        raise _Busy()
    try:
        ts = [s.timestamp for s in body.samples]
        if (entry.last is not None and ts[0] <= entry.last) or any(
                b <= a for a, b in itertools.pairwise(ts)):
            raise HTTPException(409, f"timestamps must increase within stream {stream_id!r} "
                                     f"(last seen {entry.last})")
        gaps = _restart_after_gaps(entry, stream_id, ts, state.stack)
        results = _step(entry, stream_id, body.samples, cores, streams, set(gaps))
        entry.last = ts[-1]
        noticed = [*_new_labels(entry, stream_id, body.samples, state.stack), *gaps.values()]
    finally:
        entry.lock.release()
    answer = {"stream_id": stream_id, "results": results}
    if noticed:
        answer["warnings"] = [_report_one(_one_line(text), state.metrics) for text in noticed]
    return Response(json.dumps(answer, allow_nan=False), media_type="application/json")


def _new_labels(entry: Entry, stream_id: str, samples: list[Sample], stack) -> list[str]:
    """What to say of workload labels this stream sends for the first time that the twin
    never saw (as batch prediction says it), once per stream and label."""
    labels = {s.workload_type for s in samples} - entry.labels
    entry.labels |= labels
    message = unseen_workloads(sorted(labels), stack.workloads_)
    return [f"stream {stream_id!r}: {message}"] if message else []


def _restart_after_gaps(entry: Entry, stream_id: str, ts: list[float], stack) -> dict[int, str]:
    """The samples (by index) that follow a gap longer than the twin's history, with what
    to say of each: there, the stream's history starts again."""
    span = (stack.history_ or 1) * (stack.step_s_ or 0.0)
    if not span:
        return {}
    before = [entry.last, *ts[:-1]]
    return {i: f"stream {stream_id!r}: {t - prev:.6g} s without samples before {t:.6f}, "
               f"longer than the twin's history ({span:.6g} s): its history starts again"
            for i, (prev, t) in enumerate(zip(before, ts, strict=True))
            if prev is not None and t - prev > span}


def _report_one(text: str, metrics: Metrics) -> str:
    """Log a one-line warning and count it; the text, for the caller's answer."""
    metrics.warnings.inc()
    log.warning("%s", text)
    return text


def _step(entry: Entry, stream_id: str, samples: list[Sample], cores: np.ndarray,
          streams: Streams, restart_at: set[int]) -> list[dict]:
    """Feed checked samples to a stream (its history restarted before those in
    `restart_at`); the verdict of each, as the JSON answer holds it. The metric gauges take
    the last sample's values; every raise is counted and sent."""
    results = []
    alerts = streams.alerts
    tick = None
    for i, sample in enumerate(samples):
        if i in restart_at:
            entry.stream.restart()
        tick = entry.stream.update(cores[i], sample.cpu_util_overall, sample.workload_type,
                                   sample.workload_cpu_percent)
        per_core = {}
        for c in tick.cores:
            per_core[c.target] = {"prediction": _finite(c.prediction),
                                  "residual": _finite(c.residual), "score": _finite(c.score),
                                  "alarm": c.alarm, "event": c.event, "blind": c.blind}
            if c.event == "raise":
                entry.series[c.target].raises.inc()
        if alerts is not None:
            tick_events(alerts, stream_id, entry.host, tick, streams.twin.detectors,
                        sample.timestamp)
        results.append({"timestamp": sample.timestamp, "prediction": _finite(tick.prediction),
                        "residual": _finite(tick.residual), "score": _finite(tick.score),
                        "alarm": tick.alarm, "event": tick.event, "blind": tick.blind,
                        "cores": per_core})
    for target, j in streams.observed_index:
        entry.series[target].gauges["observed"].set(cores[-1, j])
    for c in tick.cores:
        gauges = entry.series[c.target].gauges
        gauges["prediction"].set(c.prediction)
        gauges["residual"].set(math.nan if c.residual is None else c.residual)
        gauges["score"].set(math.nan if c.score is None else c.score)
        gauges["alarm"].set(c.alarm)
        gauges["blind"].set(c.blind)
    entry.last_sample.set(time.time())
    return results


def _predict(state, body: Rows) -> Prediction:
    """The twin over one run's rows, answered in the request's row order. The rows are
    sorted by time for the twin (its lags need it) and the values put back in place."""
    stack = state.stack
    ts = np.array([s.timestamp for s in body.rows])
    order = np.argsort(ts, kind="stable")
    repeated = np.flatnonzero(np.diff(ts[order]) == 0)
    if repeated.size:
        raise CputwinError(f"rows {order[repeated[0]]} and {order[repeated[0] + 1]} have the "
                           f"same timestamp ({ts[order[repeated[0]]]}): one row per timestamp")
    rows = [body.rows[i] for i in order]
    with state.predict_lock, warnings.catch_warnings(record=True) as caught:
        # one request at a time holds the warnings machinery (it is process-wide)
        warnings.simplefilter("always")
        frame = _frame(rows, state.contract)
        pred = stack.predict(frame.with_columns(pl.lit("request").alias(RUN_COLUMN)))
    in_request_order = np.empty(pred.shape)  # (rows,) or, every core's, (rows, cores)
    in_request_order[order] = pred
    warned = _report(caught, state.metrics)
    if stack.machine_:
        return Prediction(target=stack.target, mode=stack.mode, predictions=None,
                          cores={core: _values(in_request_order[:, i])
                                 for i, core in enumerate(stack.cores_of(frame))},
                          warnings=warned)
    return Prediction(target=stack.target, mode=stack.mode,
                      predictions=_values(in_request_order), warnings=warned)


def _values(column: np.ndarray) -> list[float | None]:
    return [_finite(float(p)) for p in column]


async def _stream_doc(
    body: Samples, stream_id: str = PathParam(min_length=1, max_length=200),
) -> StreamResults:
    """New samples of a live stream -> prediction, residual, score and alarm per sample
    and watched core. The server keeps each stream's state; a stream's timestamps must
    increase."""
    raise NotImplementedError  # describes the route for OpenAPI; the served one is Starlette's


def _document(app: FastAPI, described: list[APIRoute]) -> None:
    """The OpenAPI document: FastAPI's, plus routes served outside its router, with the
    twin's core columns spelt out in `Sample`."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, summary=app.summary,
                              routes=[*app.routes, *described])
            cores = app.state.stack.schema_.core_columns
            sample = doc["components"]["schemas"]["Sample"]
            sample["properties"].update({c: {
                "type": "number", "minimum": 0, "maximum": 100, "title": c,
                "description": f"Utilisation of core {c.rsplit('_', 1)[1]}, percent."}
                for c in cores})
            sample["required"] = [*sample.get("required", []), *cores]
            if app.state.token:
                doc["components"]["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"}}
                doc["security"] = [{"bearer": []}]
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi


def create_app(twin_path: Path, max_streams: int = 1000, stream_ttl_s: float = 300.0,
               max_body_bytes: int = 1_000_000, token: str | None = None,
               alert_webhook: str | None = None, sign_key: str | bytes | None = None,
               allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """The service for one twin file.

    sign_key: the key the twin must be signed with (HMAC-SHA256), checked at start-up.
    token: clients must send `Authorization: Bearer <token>` (all but /healthz).
    allowed_hosts: the names requests may carry in their Host header (None: any).
    alert_webhook: URL that receives each alarm raise/clear (Alertmanager JSON)."""
    from cputwin.live.stream import OnlineTwin
    from cputwin.live.twin import open_twin

    for name, value in (("max_streams", max_streams), ("stream_ttl_s", stream_ttl_s),
                        ("max_body_bytes", max_body_bytes)):
        if not value > 0:
            raise CputwinError(f"{name} must be positive, not {value}")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stack, detector, _ = open_twin(twin_path, sign_key)
        metrics = Metrics()
        alerts = (AlertSender(alert_webhook, counters=metrics.webhook)
                  if alert_webhook else None)
        app.state.stack, app.state.metrics = stack, metrics
        app.state.contract = stack.contract_
        app.state.streams = Streams(OnlineTwin(stack, detector=detector), max_streams,
                                    stream_ttl_s, metrics, alerts)
        app.state.predict_lock = threading.Lock()
        try:
            yield
        finally:
            if alerts:
                alerts.close()

    # no /docs or /redoc: their pages load assets from a CDN and are blank offline;
    # /openapi.json works with any local viewer
    app = FastAPI(title="cputwin", summary="A digital twin of a machine's CPU cores",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.token = token
    app.add_middleware(Guard, max_body_bytes=max_body_bytes, token=token,
                       allowed_hosts=allowed_hosts)

    @app.exception_handler(CputwinError)
    async def cputwin_error(request: Request, exc: CputwinError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_body(list(exc.errors())), status_code=422)

    @app.get("/healthz")
    def healthz(request: Request) -> Health:
        state = request.app.state
        twin = state.streams.twin
        return Health(status="ok", target=state.stack.target, targets=twin.targets,
                      mode=state.stack.mode, cores=state.stack.schema_.n_cores,
                      streams=len(state.streams.items), detectors={
                          core: CoreDetector(threshold=_finite(d.threshold),
                                             power={w: _finite(p) for w, p in d.power.items()},
                                             window_s=round(d.power_window_s, 3),
                                             blind=sorted(d.blind_spots()))
                          for core, d in twin.detectors.items()})

    @app.get("/metrics", responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **_errors(401)},
             response_class=Response)
    def metrics(request: Request) -> Response:
        request.app.state.streams.expire()
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/predict", responses=_errors(401, 413, 415, 422))
    def predict(body: Rows, request: Request) -> Prediction:
        return _predict(request.app.state, body)

    # The hot path is a plain Starlette route, ahead of FastAPI's: the body is parsed and
    # validated by pydantic-core in one call and the answer written as JSON directly, with
    # no dependency solving, exit stacks or response-model re-validation per request.
    # Errors still go through the app's handlers (the same 4xx bodies), and the OpenAPI
    # document describes the route through `_stream_doc`, which is never served.
    app.router.routes.insert(0, _NamedRoute(STREAM_PATH, stream_samples, methods=["POST"]))
    _document(app, [APIRoute(STREAM_PATH, _stream_doc, methods=["POST"],
                             response_model=StreamResults, summary="Stream samples",
                             responses=_errors(401, 409, 413, 415, 422, 429))])
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the server starts, so a taken port or a bad
    address is one clear error and the address printed is the one served."""
    if not 1 <= port <= 65535:
        raise CputwinError(f"port must be in 1..65535, not {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise CputwinError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, except that a second SIGTERM (not only a second Ctrl-C) stops it
    at once instead of waiting for connections."""

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit:
            self.force_exit = True
        super().handle_exit(sig, frame)


def run(app: FastAPI, sock: socket.socket) -> None:
    """Serve `app` on `sock` until SIGINT/SIGTERM; requests still running then get
    GRACEFUL_SHUTDOWN_S to finish (a client stalled mid-body does not hold the exit)."""
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    _Server(config).run(sockets=[sock])
