"""Feature building at scale: cputwin's engine against a plain pandas reference.

    python bench/features.py [--rows 1000000] [--cores 8] [--sets v2.0,v2.3]
                             [--dtype float32] [--json]

Builds a dataset by tiling the seed data (or the embedded sample) into many runs of
about 1,000 rows each with small noise, then times each feature set three ways in the
same run: cputwin, the pandas reference (groupby per run, shift, rolling), cputwin
again. Each measurement runs in a fresh child process, so its peak RSS is its own.
Reports median seconds, rows/s, peak RSS and the pandas/cputwin ratio. cputwin builds a
float32 matrix (what training at scale uses; `--dtype float64` for the exact one); the
pandas reference is float64, as a notebook would have it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import polars as pl

SEED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "seed-data" / "telemetry_v2"
RUN_ROWS = 1000


def make_dataset(rows: int, cores: int, path: Path) -> None:
    """Tile real runs to `rows` rows and `cores` cores, with noise, into one parquet file."""
    from cputwin import load_runs
    from cputwin.pipeline import sample_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = load_runs(SEED_DATA if SEED_DATA.is_dir() else sample_path())
    have = [c for c in source.columns if c.startswith("cpu_util_core_")]
    base = source.select("cpu_util_overall", *have, "workload_type")
    rng = np.random.default_rng(0)
    util = base.select(have).to_numpy()
    util = util[:, np.arange(cores) % len(have)]
    n_runs = -(-rows // RUN_ROWS)
    starts = rng.integers(0, base.height - RUN_ROWS, n_runs)
    idx = (starts[:, None] + np.arange(RUN_ROWS)[None, :]).ravel()[:rows]
    noisy = np.clip(util[idx] + rng.normal(0, 0.5, (rows, cores)), 0, 100)
    # the overall load gets noise of its own, as psutil's overall and per-core readings
    # are taken apart: it is close to, not exactly, the mean of the cores
    overall = np.clip(util[idx].mean(axis=1) + rng.normal(0, 0.5, rows), 0, 100)
    frame = pl.DataFrame({
        "run": np.repeat(np.arange(n_runs), RUN_ROWS)[:rows].astype(str),
        "timestamp": np.tile(np.arange(RUN_ROWS) * 0.1, n_runs)[:rows],
        "cpu_util_overall": overall,
        **{f"cpu_util_core_{i}": noisy[:, i] for i in range(cores)},
        "workload_type": base["workload_type"].to_numpy()[idx],
    })
    frame.write_parquet(path)


def _measure(kind: str, spec_name: str, path: str, dtype: str, queue) -> None:
    from cputwin.features import build_features, get_spec
    from cputwin.features.reference import reference_features

    frame = pl.read_parquet(path)
    workloads = sorted(frame["workload_type"].unique().to_list())
    spec = get_spec(spec_name)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if kind == "cputwin":
        mat = build_features(frame, spec, "cpu_util_core_0", workloads, dtype=np.dtype(dtype).type)
        shape, nbytes = mat.X.shape, mat.X.nbytes
    else:
        pdf = frame.to_pandas()
        start = time.perf_counter()  # the conversion is not the reference's cost
        feats, _ = reference_features(pdf, spec, "cpu_util_core_0", workloads)
        shape, nbytes = feats.shape, feats.to_numpy().nbytes
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"seconds": seconds, "peak_rss_mb": peak / 1024, "input_rss_mb": before / 1024,
               "shape": list(shape), "matrix_mb": nbytes / 2**20})


def measure(kind: str, spec_name: str, path: Path, dtype: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(kind, spec_name, str(path), dtype, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def run(rows: int, cores: int, sets: list[str], dtype: str = "float32") -> dict:
    out: dict = {"rows": rows, "cores": cores, "dtype": dtype}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.parquet"
        make_dataset(rows, cores, path)
        for name in sets:
            first = measure("cputwin", name, path, dtype)
            pandas = measure("pandas", name, path, dtype)
            second = measure("cputwin", name, path, dtype)
            ours = float(np.median([first["seconds"], second["seconds"]]))
            out[name] = {
                "cputwin_s": ours, "pandas_s": pandas["seconds"],
                "ratio": pandas["seconds"] / ours,
                "cputwin_rows_per_s": rows / ours, "pandas_rows_per_s": rows / pandas["seconds"],
                "cputwin_peak_rss_mb": max(first["peak_rss_mb"], second["peak_rss_mb"]),
                "pandas_peak_rss_mb": pandas["peak_rss_mb"],
                "matrix_mb": first["matrix_mb"],
                "rss_over_matrix": max(first["peak_rss_mb"], second["peak_rss_mb"])
                / first["matrix_mb"],
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cores", type=int, default=8)
    parser.add_argument("--sets", default="v2.0,v2.3")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="cputwin's matrix dtype")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    r = run(args.rows, args.cores, args.sets.split(","), args.dtype)
    if args.json:
        sys.stdout.write(json.dumps(r, indent=2) + "\n")
        return
    print(f"{r['rows']:,} rows, {r['cores']} cores, cputwin matrix {r['dtype']}")
    print(f"{'set':<8}{'cputwin s':>11}{'pandas s':>11}{'ratio':>8}{'cputwin MB':>12}"
          f"{'pandas MB':>11}{'matrix MB':>11}{'RSS/matrix':>12}")
    for name in args.sets.split(","):
        s = r[name]
        print(f"{name:<8}{s['cputwin_s']:>11.2f}{s['pandas_s']:>11.2f}{s['ratio']:>8.1f}"
              f"{s['cputwin_peak_rss_mb']:>12.0f}{s['pandas_peak_rss_mb']:>11.0f}"
              f"{s['matrix_mb']:>11.0f}{s['rss_over_matrix']:>12.2f}")


if __name__ == "__main__":
    main()
