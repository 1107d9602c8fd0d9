"""Can the twin catch a hidden process on any core, on every fresh recording, and better
than other detectors?

    python bench/anomaly.py [--repeats 1] [--train-seconds 30] [--normal-seconds 22]
                            [--seconds 36] [--target-core 0] [--seed 0] [--bases B]
                            [--source psutil|node_exporter] [--rate HZ]
                            [--keep DIR | --score DIR] [--json]
    python bench/anomaly.py --source node_exporter --repeats 2   # 1 Hz, unlabelled
    python bench/anomaly.py --workloads idle,io_bound,network_bound   # a narrower normal

Each of `--repeats` recordings is fresh, with its own seed (seed, seed + 1, …):
1. training runs, one per built-in workload (`--train-seconds` each);
2. held-out normal runs, one per workload (`--normal-seconds` each): false alarms;
3. injected runs, one per workload (`--seconds` each), in which hidden loads start at
   random moments unknown to the detectors, at least GAP_S apart and inside their run:
       full      a busy loop pinned to the target core, 2–10 s
       half      a loop pinned to the target core, busy 50 % of each 50 ms period, 2–10 s
       quarter   the same at 25 %, 2–10 s
       short     a full busy loop on the target core, 1–2 s
       any_core  a full busy loop, 2–10 s, pinned to a randomly chosen core
   The kinds take turns in a shuffled order, so each recording has about as many of each.

Detectors, all scored on the same recordings and calibrated on the same training runs to
the same false-alarm rate (1 an hour) with the same hysteresis (bench/anomaly_scoring.py):
cputwin (a twin of every core, independent mode, the `detect_wcpu` preset where the
recording has the workload's CPU use, each core's detector as `cputwin train` calibrates
it), static, netdata_kmeans, halfspacetrees, pca.

Reports per kind and detector: recall at the calibrated threshold (an alarm on the
injected core between the start and 2 s after the end), median and p95 delay, event-wise
PR-AUC; false alarms per core-hour on the held-out normal runs. With --repeats N, each
recording and the minimum and mean recall across them. `--keep DIR` keeps the
recordings; `--score DIR` scores kept recordings again without recording.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
import psutil

from anomaly_scoring import (
    DETECTORS,
    KINDS,
    Alarm,
    Calibrated,
    Event,
    Run,
    Scored,
    baselines,
    blind_share,
    detections,
    event_pr_auc,
    false_alarms,
    recall_and_delays,
    with_headroom,
)
from cputwin.cli import _finite as finite
from cputwin.errors import CputwinError
from cputwin.features.engine import workload_cpu_column
from cputwin.live.detector import calibrate
from cputwin.live.stream import OnlineTwin
from cputwin.pipeline import make_stack
from cputwin.telemetry.collector import Collector
from cputwin.telemetry.ingest import load_runs
from cputwin.telemetry.schema import (
    OVERALL,
    RUN_COLUMN,
    TIMESTAMP,
    WORKLOAD,
    WORKLOAD_CPU,
    core_columns_in,
)
from cputwin.telemetry.workloads import WORKLOADS

WARMUP_S = 4.0  # the collector's start and the twin's feature history (3 s), then 1 s of scores
GAP_S = 5.0  # normal operation between injections: the alarm clears, the lags refill
END_S = 1.5
TURN_S = 30.0  # an unlabelled recording's workloads take turns this long (node_exporter)
PERIOD_S = 0.05  # the partial-duty loops' period
# kind: (share of each period busy, shortest and longest length in s, on the target core?)
KIND_SPECS = {
    "full": (1.0, 2.0, 10.0, True),
    "half": (0.5, 2.0, 10.0, True),
    "quarter": (0.25, 2.0, 10.0, True),
    "short": (1.0, 1.0, 2.0, True),
    "any_core": (1.0, 2.0, 10.0, False),
}
LONGEST_S = max(spec[2] for spec in KIND_SPECS.values())


# ------------------------------------------------------------------ hidden loads


def hidden_load(core: int, seconds: float, duty: float = 1.0, period: float = PERIOD_S) -> None:
    """Pinned to `core`: spin for `seconds`, or, with duty < 1, use `duty` × `period` of CPU
    time in each period and sleep the rest. Counted in CPU time, not wall time, so the load
    asks the core for the same share when other processes compete for it (and never more:
    a period the core was too busy to give stretches, it is not made up afterwards)."""
    os.sched_setaffinity(0, {core})
    end = time.monotonic() + seconds
    x = 0
    if duty >= 1.0:
        while time.monotonic() < end:
            x = (x * 31 + 7) % 1_000_003
        return
    due = time.monotonic()
    while due < end:
        spent = time.process_time() + duty * period
        while time.process_time() < spent and time.monotonic() < end:
            x = (x * 31 + 7) % 1_000_003
        due = max(due + period, time.monotonic())  # a late period is not made up later
        time.sleep(max(0.0, min(due, end) - time.monotonic()))


class KindQueue:
    """Kinds in turn, in a fresh shuffled order each round (balanced counts per recording)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.pending = rng, []

    def peek(self) -> str:
        if not self.pending:
            self.pending = self.rng.sample(list(KINDS), len(KINDS))
        return self.pending[0]

    def take(self) -> str:
        return self.pending.pop(0)


def warmup_s(rate: float) -> float:
    """Seconds before the first hidden load of a run: the collector's start and the twin's
    feature history (30 ticks at `rate`), then a second of scores (WARMUP_S at 10 Hz)."""
    return max(WARMUP_S, 1.0 + 30.0 / rate)


def plan_run(seconds: float, kinds: KindQueue, target: int, n_cores: int,
             rng: random.Random, warmup: float = WARMUP_S) -> list[dict]:
    """Hidden loads for one injected run: as many as fit (each after `warmup`, GAP_S apart,
    ending over END_S before the run stops), spread over the run with random slack."""
    if seconds < warmup + END_S + LONGEST_S:
        raise ValueError(f"injected runs need {warmup + END_S + LONGEST_S:.1f} s or more "
                         f"(--seconds {seconds:g})")
    chosen: list[dict] = []
    used = warmup + END_S
    while True:
        kind = kinds.peek()
        duty, shortest, longest, on_target = KIND_SPECS[kind]
        length = rng.uniform(shortest, longest)
        core = target if on_target else rng.randrange(n_cores)
        need = length + (GAP_S if chosen else 0.0)
        if used + need > seconds:
            break
        kinds.take()
        chosen.append({"kind": kind, "core": core, "duty": duty, "length": length})
        used += need
    cuts = sorted(rng.uniform(0, seconds - used) for _ in chosen)
    at, before = warmup, 0.0
    for item, cut in zip(chosen, cuts, strict=True):
        at += cut - before
        before = cut
        item["offset"] = at
        at += item["length"] + GAP_S
    return chosen


def injector(stop: threading.Event, plan: list[dict], events: list[Event]) -> None:
    """Run `plan`'s hidden loads (offsets from now), each in its own process; log them."""
    t0 = time.time()
    for item in plan:
        if stop.wait(max(0.0, t0 + item["offset"] - time.time())):
            return
        proc = mp.get_context("fork").Process(
            target=hidden_load, args=(item["core"], item["length"], item["duty"]))
        begin = time.time()
        proc.start()
        proc.join()
        events.append(Event(item["kind"], item["core"], begin, time.time()))


# ------------------------------------------------------------------ recording


def record_set(folder: Path, seconds: float, plans: list[list[dict]] | None = None,
               workloads: list[str] | None = None) -> list[Event]:
    """One run per workload; with `plans` (one per workload), its hidden loads."""
    events: list[Event] = []
    collector = Collector()
    for i, name in enumerate(workloads or list(WORKLOADS)):
        stop = threading.Event()
        thread = None
        if plans is not None:
            thread = threading.Thread(target=injector, args=(stop, plans[i], events), daemon=True)
            thread.start()
        collector.record(name, seconds, folder)
        stop.set()
        if thread is not None:
            thread.join()
    return events


def record_unlabelled(folder: Path, seconds: float, url: str, rate: float,
                      plan: list[dict] | None = None,
                      names: list[str] | None = None) -> list[Event]:
    """What an operator's exporter gives: one unlabelled run of this machine scraped from
    its node_exporter at `rate`, while the built-in workloads (or `names`) take turns of
    TURN_S (`seconds` each in all) and, with `plan`, hidden loads run. Turns, not one
    stretch per workload: any stretch of a host's history holds each of its behaviours,
    so the twin's earliest folds see every workload, as hours of an exporter's data do."""
    names = names or list(WORKLOADS)
    from cputwin.telemetry.prometheus import NodeExporterSampler
    from cputwin.telemetry.workloads import WorkloadProcess

    events: list[Event] = []
    stop = threading.Event()
    turns = max(1, round(seconds / TURN_S))

    def workloads() -> None:
        for _ in range(turns):
            for name in names:
                proc = WorkloadProcess(WORKLOADS[name])
                proc.start()
                try:
                    if stop.wait(seconds / turns):
                        return
                finally:
                    proc.stop()

    threads = [threading.Thread(target=workloads, daemon=True)]
    if plan is not None:
        threads.append(threading.Thread(target=injector, args=(stop, plan, events), daemon=True))
    sampler = NodeExporterSampler(url)
    for thread in threads:
        thread.start()
    try:
        Collector(rate=rate).record_from(sampler, seconds * len(names), folder)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return events


def node_exporter(folder: Path) -> tuple[subprocess.Popen, str]:
    """Debian's prometheus-node-exporter on a free loopback port, and its /metrics URL."""
    program = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if program is None:
        raise ValueError("--source node_exporter needs prometheus-node-exporter (Debian "
                         "package prometheus-node-exporter)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(folder / "node_exporter.log", "wb")  # noqa: SIM115 (the process keeps it)
    proc = subprocess.Popen([program, f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise ValueError(f"{program} did not answer on {url}")


def record(root: Path, seed: int, settings: dict, say) -> None:
    """One fresh recording in `root`: train/, normal/, inject/, events.json, recording.json.
    With settings["source"] == "node_exporter", each part is one unlabelled run scraped
    from this machine's node_exporter at settings["rate"] (`record_unlabelled`)."""
    if (root / "events.json").exists():
        raise ValueError(f"{root}: holds a recording already; score it with --score")
    rng = random.Random(seed)
    n_cores = psutil.cpu_count(logical=True) or 1
    if settings["target_core"] >= n_cores:
        raise ValueError(f"--target-core {settings['target_core']}: this machine has {n_cores} cores")
    kinds = KindQueue(rng)
    names = settings.get("workloads") or list(WORKLOADS)
    if settings.get("source", "psutil") == "node_exporter":
        root.mkdir(parents=True, exist_ok=True)
        exporter, url = node_exporter(root)
        try:
            total = settings["seconds"] * len(names)
            plan = plan_run(total, kinds, settings["target_core"], n_cores, rng,
                            warmup_s(settings["rate"]))
            for part, seconds, hidden in (("train", settings["train_seconds"], None),
                                          ("normal", settings["normal_seconds"], None),
                                          ("inject", settings["seconds"], plan)):
                say(f"recording {root.name}: {part} (node_exporter at {settings['rate']:g} Hz"
                    + (f", {len(plan)} hidden loads)" if hidden else ")"))
                events = record_unlabelled(root / part, seconds, url, settings["rate"], hidden,
                                           names)
        finally:
            exporter.terminate()
            exporter.wait(10)
    else:
        plans = [plan_run(settings["seconds"], kinds, settings["target_core"], n_cores, rng)
                 for _ in names]
        say(f"recording {root.name}: training runs")
        record_set(root / "train", settings["train_seconds"], workloads=names)
        say(f"recording {root.name}: held-out normal runs")
        record_set(root / "normal", settings["normal_seconds"], workloads=names)
        say(f"recording {root.name}: injected runs ({sum(map(len, plans))} hidden loads)")
        events = record_set(root / "inject", settings["seconds"], plans, names)
    (root / "events.json").write_text(json.dumps([asdict(e) for e in events], indent=1))
    turns = {"turn_s": TURN_S} if settings.get("source") == "node_exporter" else {}
    (root / "recording.json").write_text(json.dumps(
        {"seed": seed, **settings, **turns, "instrument": instrument()}, indent=1))


def instrument() -> dict:
    """This machine: core count and CPU model (what the figures were measured on)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"logical_cores": psutil.cpu_count(logical=True), "cpu_model": model}


# ------------------------------------------------------------------ the detectors


def default_bases(train: pl.DataFrame) -> str:
    """detect_wcpu where the recording has the workload's CPU use, detect otherwise."""
    measured = WORKLOAD_CPU in train.columns and train[WORKLOAD_CPU].null_count() < train.height
    return "detect_wcpu" if measured else "detect"


def fit_machine_twin(train: pl.DataFrame, bases: str, per_core: bool = False) -> list[OnlineTwin]:
    """cputwin watching every core, each core's detector as `cputwin train` calibrates it:
    one machine twin (`cputwin train --target all`), or with `per_core` one twin per core
    (to compare). Either way the ticks name their cores (`Tick.cores`)."""
    targets = core_columns_in(train.columns) if per_core else ["all"]
    twins = []
    for target in targets:
        stack = make_stack(target, bases=bases, mode="independent").fit(train)
        twins.append(OnlineTwin(stack, detector=calibrate(stack, train)))
    return twins


def relative(score: float | None, threshold: float) -> float:
    """A score over its threshold (1 = the threshold; order kept for any threshold)."""
    if score is None:
        return float("nan")
    return score / threshold if threshold > 0 else score - threshold + 1.0


def cputwin_scored(twins: list[OnlineTwin], run: pl.DataFrame) -> Scored:
    """Stream one run through every twin, tick by tick, as `cputwin watch` would."""
    columns = core_columns_in(run.columns)
    cores = run.select(columns).to_numpy()
    overall, workloads = run[OVERALL].to_numpy(), run[WORKLOAD].to_list()
    rel = np.full(cores.shape, np.nan)
    blind = np.zeros(cores.shape, bool)
    for twin in twins:
        own = (workload_cpu_column(run, "this twin").to_numpy() if twin.reads_workload_cpu
               else np.full(run.height, np.nan))
        stream = twin.stream()
        thresholds = {t: d.threshold for t, d in twin.detectors.items()}
        for i in range(run.height):
            for core in stream.update(cores[i], overall[i], workloads[i], own[i]).cores:
                rel[i, columns.index(core.target)] = relative(core.score, thresholds[core.target])
                blind[i, columns.index(core.target)] = core.blind
    return Scored(run[TIMESTAMP].to_numpy(), rel, blind)


def as_run(run: pl.DataFrame) -> Run:
    return Run(str(run[RUN_COLUMN][0]), str(run[WORKLOAD][0]), run[TIMESTAMP].to_numpy(),
               run.select(core_columns_in(run.columns)).to_numpy().astype(float))


# ------------------------------------------------------------------ scoring


def load_recording(root: Path) -> tuple[dict[str, pl.DataFrame], list[Event], dict]:
    frames = {part: load_runs(root / part) for part in ("train", "normal", "inject")}
    events = [Event(**e) for e in json.loads((root / "events.json").read_text())]
    meta = json.loads((root / "recording.json").read_text())
    return frames, events, meta


def score_recording(root: Path, bases: str | None, per_core: bool, say) -> dict:
    """Every detector on one recording: per kind recall, delays, PR-AUC; false alarms."""
    frames, events, meta = load_recording(root)
    train = frames["train"]
    normal, inject = (frames[p].partition_by(RUN_COLUMN, maintain_order=True)
                      for p in ("normal", "inject"))
    step = float(np.median(np.diff(frames["normal"][TIMESTAMP].to_numpy())))
    hours = frames["normal"].height * step / 3600
    n_cores = len(core_columns_in(train.columns))
    bases = bases or default_bases(train)
    scored: dict[str, tuple[list[Scored], list[Scored]]] = {}
    started = time.monotonic()
    twins = fit_machine_twin(train, bases, per_core)
    detectors = {t: d for twin in twins for t, d in twin.detectors.items()}
    alarm = Alarm.of(next(iter(detectors.values())))  # the same for every detector
    scored["cputwin"] = ([cputwin_scored(twins, r) for r in normal],
                         [cputwin_scored(twins, r) for r in inject])
    thresholds: dict[str, object] = {"cputwin": {t: d.threshold for t, d in detectors.items()}}
    power = {t: d.power for t, d in detectors.items()}
    say(f"scoring {root.name}: cputwin {time.monotonic() - started:.0f} s")
    train_runs = [as_run(r) for r in train.partition_by(RUN_COLUMN, maintain_order=True)]
    for baseline in baselines(meta.get("seed", 0)):
        started = time.monotonic()
        model = Calibrated(baseline, alarm, rate_hz=1.0 / step).fit(train_runs)
        scored[baseline.name] = ([model.score(as_run(r)) for r in normal],
                                 [model.score(as_run(r)) for r in inject])
        thresholds[baseline.name] = {f"{c}/{g}": t for (c, g), t in model.thresholds_.items()}
        say(f"scoring {root.name}: {baseline.name} {time.monotonic() - started:.0f} s")
    out: dict = {"recording": str(root), "seed": meta.get("seed"), "bases": bases,
                 "instrument": meta.get("instrument"),
                 "settings": {k: meta.get(k) for k in ("train_seconds", "normal_seconds",
                                                       "seconds", "target_core", "source",
                                                       "rate", "workloads")},
                 "normal_hours": hours, "cores": n_cores,
                 "events": {k: sum(e.kind == k for e in events) for k in KINDS},
                 "kinds": {k: {} for k in KINDS}, "false_alarms": {}, "thresholds": thresholds,
                 "cputwin_power": power, "cputwin": "per-core twins" if per_core else "machine twin"}
    for name in DETECTORS:
        on_normal, on_inject = scored[name]
        delays = detections(on_inject, events, alarm)
        for kind in KINDS:
            mine = [d for d, e in zip(delays, events, strict=True) if e.kind == kind]
            kind_events = [e for e in events if e.kind == kind]
            out["kinds"][kind][name] = {
                **recall_and_delays(mine), "delays_s": mine,
                "pr_auc": event_pr_auc(on_normal + on_inject, events, kind_events, alarm)}
            if name == "cputwin":
                out["kinds"][kind][name]["headroom"] = with_headroom(
                    mine, [blind_share(on_inject, e) for e in kind_events])
        out["false_alarms"][name] = false_alarms(on_normal, alarm)
    return out


def _stat(values: list, fn) -> float | None:
    values = [v for v in values if v is not None]
    return float(fn(values)) if values else None


def summarise(results: list[dict]) -> dict:
    """Across recordings: recall min and mean, delays pooled, PR-AUC mean, false alarms."""
    kinds: dict = {}
    for kind in KINDS:
        kinds[kind] = {}
        for name in DETECTORS:
            per = [r["kinds"][kind][name] for r in results]
            delays = [d for p in per for d in p["delays_s"] if d is not None]
            kinds[kind][name] = {
                "recall_min": _stat([p["recall"] for p in per], min),
                "recall_mean": _stat([p["recall"] for p in per], np.mean),
                "median_delay_s": float(np.median(delays)) if delays else None,
                "p95_delay_s": float(np.percentile(delays, 95)) if delays else None,
                "pr_auc": _stat([p["pr_auc"] for p in per], np.mean),
                "events": sum(p["events"] for p in per)}
            if all("headroom" in p for p in per):
                seen = [p["headroom"] for p in per]
                kinds[kind][name]["headroom"] = {
                    "recall_min": _stat([h["recall"] for h in seen], min),
                    "recall_mean": _stat([h["recall"] for h in seen], np.mean),
                    "events": sum(h["events"] for h in seen),
                    "blind_events": sum(h["blind_events"] for h in seen)}
    core_hours = sum(r["normal_hours"] * r["cores"] for r in results)
    return {"recordings": len(results),
            "normal_hours": sum(r["normal_hours"] for r in results),
            "kinds": kinds,
            "false_alarms_per_hour": {d: sum(r["false_alarms"][d] for r in results) / core_hours
                                      for d in DETECTORS},
            "per_recording": results,
            # where the recordings were made (a re-scored recording keeps its machine)
            "instrument": results[0]["instrument"], "settings": results[0]["settings"]}


# ------------------------------------------------------------------ output


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def beaten(summary: dict) -> list[str]:
    """Where a baseline's mean recall is above cputwin's."""
    lines = []
    for kind in KINDS:
        mine = summary["kinds"][kind]["cputwin"]["recall_mean"]
        for name in DETECTORS[1:]:
            theirs = summary["kinds"][kind][name]["recall_mean"]
            if theirs is not None and (mine is None or theirs > mine):
                lines.append(f"{name} beats cputwin on {kind}: recall {theirs:.2f} vs "
                             f"{_fmt(mine)}")
    return lines


def headroom_line(summary: dict) -> str:
    """cputwin's recall over the loads on a core with headroom, and how many loads fell
    where it said it was blind (the core expected so busy that no extra load could show)."""
    cells = []
    for kind in KINDS:
        h = summary["kinds"][kind]["cputwin"].get("headroom")
        if h is not None:
            cells.append(f"{kind} {_fmt(h['recall_mean'])} ({_fmt(h['recall_min'])}) of "
                         f"{h['events']}, {h['blind_events']} blind")
    return ("cputwin where the core had headroom (said blind for under half the load), "
            "recall mean (min): " + "; ".join(cells)) if cells else ""


def table(summary: dict) -> str:
    width = 16
    head = f"{'detector':<16}" + "".join(f"{k:>{width}}" for k in KINDS) + f"{'false/h':>9}"
    out = [f"{summary['recordings']} recording(s), {summary['normal_hours'] * 60:.1f} min of "
           "held-out normal time; instrument: "
           f"{summary['instrument']['logical_cores']} cores, {summary['instrument']['cpu_model']}",
           "", "recall mean (min) | median delay s | PR-AUC; false/h: false alarms per core-hour "
           "on the held-out normal runs", head]
    for name in DETECTORS:
        row = [f"{name:<16}"]
        for kind in KINDS:
            c = summary["kinds"][kind][name]
            row.append(f"{_fmt(c['recall_mean'])} ({_fmt(c['recall_min'])})".rjust(width))
        row.append(f"{summary['false_alarms_per_hour'][name]:>9.2f}")
        out.append("".join(row))
        out.append(f"{'':<16}" + "".join(
            f"{_fmt(summary['kinds'][k][name]['median_delay_s'])} | "
            f"{_fmt(summary['kinds'][k][name]['pr_auc'])}".rjust(width) for k in KINDS))
    events = {k: summary["kinds"][k]["cputwin"]["events"] for k in KINDS}
    out.append("events: " + ", ".join(f"{k} {n}" for k, n in events.items()))
    out.append(headroom_line(summary))
    out.append("per recording, cputwin recall: " + "; ".join(
        f"seed {r['seed']}: " + " ".join(f"{k} {_fmt(r['kinds'][k]['cputwin']['recall'])}"
                                          for k in KINDS) for r in summary["per_recording"]))
    wins = beaten(summary)
    out.append("\n".join(wins) if wins else "no baseline's recall is above cputwin's on any kind")
    return "\n".join(out)


def markdown(summary: dict, command: str) -> str:
    """The table as Markdown, for docs/anomaly.md (pasted as the command prints it)."""
    inst, settings = summary["instrument"], summary["settings"]
    out = [f"`{command}` on {inst['logical_cores']} logical cores ({inst['cpu_model']}): "
           f"{summary['recordings']} recording(s), "
           f"{summary['normal_hours'] * 60:.1f} min of held-out normal time, source "
           f"{settings.get('source') or 'psutil'} at {settings.get('rate') or 10:g} Hz, "
           f"workloads {', '.join(settings.get('workloads') or WORKLOADS)}.", "",
           "Each cell: recall, mean (min over recordings) · median delay s · event-wise PR-AUC.",
           "", "| detector | " + " | ".join(KINDS) + " | false alarms per core-hour |",
           "|---|" + "---|" * len(KINDS) + "---|"]
    for name in DETECTORS:
        cells = []
        for kind in KINDS:
            c = summary["kinds"][kind][name]
            cells.append(f"{_fmt(c['recall_mean'])} ({_fmt(c['recall_min'])}) · "
                         f"{_fmt(c['median_delay_s'], '.1f')} · {_fmt(c['pr_auc'])}")
        out.append(f"| {name} | " + " | ".join(cells)
                   + f" | {_fmt(summary['false_alarms_per_hour'][name])} |")
    events = {k: summary["kinds"][k]["cputwin"]["events"] for k in KINDS}
    out += ["", "Hidden loads: " + ", ".join(f"{k} {n}" for k, n in events.items()) + ".", "",
            headroom_line(summary), "",
            "cputwin's recall per recording:", "",
            "| seed | " + " | ".join(KINDS) + " | false alarms |",
            "|---|" + "---|" * len(KINDS) + "---|"]
    for r in summary["per_recording"]:
        out.append(f"| {r['seed']} | " + " | ".join(
            _fmt(r["kinds"][k]["cputwin"]["recall"]) for k in KINDS)
            + f" | {r['false_alarms']['cputwin']} |")
    wins = beaten(summary)
    out += ["", "; ".join(wins) + "." if wins else
            "No baseline's mean recall is above cputwin's on any kind."]
    return "\n".join(out)


def recordings_in(folder: Path) -> list[Path]:
    if (folder / "events.json").exists():
        return [folder]
    found = sorted(p for p in folder.glob("recording_*") if (p / "events.json").exists())
    if not found:
        raise ValueError(f"{folder}: no recordings (recording_*/events.json) to score")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="fresh recordings (seeds seed…)")
    parser.add_argument("--train-seconds", type=float, default=30.0, help="per training run")
    parser.add_argument("--normal-seconds", type=float, default=22.0,
                        help="per held-out normal run")
    parser.add_argument("--seconds", type=float, default=36.0, help="per injected run")
    parser.add_argument("--target-core", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bases", choices=("detect", "detect_wcpu"),
                        help="cputwin's preset (default: detect_wcpu where the recording has "
                             "the workload's CPU use, else detect)")
    parser.add_argument("--per-core-twins", action="store_true",
                        help="cputwin as one twin per core instead of one machine twin")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--keep", type=Path, help="keep the recordings in this folder")
    where.add_argument("--score", type=Path, help="score the recordings kept in this folder "
                                                  "again, without recording")
    parser.add_argument("--source", choices=("psutil", "node_exporter"), default="psutil",
                        help="psutil: labelled runs at --rate (10 Hz); node_exporter: "
                             "this machine's node_exporter scraped at --rate (1 Hz), one "
                             "unlabelled run per part while the workloads take turns")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="the built-in workloads that make up normal operation, comma "
                             "separated (default: all)")
    parser.add_argument("--rate", type=float, default=None,
                        help="samples per second (default 10, or 1 with node_exporter)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--markdown", action="store_true",
                        help="print the table as Markdown (docs/anomaly.md)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    rate = args.rate or (1.0 if args.source == "node_exporter" else 10.0)
    if args.source == "psutil" and rate != 10.0:
        parser.error("--rate applies to --source node_exporter (psutil records at 10 Hz)")
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown or not names:
        parser.error(f"--workloads: unknown workload {unknown[0] if unknown else '(none)'!r} "
                     f"(choose from {', '.join(WORKLOADS)})")

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    settings = {"train_seconds": args.train_seconds, "normal_seconds": args.normal_seconds,
                "seconds": args.seconds, "target_core": args.target_core,
                "source": args.source, "rate": rate, "workloads": names}
    machine = instrument()
    say(f"instrument: {machine['logical_cores']} logical cores, {machine['cpu_model']}")
    warnings.simplefilter("ignore")
    try:
        with tempfile.TemporaryDirectory(prefix="cputwin-anomaly-") as tmp:
            if args.score:
                roots = recordings_in(args.score)
            else:
                per = len(names) * (args.train_seconds + args.normal_seconds + args.seconds)
                say(f"recording {args.repeats} × {per / 60:.1f} min = "
                    f"{args.repeats * per / 60:.1f} min (keep the machine quiet), then scoring")
                base = args.keep or Path(tmp)
                roots = [base / f"recording_{args.seed + i}" for i in range(args.repeats)]
                for i, root in enumerate(roots):
                    record(root, args.seed + i, settings, say)
            results = [score_recording(root, args.bases, args.per_core_twins, say)
                       for root in roots]
    except (ValueError, CputwinError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # one line, as every cputwin command
        sys.exit(2)
    summary = finite(summarise(results))  # JSON has no NaN or inf: null
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
    elif args.markdown:
        print(markdown(summary, "python bench/anomaly.py " + " ".join(sys.argv[1:])))
    else:
        print(table(summary))


if __name__ == "__main__":
    main()
