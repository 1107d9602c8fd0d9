"""What workload labels and the sampling rate are worth to the twin, under the honest protocol.

    python bench/labels.py [DATA] [--target cpu_util_core_0] [--bases twin] [--threads 1] [--json]

DATA defaults to ../shared/seed-data/telemetry_v2 where present, else the embedded
sample. Four versions of the same runs: as recorded (10 Hz) with their labels, with the
labels removed (every run the one workload "unlabelled", as telemetry from Prometheus or
Telegraf arrives), and both again resampled to 1 Hz (the mean of each second's samples,
per run). Each is scored in sensor and independent mode with the same preset: R² and MAE
of the stack and of the per-workload-mean baseline on each run's last 20 %, the training
time, and what the twin's history covers (its lags and windows count samples, so at
1 Hz they reach ten times as far back). LightGBM runs on `--threads` threads (1 by
default: on a busy machine more threads wait on each other; the scores are the same).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import polars as pl

from cputwin.evaluation.protocols import evaluate_honest
from cputwin.models.base import resolve_bases
from cputwin.pipeline import make_stack, sample_path
from cputwin.telemetry.ingest import load_runs, resample
from cputwin.telemetry.schema import UNLABELLED, WORKLOAD

SEED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "seed-data" / "telemetry_v2"
MODES = ("sensor", "independent")


def versions(frame: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """The runs as recorded and at 1 Hz, each with and without labels."""
    slow = resample(frame, 1.0)
    unlabel = pl.lit(UNLABELLED).alias(WORKLOAD)
    return {"as recorded, labelled": frame,
            "as recorded, no labels": frame.with_columns(unlabel),
            "1 Hz, labelled": slow,
            "1 Hz, no labels": slow.with_columns(unlabel)}


def score(frame: pl.DataFrame, target: str, bases: str, mode: str, threads: int) -> dict:
    stack = make_stack(target, bases, mode)
    stack.set_params(base_params={b.name: {"n_jobs": threads} for b in resolve_bases(bases)
                                  if b.learner == "lgbm"})
    evaluation, stack = evaluate_honest(frame, stack)
    s = evaluation.summary
    return {"r2": s.r2["stack"], "mae": s.mae["stack"],
            "workload_mean_r2": s.r2["workload_mean"], "meta": s.meta.kind,
            "training_seconds": s.training_seconds, "rows": s.rows.to_dict(),
            "timing": stack.time_span()}


def run(data: Path, target: str, bases: str, threads: int = 1) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seed's files are out of order (repaired)
        frame = load_runs(data)
        out = {"data": str(data), "target": target, "bases": bases, "protocol": "honest",
               "train_fraction": 0.8, "lightgbm_threads": threads, "versions": {}}
        for name, version in versions(frame).items():
            out["versions"][name] = {mode: score(version, target, bases, mode, threads)
                                     for mode in MODES}
    return out


def _span(timing: dict, key: str) -> str:
    return f"{timing[key]['samples']} = {timing[key]['seconds']:g} s"


def markdown(result: dict) -> str:
    lines = [f"Honest protocol on `{result['data']}`, target `{result['target']}`, preset "
             f"`{result['bases']}` (first 80 % of every run trains, last 20 % tests), "
             f"LightGBM on {result['lightgbm_threads']} thread(s).", "",
             "| data | mode | R² | MAE | workload-mean R² | training s | rows train / test | "
             "sample step | history | longest lag | longest window |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, modes in result["versions"].items():
        for mode, m in modes.items():
            t = m["timing"]
            lines.append(
                f"| {name} | {mode} | {m['r2']:.4f} | {m['mae']:.3f} | "
                f"{m['workload_mean_r2']:.4f} | {m['training_seconds']:.1f} | "
                f"{m['rows']['train']} / {m['rows']['test']} | {t['step_s']:.3f} s | "
                f"{_span(t, 'history')} | {_span(t, 'longest_lag')} | "
                f"{_span(t, 'longest_window')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path,
                        default=SEED_DATA if SEED_DATA.is_dir() else sample_path())
    parser.add_argument("--target", default="cpu_util_core_0")
    parser.add_argument("--bases", default="twin", help="a preset or base list (default twin)")
    parser.add_argument("--threads", type=int, default=1, help="LightGBM threads (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = run(args.data, args.target, args.bases, args.threads)
    sys.stdout.write(json.dumps(result, indent=2) + "\n" if args.json else markdown(result) + "\n")


if __name__ == "__main__":
    main()
