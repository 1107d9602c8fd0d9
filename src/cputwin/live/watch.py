"""Watch this machine live: sample, predict, score, alarm, and record it all.

The sampling is the collector's (`Sampler`, drift-free `ticks`); the prediction and the
alarm are a `TwinStream`'s. Records and events are flushed as they happen, so Ctrl-C
loses nothing: the recording is a parquet file per flush in `DIR/watch-<time>.parts`,
merged into `DIR/watch-<time>.parquet` on a clean stop.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa

from cputwin.errors import DataError
from cputwin.evaluation.summary import WatchSummary
from cputwin.live.alerts import AlertSender, tick_events
from cputwin.live.detector import Detector
from cputwin.live.stream import OnlineTwin, Tick
from cputwin.models import TwinStack
from cputwin.telemetry.collector import PartWriter, RowSampler, Sampler, merge_parts, reserve_run, ticks
from cputwin.telemetry.schema import OVERALL, TIMESTAMP, WORKLOAD, WORKLOAD_CPU

RECORD_FIELDS = ("prediction", "residual", "score", "alarm", "blind")


class Recorder:
    """Telemetry plus the twin's verdict per tick, as crash-safe parquet parts."""

    def __init__(self, folder: Path, sampler: Sampler, targets: list[str] | None = None) -> None:
        """targets: the watched cores of a machine twin, each recorded as `<field>_<core>`
        (None: a twin of one core, recorded as `<field>`)."""
        self.parts, self.final = reserve_run(folder, "watch")  # a name no other run has
        self.targets = targets
        names = ([f"{f}_{t}" for t in targets for f in RECORD_FIELDS] if targets
                 else list(RECORD_FIELDS))
        base = [pa.field(c, pa.float64()) for c in sampler.schema.column_order()[:-1]]
        extra = [pa.field(n, pa.bool_() if n.startswith(("alarm", "blind")) else pa.float64()) for n in names]
        self.writer = PartWriter(self.parts, pa.schema([*base, pa.field(WORKLOAD, pa.string()),
                                                        *extra]))

    def add(self, row: dict[str, Any], tick: Tick) -> None:
        if not self.targets:
            self.writer.add({**row, "prediction": tick.prediction, "residual": tick.residual,
                             "score": tick.score, "alarm": tick.alarm, "blind": tick.blind})
            return
        verdicts = {}
        for core in tick.cores:
            verdicts.update({f"prediction_{core.target}": core.prediction,
                             f"residual_{core.target}": core.residual,
                             f"score_{core.target}": core.score,
                             f"alarm_{core.target}": core.alarm,
                             f"blind_{core.target}": core.blind})
        self.writer.add({**row, **verdicts})

    def close(self, meta: dict[str, Any]) -> Path:
        self.writer.flush()
        merge_parts(self.parts, self.final, meta)
        return self.final


def watch(
    stack: TwinStack,
    detector: Detector | None,
    on_tick: Callable[[dict[str, Any], Tick], None],
    workload: str = "unknown",
    rate: float = 10.0,
    seconds: float | None = None,
    record: Path | None = None,
    events: Path | None = None,
    workload_pid: int | None = None,
    alerts: AlertSender | None = None,
    sampler: RowSampler | None = None,
) -> WatchSummary:
    """Sample this machine until `seconds` pass or KeyboardInterrupt; returns a summary.

    workload_pid: the process (with its children) whose CPU use is the workload's, for a
    twin that reads it; required by such a twin. alerts: each core's alarm raise/clear is
    queued to it (and what is queued sent before returning). sampler: what to sample
    instead of this machine (a remote host's `NodeExporterSampler`)."""
    sampler = sampler if sampler is not None else _sampler(workload_pid)
    twin = OnlineTwin(stack, n_cores=sampler.schema.n_cores, detector=detector,
                      source="this machine")
    twin.contract.check_workload_cpu_source(
        workload_pid is not None, "give the process id of the workload (and its children)")
    host = getattr(sampler, "host", None) or socket.gethostname()
    stream = twin.stream(host)
    cores = sampler.schema.core_columns
    recorder = Recorder(record, sampler, twin.targets if stack.machine_ else None) if record else None
    event_file = open(events, "a", encoding="utf-8") if events else None  # noqa: SIM115
    n_ticks = None if seconds is None else int(round(seconds * rate))
    summary = WatchSummary()
    last_flush = time.monotonic()
    try:
        for _ in ticks(rate, n_ticks):
            row = sampler.sample(workload)
            tick = stream.update(np.array([row[c] for c in cores]), row[OVERALL], workload,
                                 row[WORKLOAD_CPU])
            if recorder:  # recorded and counted together: an interrupt leaves them equal
                recorder.add(row, tick)
            summary.ticks += 1
            for core in tick.cores:
                if core.event == "raise":
                    summary.count(core.target)
                if event_file and core.event:
                    event_file.write(json.dumps({
                        "event": core.event, "timestamp": row[TIMESTAMP], "target": core.target,
                        "score": core.score, "residual": core.residual}) + "\n")
                    event_file.flush()
            if alerts is not None:
                tick_events(alerts, "watch", host, tick, twin.detectors,
                            row[TIMESTAMP])
            if recorder and time.monotonic() - last_flush >= 0.5:
                recorder.writer.flush()
                last_flush = time.monotonic()
            on_tick(row, tick)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        if alerts is not None:
            alerts.close()
        if event_file:
            event_file.close()
        if recorder:
            summary.record = str(recorder.close({
                "watch": True, "target": stack.target, "mode": stack.mode, "rate_hz": rate,
                "workload": workload, "workload_pid": workload_pid}))
    return summary


def _sampler(workload_pid: int | None) -> Sampler:
    try:
        return Sampler(workload_pid)
    except psutil.NoSuchProcess:
        raise DataError(f"no process with pid {workload_pid}") from None
    except psutil.AccessDenied:
        raise DataError(f"not allowed to read the CPU times of pid {workload_pid}") from None
