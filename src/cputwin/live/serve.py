"""The twin as an HTTP service (FastAPI): batch predictions and live streams.

    POST /v1/predict                       rows of one run -> the twin's value per row
    POST /v1/streams/{stream_id}/samples   new samples of a live stream -> prediction,
                                           residual, score, alarm per sample
    GET  /healthz                          GET /metrics (Prometheus text)   GET /openapi.json

The twin is loaded once, in the lifespan; endpoints only read it. Every bad input is a 4xx
with a one-line `detail`: malformed JSON or wrong types (422), a missing or out-of-range
column or a core count that is not the twin's (422), a timestamp that goes backwards in
a stream (409), a body over the limit (413), a new stream beyond the cap (429). Idle
streams expire, so memory stays bounded.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import OrderedDict, defaultdict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.routing import Match, Route

from cputwin.errors import CputwinError
from cputwin.telemetry.ingest import check_run
from cputwin.telemetry.schema import HOST, OVERALL, RUN_COLUMN, WORKLOAD, WORKLOAD_CPU

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Sample(BaseModel):
    """One telemetry sample: timestamp, overall and per-core utilisation (cpu_util_core_<i>
    for every core of the twin's machine), workload label, the host (read by a twin
    trained with --host-category; a stream's host is its first sample's) and the workload's
    own CPU use in percent of one core (required by a twin that reads it, e.g. the
    detect_wcpu preset; null: not measured for this sample)."""

    model_config = ConfigDict(extra="allow")
    timestamp: float
    cpu_util_overall: float = Field(ge=0, le=100)
    workload_type: str = Field(min_length=1, max_length=200)
    host: str = Field(default="", max_length=200)
    workload_cpu_percent: float | None = Field(default=None, ge=0)


class Rows(BaseModel):
    rows: list[Sample] = Field(min_length=1)


class Samples(BaseModel):
    samples: list[Sample] = Field(min_length=1)


class Prediction(BaseModel):
    target: str
    mode: str
    predictions: list[float | None]


class StreamResult(BaseModel):
    timestamp: float
    prediction: float | None
    residual: float | None
    score: float | None
    alarm: bool
    event: str | None


class StreamResults(BaseModel):
    stream_id: str
    results: list[StreamResult]


@dataclass
class Metrics:
    requests: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    latency_count: int = 0
    alarms: int = 0

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests[(path, status)] += 1
        self.latency_sum += seconds
        self.latency_count += 1
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
                break
        else:
            self.buckets[-1] += 1

    def render(self, streams: int) -> str:
        lines = ["# TYPE cputwin_requests_total counter"]
        lines += [f'cputwin_requests_total{{path="{p}",status="{s}"}} {n}'
                  for (p, s), n in sorted(self.requests.items())]
        lines.append("# TYPE cputwin_request_seconds histogram")
        cumulative = 0
        for bound, n in zip([*LATENCY_BUCKETS, "+Inf"], self.buckets, strict=True):
            cumulative += n
            lines.append(f'cputwin_request_seconds_bucket{{le="{bound}"}} {cumulative}')
        lines += [f"cputwin_request_seconds_sum {self.latency_sum}",
                  f"cputwin_request_seconds_count {self.latency_count}",
                  "# TYPE cputwin_streams gauge", f"cputwin_streams {streams}",
                  "# TYPE cputwin_alarms_total counter", f"cputwin_alarms_total {self.alarms}"]
        return "\n".join(lines) + "\n"


class Streams:
    """Live streams by id, with idle expiry and a cap.

    Kept in the order they were last seen, so expiry looks only at the oldest: a request
    costs O(1) however many streams are live, not a scan of all of them."""

    def __init__(self, twin, max_streams: int, ttl_s: float) -> None:
        self.twin, self.max_streams, self.ttl_s = twin, max_streams, ttl_s
        self.items: OrderedDict[str, list] = OrderedDict()  # id -> [stream, last ts, seen]
        self.lock = threading.Lock()

    def get(self, stream_id: str, host: str = "") -> list:
        now = time.monotonic()
        with self.lock:
            while self.items and now - next(iter(self.items.values()))[2] > self.ttl_s:
                self.items.popitem(last=False)
            entry = self.items.get(stream_id)
            if entry is None:
                if len(self.items) >= self.max_streams:
                    raise HTTPException(429, f"too many live streams (cap {self.max_streams}); "
                                             "retry later or reuse a stream id")
                entry = self.items[stream_id] = [self.twin.stream(host), None, now]
            else:
                self.items.move_to_end(stream_id)
            entry[2] = now
            return entry


def _stream_rows(samples: list[Sample], n_cores: int) -> np.ndarray:
    """Per-core values of stream samples, checked like ingest checks a run (core count,
    missing columns, numbers in [0, 100]) but without building a frame: a stream update is
    usually one sample, and a frame costs more than the prediction."""
    cores = [f"cpu_util_core_{i}" for i in range(n_cores)]
    out = np.empty((len(samples), n_cores))
    for i, sample in enumerate(samples):
        extra = sample.model_extra or {}
        unknown = [k for k in extra if k.startswith("cpu_util_core_") and k not in cores]
        if unknown:
            raise CputwinError(f"core count does not match the twin ({n_cores} cores): "
                               f"unexpected {unknown[0]}")
        for j, c in enumerate(cores):
            if c not in extra:
                raise CputwinError(f"sample {i}: missing column {c!r}")
            v = extra[c]
            if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
                raise CputwinError(f"sample {i}: {c} must be a number")
            if not 0 <= v <= 100:
                raise CputwinError(f"sample {i}: {c} = {v} is outside [0, 100]")
            out[i, j] = v
    return out


def _check_workload_cpu(samples: list[Sample], n_cores: int, required: bool) -> None:
    """The workload's CPU use is at most every core busy, and given where the twin reads it
    (null, a reading that failed, is a missing value to the models; a field left out is an
    error: a client that never sends it would get answers, all of them wrong)."""
    for i, sample in enumerate(samples):
        own = sample.workload_cpu_percent
        if required and "workload_cpu_percent" not in sample.model_fields_set:
            raise CputwinError(f"sample {i}: missing {WORKLOAD_CPU!r}, the workload's own "
                               "CPU use, which this twin reads")
        if own is not None and own > 100 * n_cores:
            raise CputwinError(f"sample {i}: {WORKLOAD_CPU} = {own} is above "
                               f"{100 * n_cores} ({n_cores} cores fully busy)")


def _frame(samples: list[Sample], n_cores: int, needs_workload_cpu: bool) -> pl.DataFrame:
    """Samples as a checked telemetry frame: the stream checks, then the ingest checks."""
    values = _stream_rows(samples, n_cores)
    _check_workload_cpu(samples, n_cores, needs_workload_cpu)
    data = {"timestamp": [s.timestamp for s in samples],
            OVERALL: [s.cpu_util_overall for s in samples],
            **{f"cpu_util_core_{i}": values[:, i] for i in range(n_cores)},
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


class LimitsAndMetrics:
    """Pure ASGI middleware: refuse bodies over the limit (413), time every request.

    Starlette's BaseHTTPMiddleware costs a task and a queue per request; this does not."""

    def __init__(self, app, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}
        size = next((v for k, v in scope.get("headers") or () if k == b"content-length"), None)
        too_big = size is not None and (not size.isdigit() or int(size) > self.max_body_bytes)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise _TooBig()
            return message

        async def recording_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if too_big:
                raise _TooBig()
            await self.app(scope, limited_receive, recording_send)
        except _TooBig:
            response = JSONResponse({"detail": f"body over {self.max_body_bytes} bytes"}, 413)
            await response(scope, receive, recording_send)
        path = getattr(scope.get("route"), "path", None) or _docs_path(scope)
        scope["app"].state.metrics.observe(path, status["code"], time.perf_counter() - start)


def _docs_path(scope) -> str:
    """FastAPI serves its documents (/openapi.json, /docs, /redoc) through plain Starlette
    routes that do not name themselves in the scope: label them by their own path, and
    anything else no route matched as "unmatched" (an unbounded label set otherwise)."""
    app = scope["app"]
    documents = {app.openapi_url, app.docs_url, app.redoc_url,
                 app.swagger_ui_oauth2_redirect_url} - {None}
    return scope["path"] if scope["path"] in documents else "unmatched"


class _TooBig(Exception):
    pass


STREAM_PATH = "/v1/streams/{stream_id}/samples"


class _NamedRoute(Route):
    """A Starlette route that puts itself in the scope, as FastAPI's routes do, so the
    metrics count its requests under its path."""

    def matches(self, scope) -> tuple[Match, dict[str, Any]]:
        match, child_scope = super().matches(scope)
        if match != Match.NONE:
            child_scope["route"] = self
        return match, child_scope


async def stream_samples(request: Request) -> Response:
    """POST /v1/streams/{stream_id}/samples, served as a plain Starlette route (see
    `create_app`)."""
    stream_id = request.path_params["stream_id"]
    body = _parse(Samples, await request.body())
    app_state = request.app.state
    n_cores = app_state.stack.schema_.n_cores
    cores = _stream_rows(body.samples, n_cores)  # validates before any state changes
    _check_workload_cpu(body.samples, n_cores, app_state.streams.twin.reads_workload_cpu)
    if len(stream_id) > 200:
        raise HTTPException(422, "stream id longer than 200 characters")
    entry = app_state.streams.get(stream_id, body.samples[0].host)
    stream, last = entry[0], entry[1]
    ts = [s.timestamp for s in body.samples]
    if (last is not None and ts[0] <= last) or any(b <= a for a, b in itertools.pairwise(ts)):
        raise HTTPException(409, f"timestamps must increase within stream {stream_id!r} "
                                 f"(last seen {last})")
    results = _step(stream, body.samples, cores, app_state.metrics)
    entry[1] = ts[-1]
    return Response(json.dumps({"stream_id": stream_id, "results": results}),
                    media_type="application/json")


def _step(stream, samples: list[Sample], cores: np.ndarray, metrics: Metrics) -> list[dict]:
    """Feed checked samples to a stream; the verdict of each, as the JSON answer holds it."""
    results = []
    for i, sample in enumerate(samples):
        tick = stream.update(cores[i], sample.cpu_util_overall, sample.workload_type,
                             sample.workload_cpu_percent)
        metrics.alarms += tick.event == "raise"
        results.append({"timestamp": sample.timestamp, "prediction": tick.prediction,
                        "residual": tick.residual, "score": tick.score,
                        "alarm": tick.alarm, "event": tick.event})
    return results


async def _stream_doc(stream_id: str) -> StreamResults:
    """New samples of a live stream -> prediction, residual, score and alarm per sample.
    The server keeps each stream's state; a stream's timestamps must increase."""
    raise NotImplementedError  # describes the route for OpenAPI; the served one is Starlette's


def _document(app: FastAPI, *described: APIRoute) -> None:
    """Add routes served outside FastAPI's router to its OpenAPI document."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(title=app.title, version=app.version,
                                             summary=app.summary,
                                             routes=[*app.routes, *described])
        return app.openapi_schema

    app.openapi = openapi


def create_app(twin_path: Path, max_streams: int = 1000, stream_ttl_s: float = 300.0,
               max_body_bytes: int = 1_000_000) -> FastAPI:
    """The service for one twin file."""
    from cputwin.live.stream import OnlineTwin
    from cputwin.pipeline import open_twin

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stack, detector, _ = open_twin(twin_path)
        app.state.stack = stack
        app.state.streams = Streams(OnlineTwin(stack, detector=detector), max_streams,
                                    stream_ttl_s)
        app.state.metrics = Metrics()
        yield

    app = FastAPI(title="cputwin", summary="A digital twin of a CPU core", lifespan=lifespan)

    app.add_middleware(LimitsAndMetrics, max_body_bytes=max_body_bytes)

    @app.exception_handler(CputwinError)
    async def cputwin_error(request: Request, exc: CputwinError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.get("/healthz")
    def healthz(request: Request) -> dict[str, Any]:
        stack = request.app.state.stack
        return {"status": "ok", "target": stack.target, "mode": stack.mode,
                "cores": stack.schema_.n_cores, "streams": len(request.app.state.streams.items)}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics(request: Request) -> str:
        return request.app.state.metrics.render(len(request.app.state.streams.items))

    @app.post("/v1/predict")
    def predict(body: Rows, request: Request) -> Prediction:
        stack = request.app.state.stack
        needs = request.app.state.streams.twin.reads_workload_cpu
        frame = _frame(body.rows, stack.schema_.n_cores, needs).with_columns(
            pl.lit("request").alias(RUN_COLUMN))
        pred = stack.predict(frame)
        return Prediction(target=stack.target, mode=stack.mode,
                          predictions=[None if np.isnan(p) else float(p) for p in pred])

    # The hot path is a plain Starlette route, ahead of FastAPI's: the body is parsed and
    # validated by pydantic-core in one call and the answer written as JSON directly, with
    # no dependency solving, exit stacks or response-model re-validation per request.
    # Errors still go through the app's handlers (the same 4xx bodies), and the OpenAPI
    # document describes the route through `_stream_doc`, which is never served.
    app.router.routes.insert(0, _NamedRoute(STREAM_PATH, stream_samples, methods=["POST"]))
    _document(app, APIRoute(STREAM_PATH, _stream_doc, methods=["POST"],
                            response_model=StreamResults, summary="Stream samples",
                            openapi_extra={"requestBody": {"required": True, "content": {
                                "application/json": {"schema": Samples.model_json_schema()}}}}))
    return app
