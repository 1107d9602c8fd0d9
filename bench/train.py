"""Training at scale: wall time and peak RSS of `cputwin train` against the row count.

    python bench/train.py [--rows 100000,1000000,10000000] [--bases v2.3]
                          [--max-rounds 200] [--plot bench-train.png] [--json]

For each size it tiles the seed data (or the embedded sample) into runs of 1,000 rows
(as bench/features.py does), then runs `cputwin train DATA -o TWIN --bases v2.3
--float32 --max-rounds N` in a fresh child process (the CLI itself, in process there, so
its peak RSS is its own): the out-of-fold stack, early stopping, folds, refit, detector,
artifact. It prints wall seconds and peak RSS per size and plots both against rows on
log-log axes, so a reader sees how cost grows.
"""

from __future__ import annotations

import argparse
import json
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


def train_point(rows: int, bases: str, max_rounds: int, tmp: Path) -> dict:
    data = tmp / f"rows{rows}" / "data.parquet"
    data.parent.mkdir(parents=True, exist_ok=True)
    make_dataset(rows, 8, data)
    rss_file = tmp / f"rss{rows}.json"
    args = [str(data), "-o", str(tmp / f"twin{rows}.cputwin"), "--bases", bases, "--float32",
            "--max-rounds", str(max_rounds), "--json"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(rss_file), "train", *args],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"cputwin train failed at {rows} rows: {done.stderr.strip()[-500:]}")
    result = json.loads(done.stdout)
    return {"rows": rows, "seconds": seconds,
            "peak_rss_mb": json.loads(rss_file.read_text())["peak_rss_mb"],
            "out_of_fold_r2": result["out_of_fold"]["stack"]["r2"]}


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [p["rows"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.loglog(rows, [p["seconds"] for p in points], "o-")
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
    parser.add_argument("--max-rounds", type=int, default=200)
    parser.add_argument("--plot", type=Path, default=Path("bench-train.png"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in (int(r) for r in args.rows.split(",")):
            points.append(train_point(rows, args.bases, args.max_rounds, Path(tmp)))
            if not args.json:
                p = points[-1]
                print(f"{p['rows']:>12,} rows {p['seconds']:>9.1f} s {p['peak_rss_mb']:>9.0f} MB "
                      f"(out-of-fold R² {p['out_of_fold_r2']:.4f})", flush=True)
    plot(points, args.plot)
    out = {"bases": args.bases, "max_rounds": args.max_rounds, "points": points,
           "plot": str(args.plot)}
    if args.json:
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
