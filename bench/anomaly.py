"""End to end: can the twin catch a hidden process on its core?

    python bench/anomaly.py [--seconds 30] [--injections 2] [--train-seconds S]
                            [--normal-seconds S] [--target-core 0] [--keep DIR] [--json]

1. Records one normal run per built-in workload with the collector (training data), and
   a second set (held-out normal runs, for false alarms).
2. Trains an independent-mode twin and a sensor-mode twin on the first set, both with the
   `detect_wcpu` preset (bases that learn from every core's rows and read the workload's
   own CPU use; `detect`, without it, for recordings made before the collector measured
   it, or with --bases); each calibrates its detector on out-of-fold residuals (1 false
   alarm per hour).
3. Records one more run per workload while, at random moments unknown to the detector, a
   busy-loop process pinned to the target core (os.sched_setaffinity) runs for 2–10 s;
   injections are at least GAP_S apart and end inside their run, so each is its own event.
4. Replays every held-out and injected run through each twin's stream, tick by tick.

Reports, per mode: recall over the injected intervals (an alarm raised between the start
and 2 s after the end), median and p95 detection delay, and false alarms per hour on
the held-out normal runs. Takes 6 × (train + normal + injected seconds) of recording.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import polars as pl

from cputwin.features.engine import workload_cpu_column
from cputwin.live.detector import calibrate
from cputwin.live.stream import OnlineTwin
from cputwin.models import TwinStack
from cputwin.telemetry.collector import Collector
from cputwin.telemetry.ingest import load_runs
from cputwin.telemetry.schema import OVERALL, RUN_COLUMN, TIMESTAMP, WORKLOAD, WORKLOAD_CPU
from cputwin.telemetry.workloads import WORKLOADS

GRACE_S = 2.0  # an alarm up to this long after an injection ends still counts for it
WARMUP_S = 3.0  # the collector's start and the features' history
GAP_S = 5.0  # normal operation between injections: the alarm clears, the lags refill
END_S = 1.5


def busy(core: int, seconds: float) -> None:
    os.sched_setaffinity(0, {core})
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x = (x * 31 + 7) % 1_000_003


def schedule(count: int, seconds: float, rng: random.Random) -> list[tuple[float, float]]:
    """`count` (start, length) pairs inside a run of `seconds`: lengths of 2–10 s, apart by
    at least GAP_S of normal operation (so each is its own anomaly, not the tail of the last
    one), the first after WARMUP_S, the last over END_S before the run stops."""
    need = WARMUP_S + END_S + 10.0 * count + GAP_S * (count - 1)
    if seconds < need:
        raise ValueError(f"{count} injections of up to 10 s need runs of {need:.1f} s or more; "
                         "raise --seconds or lower --injections")
    lengths = [rng.uniform(2.0, 10.0) for _ in range(count)]
    slack = seconds - WARMUP_S - END_S - sum(lengths) - GAP_S * (count - 1)
    cuts = sorted(rng.uniform(0, slack) for _ in range(count))
    out, at = [], WARMUP_S
    for cut, before, length in zip(cuts, [0.0, *cuts[:-1]], lengths, strict=True):
        at += cut - before
        out.append((at, length))
        at += length + GAP_S
    return out


def injector(stop: threading.Event, plan: list[tuple[float, float]], core: int,
             intervals: list[tuple[float, float]]) -> None:
    """Run the pinned busy loops of `plan` (offsets from now); log their wall times."""
    t0 = time.time()
    for start, length in plan:
        if stop.wait(max(0.0, t0 + start - time.time())):
            return
        proc = mp.get_context("fork").Process(target=busy, args=(core, length))
        begin = time.time()
        proc.start()
        proc.join()
        intervals.append((begin, time.time()))


def record_set(folder: Path, seconds: float, inject: int = 0, core: int = 0,
               rng: random.Random | None = None) -> list[tuple[float, float]]:
    """One run per workload; with `inject`, hidden busy loops at random moments."""
    intervals: list[tuple[float, float]] = []
    collector = Collector()
    for name in WORKLOADS:
        stop = threading.Event()
        if inject:
            plan = schedule(inject, seconds, rng)
            threading.Thread(target=injector, args=(stop, plan, core, intervals),
                             daemon=True).start()
        collector.record(name, seconds, folder)
        stop.set()
    return intervals


def replay_alarms(stack: TwinStack, detector, frame: pl.DataFrame) -> list[float]:
    """Timestamps of every alarm raise, each run on its own stream."""
    twin = OnlineTwin(stack, detector=detector)
    cores = frame.select(twin.schema.core_columns).to_numpy()
    overall, workloads = frame[OVERALL].to_numpy(), frame[WORKLOAD].to_list()
    own = (workload_cpu_column(frame, "this twin").to_numpy() if twin.reads_workload_cpu
           else np.full(frame.height, np.nan))  # as `stream.replay` feeds it
    stamps, runs = frame[TIMESTAMP].to_numpy(), frame[RUN_COLUMN].to_list()
    raises, stream, current = [], None, None
    for i in range(frame.height):
        if runs[i] != current:
            stream, current = twin.stream(), runs[i]
        if stream.update(cores[i], overall[i], workloads[i], own[i]).event == "raise":
            raises.append(float(stamps[i]))
    return raises


def score(raises: list[float], intervals: list[tuple[float, float]]) -> dict[str, float]:
    delays = []
    for start, end in intervals:
        hit = [t - start for t in raises if start <= t <= end + GRACE_S]
        if hit:
            delays.append(min(hit))
    return {
        "intervals": len(intervals),
        "recall": len(delays) / len(intervals) if intervals else float("nan"),
        "median_delay_s": float(np.median(delays)) if delays else float("nan"),
        "p95_delay_s": float(np.percentile(delays, 95)) if delays else float("nan"),
    }


def default_bases(train: pl.DataFrame) -> str:
    """detect_wcpu where the recording has the workload's CPU use, detect otherwise."""
    measured = WORKLOAD_CPU in train.columns and train[WORKLOAD_CPU].null_count() < train.height
    return "detect_wcpu" if measured else "detect"


def run(seconds: float, injections: int, core: int, seed: int, keep: Path | None = None,
        train_seconds: float | None = None, normal_seconds: float | None = None,
        bases: str | None = None) -> dict:
    rng = random.Random(seed)
    schedule(injections, seconds, random.Random(seed))  # a plan that cannot fit fails now
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = keep or Path(tmp)
        train_dir, normal_dir, inject_dir = (root / d for d in ("train", "normal", "inject"))
        if (root / "intervals.json").exists():  # a kept recording: score it again
            intervals = [tuple(i) for i in json.loads((root / "intervals.json").read_text())]
        else:
            record_set(train_dir, train_seconds or seconds)
            record_set(normal_dir, normal_seconds or seconds)
            intervals = record_set(inject_dir, seconds, injections, core, rng)
            (root / "intervals.json").write_text(json.dumps(intervals))
        train, normal, injected = (load_runs(d) for d in (train_dir, normal_dir, inject_dir))
        target = f"cpu_util_core_{core}"
        hours = normal.height / 10 / 3600
        bases = bases or default_bases(train)
        out: dict = {"seconds_per_run": seconds, "target": target, "bases": bases,
                     "normal_hours": hours, "injected_intervals": len(intervals)}
        for mode in ("independent", "sensor"):
            stack = TwinStack(bases=bases, target=target, mode=mode,
                              meta_model="auto").fit(train)
            detector = calibrate(stack, train)
            false_alarms = len(replay_alarms(stack, detector, normal))
            result = score(replay_alarms(stack, detector, injected), intervals)
            result["false_alarms_per_hour"] = false_alarms / hours
            result["false_alarms"] = false_alarms
            out[mode] = result
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="per injected run")
    parser.add_argument("--train-seconds", type=float, help="per training run (default: --seconds)")
    parser.add_argument("--normal-seconds", type=float,
                        help="per held-out normal run (default: --seconds)")
    parser.add_argument("--injections", type=int, default=2, help="per injected run")
    parser.add_argument("--target-core", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="keep the recordings here (and reuse them)")
    parser.add_argument("--bases", choices=("detect", "detect_wcpu"),
                        help="the twins' preset (default: detect_wcpu where the recording has "
                             "the workload's CPU use, else detect)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    try:
        r = run(args.seconds, args.injections, args.target_core, args.seed, args.keep,
                args.train_seconds, args.normal_seconds, args.bases)
    except ValueError as exc:
        parser.error(str(exc))
    if args.json:
        sys.stdout.write(json.dumps(r, indent=2) + "\n")
        return
    print(f"target {r['target']}, bases {r['bases']}, {r['injected_intervals']} injected intervals, "
          f"{r['normal_hours'] * 60:.1f} min of held-out normal runs")
    print(f"{'mode':<13}{'recall':>8}{'median s':>10}{'p95 s':>8}{'false/h':>9}")
    for mode in ("independent", "sensor"):
        m = r[mode]
        print(f"{mode:<13}{m['recall']:>8.2f}{m['median_delay_s']:>10.2f}{m['p95_delay_s']:>8.2f}"
              f"{m['false_alarms_per_hour']:>9.1f}")


if __name__ == "__main__":
    main()
