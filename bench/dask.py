"""One machine against a Dask LocalCluster (2 workers) on the same data and protocol.

    python bench/dask.py [--rows 1000000] [--workers 2] [--bases physics_linear,gbm_l2]
                         [--max-rounds 100] [--json]

Tiles the seed data (or the embedded sample) into runs of 1,000 rows (as
bench/features.py does), then fits the same stack under the honest protocol twice: in
this process, and with `--dask local:N` (features built per partition of whole runs on
the workers, LightGBM bases trained with lightgbm.dask). Reports training seconds
(cluster start-up apart), held-out R² of each, and the cluster's start-up time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

# This file is named dask.py and Python puts its folder first on sys.path: take it off,
# or `import dask` inside Dask and LightGBM would import this file.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

from cputwin.evaluation.protocols import evaluate_honest  # noqa: E402
from cputwin.models.cluster import connect, fit_on_dask  # noqa: E402
from cputwin.pipeline import make_stack  # noqa: E402
from cputwin.telemetry.ingest import load_runs  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_features", HERE / "features.py")
features = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(features)
make_dataset = features.make_dataset


def run(rows: int, workers: int, bases: list[str], max_rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.parquet"
        make_dataset(rows, 8, path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame = load_runs(path)

    def stack():
        return make_stack(bases=bases, max_rounds=max_rounds, float32=True)

    local, _ = evaluate_honest(frame, stack())
    started = time.perf_counter()
    with connect(f"local:{workers}") as client:
        startup = time.perf_counter() - started
        remote, _ = evaluate_honest(frame, stack(),
                                    fit=lambda st, fr, pr=None: fit_on_dask(st, fr, client, pr))
    return {"rows": rows, "workers": workers, "bases": bases, "max_rounds": max_rounds,
            "local_s": local.summary.training_seconds,
            "dask_s": remote.summary.training_seconds, "dask_startup_s": startup,
            "r2_local": local.summary.r2["stack"], "r2_dask": remote.summary.r2["stack"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bases", default="physics_linear,gbm_l2")
    parser.add_argument("--max-rounds", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    r = run(args.rows, args.workers, args.bases.split(","), args.max_rounds)
    if args.json:
        sys.stdout.write(json.dumps(r, indent=2) + "\n")
        return
    print(f"{r['rows']:,} rows, bases {', '.join(r['bases'])}, at most {r['max_rounds']} rounds")
    print(f"{'':<28}{'training s':>11}{'held-out R²':>13}")
    print(f"{'one machine':<28}{r['local_s']:>11.1f}{r['r2_local']:>13.4f}")
    print(f"{'LocalCluster, ' + str(r['workers']) + ' workers':<28}{r['dask_s']:>11.1f}"
          f"{r['r2_dask']:>13.4f}")
    print(f"cluster start-up {r['dask_startup_s']:.1f} s (not in the training time)")


if __name__ == "__main__":
    main()
