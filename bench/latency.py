"""Per-tick latency of the live twin: one sample in, one stacked prediction out.

    python bench/latency.py [--ticks 10000] [--naive-ticks 500] [--bases seed]
                            [--mode sensor] [--target T] [--cores N] [--json]
    python bench/latency.py --target all --cores 16 --bases detect --mode independent


Fits a stack (default: the seed's pair, v2.0 + v2.3, under its RidgeCV meta-model) on
the embedded sample, then streams samples through `TwinStream.update` (trees scored by
the compiled kernel of `models/forest.py`, then by LightGBM's own single-row path) and, in
the same run, through the naive path a notebook user would write: append the sample to a pandas
window, recompute the features with pandas, call `Booster.predict` on a one-row
DataFrame per base, combine. Reports p50 / p99 / max in microseconds and the ratio of
the medians.

`--target all` times a machine twin (every core predicted and scored each tick, one
detector per core); `--cores N` makes an N-core recording from the sample by tiling its
cores, each copy shifted in time within its run, so a 16-core tick can be timed on any
machine. The machine twin has no naive path to compare with; its p99 is checked against
TICK_BUDGET_US.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import numpy as np
import pandas as pd
import polars as pl

from cputwin import TwinStack, load_runs
from cputwin.features.reference import reference_features
from cputwin.live.detector import calibrate
from cputwin.live.stream import OnlineTwin
from cputwin.pipeline import sample_path
from cputwin.telemetry.schema import OVERALL, RUN_COLUMN, WORKLOAD

TICK_BUDGET_US = 1000.0  # a machine twin's p99 per tick


def percentiles(seconds: list[float]) -> dict[str, float]:
    us = np.array(seconds) * 1e6
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
            "max_us": float(us.max())}


def tile_cores(frame: pl.DataFrame, n_cores: int) -> pl.DataFrame:
    """An `n_cores` recording from `frame`: copy k of the recorded cores is shifted by k
    ticks within each run (no row crosses a run), so the cores are not identical."""
    recorded = sorted(c for c in frame.columns if c.startswith("cpu_util_core_"))
    columns = []
    for k in range(n_cores):
        source = recorded[k % len(recorded)]
        shift = k // len(recorded)
        columns.append(pl.col(source).shift(shift).over(RUN_COLUMN)
                       .fill_null(pl.col(source)).alias(f"cpu_util_core_{k}"))
    tiled = frame.with_columns(columns)
    cores = [f"cpu_util_core_{k}" for k in range(n_cores)]
    return tiled.with_columns(pl.mean_horizontal(cores).alias(OVERALL))


def stream_ticks(stack: TwinStack, rows: list[tuple], ticks: int,
                 compiled_trees: bool = True, detector=None) -> list[float]:
    stream = OnlineTwin(stack, compiled_trees=compiled_trees, detector=detector).stream()
    times = []
    for i in range(ticks):
        cores, overall, workload = rows[i % len(rows)]
        start = time.perf_counter()
        stream.update(cores, overall, workload)
        times.append(time.perf_counter() - start)
    return times


def naive_ticks(stack: TwinStack, frame: pd.DataFrame, ticks: int) -> list[float]:
    history = stack.history_ + 1
    window = frame.iloc[:0].copy()
    times = []
    for i in range(ticks):
        row = frame.iloc[[i % len(frame)]]
        start = time.perf_counter()
        window = pd.concat([window, row], ignore_index=True).tail(history)
        preds = []
        for spec, base in zip(stack.base_specs_, stack.bases_, strict=True):
            feats, _ = reference_features(window, spec.features, stack.target, stack.workloads_)
            last = feats.tail(1)
            if hasattr(base, "booster"):  # LightGBM on a one-row DataFrame, as notebooks do
                preds.append(base.booster.predict(last)[0])
            else:  # a linear base
                preds.append(base.predict(last.to_numpy())[0])
        stack.meta_.predict(np.array([preds]), row[WORKLOAD].to_numpy())
        times.append(time.perf_counter() - start)
    return times


def run(ticks: int, naive: int, bases: str, mode: str = "sensor",
        target: str = "cpu_util_core_0", n_cores: int | None = None) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = load_runs(sample_path())
        if n_cores:
            frame = tile_cores(frame, n_cores)
        stack = TwinStack(bases=bases, mode=mode, target=target,
                          meta_model="ridge" if bases == "seed" else "auto")
        stack.fit(frame)
        detector = calibrate(stack, frame) if stack.machine_ else None
    cores = frame.select(stack.schema_.core_columns).to_numpy()
    rows = list(zip(cores, frame[OVERALL].to_list(), frame[WORKLOAD].to_list(), strict=True))
    ours = percentiles(stream_ticks(stack, rows, ticks, detector=detector))
    lightgbm_trees = percentiles(stream_ticks(stack, rows, ticks, compiled_trees=False,
                                              detector=detector))
    common = {"bases": [b.name for b in stack.base_specs_], "mode": mode,
              "meta_model": stack.meta_.kind, "target": stack.target,
              "cores": stack.schema_.n_cores, "ticks": ticks}
    if stack.machine_:
        return {**common, "naive_ticks": 0, "stack": ours, "stack_lightgbm_trees": lightgbm_trees,
                "compiled_trees_speedup_p50": lightgbm_trees["p50_us"] / ours["p50_us"],
                "budget_p99_us": TICK_BUDGET_US,
                "within_budget": ours["p99_us"] <= TICK_BUDGET_US}
    pdf = frame.to_pandas().assign(**{RUN_COLUMN: "bench"})
    theirs = percentiles(naive_ticks(stack, pdf, naive))
    return {**common, "naive_ticks": naive, "stack": ours,
            "stack_lightgbm_trees": lightgbm_trees, "naive": theirs,
            "speedup_p50": theirs["p50_us"] / ours["p50_us"],
            "compiled_trees_speedup_p50": lightgbm_trees["p50_us"] / ours["p50_us"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=10_000)
    parser.add_argument("--naive-ticks", type=int, default=500)
    parser.add_argument("--bases", default="seed",
                        help="a preset or base names, comma-separated (seed: v2.0 + v2.3 "
                             "under RidgeCV; detect: the anomaly twin's)")
    parser.add_argument("--mode", default="sensor", choices=("sensor", "independent"))
    parser.add_argument("--target", default="cpu_util_core_0",
                        help="the core to predict, or 'all' for a machine twin")
    parser.add_argument("--cores", type=int, default=None,
                        help="tile the sample's cores to this many (default: as recorded)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.cores is not None and args.cores < 1:
        parser.error("--cores must be at least 1")
    r = run(args.ticks, args.naive_ticks, args.bases, args.mode, args.target, args.cores)
    if args.json:
        sys.stdout.write(json.dumps(r, indent=2) + "\n")
        return
    print(f"bases: {', '.join(r['bases'])} ({r['mode']} mode, meta-model {r['meta_model']}); "
          f"target {r['target']}, {r['cores']} cores")
    print(f"{'path':<28}{'ticks':>8}{'p50 µs':>12}{'p99 µs':>12}{'max µs':>12}")
    paths = [("cputwin TwinStream", "stack", r["ticks"]),
             ("  same, LightGBM's trees", "stack_lightgbm_trees", r["ticks"])]
    if "naive" in r:
        paths.append(("naive pandas + predict", "naive", r["naive_ticks"]))
    for name, key, n in paths:
        s = r[key]
        print(f"{name:<28}{n:>8}{s['p50_us']:>12.1f}{s['p99_us']:>12.1f}{s['max_us']:>12.1f}")
    if "naive" not in r:
        verdict = "within" if r["within_budget"] else "OVER"
        print(f"machine twin p99 {r['stack']['p99_us']:.0f} µs: {verdict} the "
              f"{r['budget_p99_us']:.0f} µs budget; compiled trees "
              f"{r['compiled_trees_speedup_p50']:.2f}× LightGBM's single-row path")
        return
    print(f"speed-up at p50: {r['speedup_p50']:.1f}× the naive path; compiled trees "
          f"{r['compiled_trees_speedup_p50']:.2f}× LightGBM's single-row path")


if __name__ == "__main__":
    main()
