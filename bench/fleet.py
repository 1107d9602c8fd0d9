"""A fleet of hosts: `cputwin train --per-host` one after another, in 2 processes, on Dask.

    python bench/fleet.py [--hosts 10,100] [--modes sequential,jobs2,dask2] [--repeat 1]
                          [--bases physics_linear,gbm_l2] [--max-rounds 100] [--json]

Makes K synthetic hosts from recorded runs (the seed data where present, else the
embedded sample tiled to 8 cores; the embedded sample for 2-core hosts), each different:
2, 8 or 16 cores (16 = the 8 recorded cores and a permuted, noisier copy), its own core
order, noise level, workload mix (some runs dropped) and run lengths; a few hosts are
broken on purpose (host i with i % 25 == 4: a file that is not parquet; i % 25 == 7: runs
of 15 rows, too short to stack). Then runs, in a fresh child process each (the CLI
itself), `cputwin train HOSTS/*/*.parquet --per-host -o OUT --bases B --max-rounds N
--json`: sequential (one process), jobs2 (`-j 2`) and dask2 (`--dask local:2`, a
LocalCluster of two one-thread workers started inside the command, its start-up
included). Reports wall seconds, seconds and hosts per hour, CPU seconds (user + system
of the command and every process it started and waited for) and CPU per wall second (how
many cores the mode kept busy), peak RSS of the whole process tree (sampled every 0.1 s,
summed over processes), failed hosts and the 1-minute load average before the run (other
users' load), each the median of `--repeat` interleaved runs, and each mode's speed-up
over sequential measured in the same run. Default bases are the fast pair (a ridge line
and one LightGBM base, at most 100 rounds): a K=100 fleet in minutes on two cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from statistics import median

import numpy as np
import polars as pl
import psutil

SEED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "seed-data" / "telemetry_v2"
MODES = {"sequential": [], "jobs2": ["-j", "2"], "dask2": ["--dask", "local:2"]}
CORES = (2, 8, 16)
KEEP = ("timestamp", "cpu_freq_current_mhz", "cpu_freq_min_mhz", "cpu_freq_max_mhz",
        "workload_type")


def recorded_runs() -> dict[int, list[pl.DataFrame]]:
    """Recorded runs by core count: the sample's 2-core runs, the seed's 8-core runs (or
    the sample's, tiled to 8 cores, where the seed data is absent)."""
    from cputwin.pipeline import sample_path

    sample = [pl.read_parquet(p) for p in sorted(sample_path().glob("*.parquet"))]
    if SEED_DATA.is_dir():
        eight = [pl.read_parquet(p) for p in sorted(SEED_DATA.glob("*.parquet"))]
    else:
        eight = [_with_cores(r, np.tile(_cores(r), 4)) for r in sample]
    return {2: sample, 8: eight}


def _cores(run: pl.DataFrame) -> np.ndarray:
    names = sorted((c for c in run.columns if c.startswith("cpu_util_core_")),
                   key=lambda c: int(c.rsplit("_", 1)[1]))
    return run.select(names).to_numpy()


def _with_cores(run: pl.DataFrame, util: np.ndarray, overall_noise: float = 0.0,
                rng: np.random.Generator | None = None) -> pl.DataFrame:
    """A run with these core columns and an overall load that is their mean (plus noise)."""
    rng = rng or np.random.default_rng(0)
    overall = np.clip(util.mean(axis=1) + rng.normal(0, overall_noise, len(util)), 0, 100)
    keep = [c for c in KEEP if c in run.columns]
    return pl.DataFrame({"cpu_util_overall": overall,
                         **{f"cpu_util_core_{i}": util[:, i] for i in range(util.shape[1])}}
                        ).hstack(run.select(keep))


def make_host(i: int, runs: dict[int, list[pl.DataFrame]], folder: Path) -> str:
    """Host i's runs in `folder`; returns what kind of host it is."""
    folder.mkdir(parents=True)
    if i % 25 == 4:
        (folder / "run0.parquet").write_bytes(b"this is not a parquet file")
        return "broken"
    rng = np.random.default_rng(i)
    cores = CORES[i % len(CORES)]
    source = runs[2 if cores == 2 else 8]
    noise = float(rng.choice([0.5, 1.0, 2.0, 4.0]))
    n_keep = max(3, len(source) - int(rng.integers(0, 3)))  # workload mix: drop 0-2 runs
    chosen = sorted(rng.choice(len(source), n_keep, replace=False))
    perm = rng.permutation(8 if cores != 2 else 2)
    for k in chosen:
        run = source[k]
        length = 15 if i % 25 == 7 else int(run.height * rng.uniform(0.7, 1.0))
        start = int(rng.integers(0, run.height - length + 1))
        run = run.slice(start, length)
        util = _cores(run)[:, perm]
        if cores == 16:
            util = np.hstack([util, util[:, rng.permutation(8)] * rng.uniform(0.8, 1.0)])
        util = np.clip(util + rng.normal(0, noise, util.shape), 0, 100)
        _with_cores(run, util, noise / 4, rng).write_parquet(folder / f"run{k}.parquet")
    return "short" if i % 25 == 7 else f"{cores} cores"


def make_fleet(k: int, root: Path) -> dict[str, int]:
    runs = recorded_runs()
    kinds: dict[str, int] = {}
    for i in range(k):
        kind = make_host(i, runs, root / f"host{i:04d}")
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def measure(mode: str, hosts: Path, out: Path, bases: str, max_rounds: int) -> dict:
    """One `cputwin train --per-host` in a child process: wall time, peak tree RSS, result."""
    cmd = [sys.executable, "-m", "cputwin", "train", str(hosts / "*" / "*.parquet"),
           "--per-host", "-o", str(out), "--bases", bases, "--max-rounds", str(max_rounds),
           "--json", *MODES[mode]]
    # output to files, not pipes: a fleet's warnings would fill a pipe nobody reads
    load = os.getloadavg()[0]
    with open(out.with_suffix(".out"), "w+") as fout, open(out.with_suffix(".err"), "w+") as ferr:
        used = _children_cpu()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fout, stderr=ferr, text=True)
        watched = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss(watched))
            time.sleep(0.1)
        seconds = time.perf_counter() - start
        cpu = _children_cpu() - used
        fout.seek(0)
        ferr.seek(0)
        stdout, stderr = fout.read(), ferr.read()
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{mode}: cputwin train failed ({proc.returncode}): {stderr[-500:]}")
    result = json.loads(stdout)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak / 2**20,
            "failed": len(result["failed"]), "trained": len(result["hosts"]),
            "exit_code": proc.returncode, "load_before": load}


def _children_cpu() -> float:
    """User + system seconds of every child process waited for so far (a child's own
    waited-for children included: a pool's or a LocalCluster's workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    with contextlib.suppress(psutil.Error):  # a process may end while it is read
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
    return total


def run(k: int, modes: list[str], repeat: int, bases: str, max_rounds: int) -> tuple[list, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kinds = make_fleet(k, root / "hosts")
        got: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(repeat):  # modes interleaved: a busy spell hits all of them
            for mode in modes:
                got[mode].append(measure(mode, root / "hosts", root / f"out-{mode}-{r}",
                                         bases, max_rounds))
    points = []
    for mode, runs in got.items():
        seconds = median(x["seconds"] for x in runs)
        cpu = median(x["cpu_seconds"] for x in runs)
        points.append({"hosts": k, "mode": mode, "seconds": round(seconds, 2),
                       "seconds_per_host": round(seconds / k, 3),
                       "hosts_per_hour": round(3600 * k / seconds),
                       "cpu_seconds": round(cpu, 1),
                       "cpu_per_wall": round(median(x["cpu_seconds"] / x["seconds"] for x in runs), 2),
                       "load_before": round(max(x["load_before"] for x in runs), 2),
                       "peak_rss_mb": round(median(x["peak_rss_mb"] for x in runs)),
                       "failed": max(x["failed"] for x in runs),
                       "trained": min(x["trained"] for x in runs)})
    return points, kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="10", help="comma-separated fleet sizes K")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--repeat", type=int, default=1, help="runs per mode (median)")
    parser.add_argument("--bases", default="physics_linear,gbm_l2")
    parser.add_argument("--max-rounds", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"error: --modes: unknown {', '.join(sorted(unknown))}")
    points, fleets = [], {}
    for k in (int(x) for x in args.hosts.split(",")):
        got, fleets[k] = run(k, modes, args.repeat, args.bases, args.max_rounds)
        sequential = next((p["seconds"] for p in got if p["mode"] == "sequential"), None)
        for p in got:
            if sequential:
                p["speedup"] = round(sequential / p["seconds"], 2)
        points += got
    out = {"bases": args.bases, "max_rounds": args.max_rounds, "repeat": args.repeat,
           "cpus": psutil.cpu_count(), "fleets": {str(k): v for k, v in fleets.items()},
           "points": points}
    if args.json:
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return
    print(f"bases {args.bases}, at most {args.max_rounds} rounds, median of {args.repeat}, "
          f"{out['cpus']} CPUs")
    print(f"{'hosts':>6} {'mode':<11}{'seconds':>9}{'s/host':>8}{'hosts/h':>9}{'CPU s':>8}"
          f"{'CPU/wall':>9}{'peak MB':>9}{'failed':>7}{'speed-up':>9}{'load':>6}")
    for p in points:
        print(f"{p['hosts']:>6} {p['mode']:<11}{p['seconds']:>9.1f}{p['seconds_per_host']:>8.2f}"
              f"{p['hosts_per_hour']:>9}{p['cpu_seconds']:>8.1f}{p['cpu_per_wall']:>9.2f}"
              f"{p['peak_rss_mb']:>9}{p['failed']:>7}{p.get('speedup', float('nan')):>9.2f}"
              f"{p['load_before']:>6.2f}")
    for k, kinds in fleets.items():
        print(f"fleet of {k}: " + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())))


if __name__ == "__main__":
    main()
