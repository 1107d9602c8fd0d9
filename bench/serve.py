"""Load test of `cputwin serve`: single-sample stream updates against the real server.

    python bench/serve.py [--seconds 60] [--concurrency 2] [--streams 64] [--bases seed]
                          [--target T] [--cores N] [--json]
    python bench/serve.py --target all --cores 16 --bases detect   # a 16-core machine twin

Trains a twin on the embedded sample, starts `cputwin serve` on a free loopback port in
its own process, and drives it from a second process: with wrk (Debian's `wrk`) where it
is installed, one connection per thread, each its own stream with increasing
timestamps (`--concurrency` threads); otherwise with an asyncio httpx client of
`concurrency` workers, which is itself slower than the server on 2 cores. Reports
updates per second, p50 / p99 latency and errors (any non-200).

`--target all` serves a machine twin (every core predicted and scored per update);
`--cores N` trains it on an N-core recording tiled from the sample (bench/latency.py's
`tile_cores`), and every update carries N cores.

The load generator is named in the output, and its CPU use and the server's are measured
over the run (wrk's from its rusage, the server's from its process). A figure is refused
(null, with the reason) when the client used more than SATURATED_CPU of each of its
threads' cores: then it measured itself, not the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _drive(url: str, seconds: float, concurrency: int, streams: int, out) -> None:
    import httpx

    rng = np.random.default_rng(0)
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(w: int, client: httpx.AsyncClient) -> None:
        nonlocal errors
        t = 0.0
        own = [f"s{w}-{k}" for k in range(max(1, streams // concurrency))]
        while time.perf_counter() < deadline:
            t += 0.1
            c0, c1 = rng.uniform(0, 100, 2)
            sample = {"timestamp": t, "cpu_util_overall": (c0 + c1) / 2, "cpu_util_core_0": c0,
                      "cpu_util_core_1": c1, "workload_type": "idle"}
            start = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/streams/{own[int(t * 10) % len(own)]}/samples",
                                      json={"samples": [sample]})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        began, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(w, client) for w in range(concurrency)))
        elapsed = time.perf_counter() - began
        client_cpu = (time.process_time() - cpu) / elapsed
    lat = np.array(latencies) * 1000
    out.put({"updates_per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
             "p99_ms": float(np.percentile(lat, 99)), "errors": errors, "seconds": elapsed,
             "requests": len(latencies), "client_cpu": client_cpu,
             # a client using ~a whole core measures itself, not the server
             "saturated": client_cpu > SATURATED_CPU})


SATURATED_CPU = 0.85  # of one core


def _load(url, seconds, concurrency, streams, out) -> None:
    asyncio.run(_drive(url, seconds, concurrency, streams, out))


WRK_SCRIPT = r"""
local threads = {}
function setup(thread) thread:set("id", #threads); table.insert(threads, thread) end
function init(args) t = 0; wrk.method = "POST"; wrk.headers["Content-Type"] = "application/json" end
request = function()
  t = t + 0.1
  local body = string.format('{"samples": [{"timestamp": %.1f, "cpu_util_overall": 30.0, '
    .. '"cpu_util_core_0": %.1f, "cpu_util_core_1": 40.0, "workload_type": "idle"}]}',
    t, (t * 37) % 100)
  return wrk.format(nil, "/v1/streams/w" .. id .. "/samples", nil, body)
end
done = function(summary, latency, requests)
  io.write(string.format('JSON {"requests": %d, "seconds": %f, "p50_ms": %f, '
    .. '"p99_ms": %f, "errors": %d}\n', summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout))
end
"""


def wrk_script(n_cores: int) -> str:
    """WRK_SCRIPT with a sample of `n_cores` cores (core 0 moving, the others steady)."""
    others = "".join(f', "cpu_util_core_{k}": {20 + (7 * k) % 60}.0' for k in range(1, n_cores))
    return WRK_SCRIPT.replace(', "cpu_util_core_1": 40.0', others.replace("%", "%%"))


def _wrk(url: str, seconds: float, threads: int, folder: Path, n_cores: int) -> dict:
    script = folder / "stream.lua"
    script.write_text(wrk_script(n_cores))
    cmd = ["wrk", f"-t{threads}", f"-c{threads}", f"-d{int(seconds)}s", "-s", str(script), url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(text.split("JSON ", 1)[1].splitlines()[0])
    result["updates_per_s"] = result["requests"] / result["seconds"]
    result["client"] = "wrk"
    used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    result["client_cpu"] = used / result["seconds"] / threads  # of each thread's core
    result["saturated"] = result["client_cpu"] > SATURATED_CPU
    return result


def training_data(folder: Path, n_cores: int | None) -> Path:
    """The embedded sample, or an `n_cores` recording tiled from it."""
    from cputwin.pipeline import sample_path

    if not n_cores:
        return sample_path()
    from cputwin import load_runs
    from latency import tile_cores

    tiled = folder / "tiled"
    tiled.mkdir()
    frame = tile_cores(load_runs(sample_path()), n_cores)
    for i, run in enumerate(frame.partition_by("run")):
        run.drop("run").write_parquet(tiled / f"run{i}.parquet")
    return tiled


def run(seconds: float, concurrency: int, streams: int, bases: str,
        target: str = "cpu_util_core_0", n_cores: int | None = None) -> dict:
    import psutil

    from cputwin.pipeline import train

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = Path(tmp) / "twin.cputwin"
        train(training_data(Path(tmp), n_cores), twin, target=target, bases=bases,
              mode="independent")
        cores = n_cores or 2
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "cputwin", "serve", str(twin),
                                   "--port", str(port), "--max-streams", str(streams * 2)])
        try:
            url = f"http://127.0.0.1:{port}"
            _wait(url)
            proc_server = psutil.Process(server.pid)
            began, server_cpu = time.perf_counter(), sum(proc_server.cpu_times()[:2])
            if shutil.which("wrk"):
                result = _wrk(url, seconds, concurrency, Path(tmp), cores)
            else:
                ctx = mp.get_context("spawn")
                queue = ctx.Queue()
                proc = ctx.Process(target=_load, args=(url, seconds, concurrency, streams, queue))
                proc.start()
                result = {**queue.get(), "client": "httpx"}
                proc.join()
            result["server_cpu"] = ((sum(proc_server.cpu_times()[:2]) - server_cpu)
                                    / (time.perf_counter() - began))
        finally:
            server.terminate()
            server.wait(10)
    return {**result, "concurrency": concurrency, "bases": bases, "target": target,
            "cores": cores, "watched_cores": cores if target == "all" else 1}


def _wait(url: str) -> None:
    import httpx

    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=2,
                        help="wrk threads (one connection and stream each), or httpx workers")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--bases", default="seed")
    parser.add_argument("--target", default="cpu_util_core_0",
                        help="the twin's core, or 'all' for a machine twin")
    parser.add_argument("--cores", type=int, default=None,
                        help="train on the sample tiled to this many cores (default: 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.cores is not None and args.cores < 1:
        parser.error("--cores must be at least 1")
    r = run(args.seconds, args.concurrency, args.streams, args.bases, args.target, args.cores)
    if r["saturated"]:
        r["updates_per_s"] = r["p50_ms"] = r["p99_ms"] = None  # the client's figure, not the server's
    if args.json:
        sys.stdout.write(json.dumps(r, indent=2) + "\n")
        return
    print(f"{r['requests']} single-sample updates of {r['cores']} cores in {r['seconds']:.1f} s, "
          f"concurrency {r['concurrency']}, client {r['client']}, bases {r['bases']}, "
          f"target {r['target']} ({r['watched_cores']} watched)")
    if r["saturated"]:
        print(f"no server figure: the {r['client']} load generator used "
              f"{r['client_cpu']:.0%} of a core per thread and saturated before the server "
              f"(server {r['server_cpu']:.0%} of a core)")
        return
    print(f"{'client':>8}{'updates/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'client cpu':>12}{'server cpu':>12}")
    print(f"{r['client']:>8}{r['updates_per_s']:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
          f"{r['errors']:>8}{r['client_cpu']:>12.0%}{r['server_cpu']:>12.0%}")


if __name__ == "__main__":
    main()
