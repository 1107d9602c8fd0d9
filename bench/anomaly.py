"""End to end: can the twin catch a hidden process on its core?

    python bench/anomaly.py [--seconds 30] [--injections 3] [--target-core 0] [--json]

1. Records one normal run per built-in workload with the collector (training data), and
   a second set (held-out normal runs, for false alarms).
2. Trains an independent-mode twin and a sensor-mode twin on the first set; each calibrates
   its detector on out-of-fold residuals (1 false alarm per hour).
3. Records one more run per workload while, at random moments unknown to the detector, a
   busy-loop process pinned to the target core (os.sched_setaffinity) runs for 2–10 s.
4. Replays every held-out and injected run through each twin's stream, tick by tick.

Reports, per mode: recall over the injected intervals (an alarm raised between the start
and 2 s after the end), median and p95 detection delay, and false alarms per hour on
the held-out normal runs. Takes about 3 × 6 × `--seconds` of recording.
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

from cputwin.live.detector import calibrate
from cputwin.live.stream import OnlineTwin
from cputwin.models import TwinStack
from cputwin.telemetry.collector import Collector
from cputwin.telemetry.ingest import load_runs
from cputwin.telemetry.schema import OVERALL, RUN_COLUMN, TIMESTAMP, WORKLOAD
from cputwin.telemetry.workloads import WORKLOADS

GRACE_S = 2.0


def busy(core: int, seconds: float) -> None:
    os.sched_setaffinity(0, {core})
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x = (x * 31 + 7) % 1_000_003


def injector(stop: threading.Event, count: int, seconds: float, core: int,
             rng: random.Random, intervals: list[tuple[float, float]]) -> None:
    """Start `count` pinned busy loops at random moments of a run; log their wall times."""
    slots = sorted(rng.uniform(2.0, seconds - 12.0) for _ in range(count))
    t0 = time.time()
    for start in slots:
        if stop.wait(max(0.0, t0 + start - time.time())):
            return
        length = rng.uniform(2.0, 10.0)
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
            args = (stop, inject, seconds, core, rng, intervals)
            threading.Thread(target=injector, args=args, daemon=True).start()
        collector.record(name, seconds, folder)
        stop.set()
    return intervals


def replay_alarms(stack: TwinStack, detector, frame: pl.DataFrame) -> list[float]:
    """Timestamps of every alarm raise, each run on its own stream."""
    twin = OnlineTwin(stack, detector=detector)
    cores = frame.select(twin.schema.core_columns).to_numpy()
    overall, workloads = frame[OVERALL].to_numpy(), frame[WORKLOAD].to_list()
    stamps, runs = frame[TIMESTAMP].to_numpy(), frame[RUN_COLUMN].to_list()
    raises, stream, current = [], None, None
    for i in range(frame.height):
        if runs[i] != current:
            stream, current = twin.stream(), runs[i]
        if stream.update(cores[i], overall[i], workloads[i]).event == "raise":
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


def run(seconds: float, injections: int, core: int, seed: int, keep: Path | None = None) -> dict:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = keep or Path(tmp)
        train_dir, normal_dir, inject_dir = (root / d for d in ("train", "normal", "inject"))
        if (root / "intervals.json").exists():  # a kept recording: score it again
            intervals = [tuple(i) for i in json.loads((root / "intervals.json").read_text())]
        else:
            record_set(train_dir, seconds)
            record_set(normal_dir, seconds)
            intervals = record_set(inject_dir, seconds, injections, core, rng)
            (root / "intervals.json").write_text(json.dumps(intervals))
        train, normal, injected = (load_runs(d) for d in (train_dir, normal_dir, inject_dir))
        target = f"cpu_util_core_{core}"
        hours = normal.height / 10 / 3600
        out: dict = {"seconds_per_run": seconds, "target": target,
                     "normal_hours": hours, "injected_intervals": len(intervals)}
        for mode in ("independent", "sensor"):
            stack = TwinStack(bases=["physics_linear", "gbm_l2", "gbm_pooled"], target=target,
                              mode=mode, meta_model="auto").fit(train)
            detector = calibrate(stack, train)
            false_alarms = len(replay_alarms(stack, detector, normal))
            result = score(replay_alarms(stack, detector, injected), intervals)
            result["false_alarms_per_hour"] = false_alarms / hours
            result["false_alarms"] = false_alarms
            out[mode] = result
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--injections", type=int, default=2, help="per injected run")
    parser.add_argument("--target-core", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="keep the recordings here (and reuse them)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    r = run(args.seconds, args.injections, args.target_core, args.seed, args.keep)
    if args.json:
        sys.stdout.write(json.dumps(r, indent=2) + "\n")
        return
    print(f"target {r['target']}, {r['injected_intervals']} injected intervals, "
          f"{r['normal_hours'] * 60:.1f} min of held-out normal runs")
    print(f"{'mode':<13}{'recall':>8}{'median s':>10}{'p95 s':>8}{'false/h':>9}")
    for mode in ("independent", "sensor"):
        m = r[mode]
        print(f"{mode:<13}{m['recall']:>8.2f}{m['median_delay_s']:>10.2f}{m['p95_delay_s']:>8.2f}"
              f"{m['false_alarms_per_hour']:>9.1f}")


if __name__ == "__main__":
    main()
