"""Training at scale: wall time and peak RSS of `cputwin train` against the row count,
beside one plain LightGBM fit of the same rows and rounds.

    python bench/train.py [--rows 100000,1000000,10000000] [--bases v2.3]
                          [--max-rounds 50] [--repeats 1] [--plot bench-train.png] [--json]

For each size it tiles the seed data (or the embedded sample) into runs of 1,000 rows
(as bench/features.py does), then runs `cputwin train DATA -o TWIN --bases v2.3
--float32 --max-rounds N` in a fresh child process (the CLI itself, in process there, so
its peak RSS is its own): reading, features, early stopping, the out-of-fold stack's
folds, meta-model, refit, detector, artifact. Beside it, in another fresh child, one
plain LightGBM fit: the same rows' v2.3 features (built before the clock starts), the
set's own parameters capped at the same rounds, LightGBM's scikit-learn `fit` (binning
and boosting) on every core. The two alternate `--repeats` times; the table gives
medians and their ratio, and plots both against rows on log-log axes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from features import make_dataset

CHILD = """
import json, resource, sys
from typer.main import get_command
from cputwin.cli import app
try:
    code = get_command(app).main(args=sys.argv[2:], prog_name="cputwin", standalone_mode=False)
finally:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    open(sys.argv[1], "w").write(json.dumps({"peak_rss_mb": peak}))
sys.exit(code if isinstance(code, int) else 0)
"""

# One plain LightGBM fit of what `cputwin train --bases SET` fits: the set's features of
# the rows with full history, its parameters with the rounds capped; only the fit is timed.
PLAIN = """
import json, resource, sys, time, warnings
import numpy as np
from cputwin.features import build_features
from cputwin.models.base import fit_lgbm, get_base, params_for
from cputwin.telemetry.ingest import load_runs
out, data, name, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    frame = load_runs(data)
base = get_base(name)
target = "cpu_util_core_0"
mat = build_features(frame, base.features, target, sorted(frame["workload_type"].unique()),
                     dtype=np.float32)
rows = np.flatnonzero(mat.valid)
X, y = mat.X[rows], frame[target].to_numpy()[rows]
params = params_for(name, {**base.params, "n_estimators": rounds})
start = time.perf_counter()
fit_lgbm(params, X, y, mat.names)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
open(out, "w").write(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "rows": int(rows.size)}))
"""


def train_once(data: Path, bases: str, max_rounds: int, tmp: Path) -> dict:
    rss_file = tmp / "rss.json"
    args = [str(data), "-o", str(tmp / "twin.cputwin"), "--bases", bases, "--float32",
            "--max-rounds", str(max_rounds), "--json"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(rss_file), "train", *args],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"cputwin train failed on {data}: {done.stderr.strip()[-500:]}")
    result = json.loads(done.stdout)
    return {"seconds": seconds, "peak_rss_mb": json.loads(rss_file.read_text())["peak_rss_mb"],
            "out_of_fold_r2": result["out_of_fold"]["stack"]["r2"]}


def plain_once(data: Path, bases: str, max_rounds: int, tmp: Path) -> dict:
    out = tmp / "plain.json"
    done = subprocess.run([sys.executable, "-c", PLAIN, str(out), str(data), bases,
                           str(max_rounds)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"plain LightGBM fit failed on {data}: {done.stderr.strip()[-500:]}")
    return json.loads(out.read_text())


def train_point(rows: int, bases: str, max_rounds: int, repeats: int, tmp: Path) -> dict:
    """cputwin train and a plain fit, alternated `repeats` times: medians and their ratio."""
    data = tmp / f"rows{rows}" / "data.parquet"
    data.parent.mkdir(parents=True, exist_ok=True)
    make_dataset(rows, 8, data)
    runs, plains = [], []
    for _ in range(repeats):
        runs.append(train_once(data, bases, max_rounds, data.parent))
        plains.append(plain_once(data, bases, max_rounds, data.parent))
    seconds = statistics.median(r["seconds"] for r in runs)
    plain = statistics.median(p["seconds"] for p in plains)
    return {"rows": rows, "seconds": seconds,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "out_of_fold_r2": runs[-1]["out_of_fold_r2"],
            "plain_lightgbm_seconds": plain, "ratio_to_plain": seconds / plain,
            "runs_seconds": [r["seconds"] for r in runs],
            "plain_runs_seconds": [p["seconds"] for p in plains]}


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [p["rows"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.loglog(rows, [p["seconds"] for p in points], "o-", label="cputwin train")
    left.loglog(rows, [p["plain_lightgbm_seconds"] for p in points], "s--",
                label="one plain LightGBM fit")
    left.legend()
    left.set(xlabel="rows", ylabel="wall seconds", title="cputwin train: time")
    right.loglog(rows, [p["peak_rss_mb"] for p in points], "o-", color="tab:orange")
    right.set(xlabel="rows", ylabel="peak RSS (MB)", title="cputwin train: memory")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,1000000,10000000")
    parser.add_argument("--bases", default="v2.3")
    parser.add_argument("--max-rounds", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternate cputwin train and the plain fit this many times")
    parser.add_argument("--plot", type=Path, default=Path("bench-train.png"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in (int(r) for r in args.rows.split(",")):
            points.append(train_point(rows, args.bases, args.max_rounds, args.repeats, Path(tmp)))
            if not args.json:
                p = points[-1]
                print(f"{p['rows']:>12,} rows {p['seconds']:>9.1f} s {p['peak_rss_mb']:>9.0f} MB "
                      f"plain LightGBM {p['plain_lightgbm_seconds']:>8.1f} s "
                      f"ratio {p['ratio_to_plain']:>5.2f} "
                      f"(out-of-fold R² {p['out_of_fold_r2']:.4f})", flush=True)
    plot(points, args.plot)
    out = {"bases": args.bases, "max_rounds": args.max_rounds, "repeats": args.repeats,
           "points": points,
           "plot": str(args.plot)}
    if args.json:
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
