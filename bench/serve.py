"""Load test of `cputwin serve`: single-sample stream updates against the real server.

    python bench/serve.py [--seconds 60] [--concurrency 32] [--streams 64] [--bases seed] [--json]

Trains a twin on the embedded sample, starts `cputwin serve` on a free loopback port in
its own process, and drives it from a second process with an asyncio HTTP client:
`concurrency` workers, each sending one sample at a time to its own streams, for
`seconds`. Reports updates per second, p50 / p99 latency and errors (any non-200).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
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
        began = time.perf_counter()
        await asyncio.gather(*(worker(w, client) for w in range(concurrency)))
        elapsed = time.perf_counter() - began
    lat = np.array(latencies) * 1000
    out.put({"updates_per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
             "p99_ms": float(np.percentile(lat, 99)), "errors": errors, "seconds": elapsed,
             "requests": len(latencies)})


def _load(url, seconds, concurrency, streams, out) -> None:
    asyncio.run(_drive(url, seconds, concurrency, streams, out))


def run(seconds: float, concurrency: int, streams: int, bases: str) -> dict:
    from cputwin.pipeline import sample_path, train

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = Path(tmp) / "twin.cputwin"
        train(sample_path(), twin, bases=bases, mode="independent")
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "cputwin", "serve", str(twin),
                                   "--port", str(port), "--max-streams", str(streams * 2)])
        try:
            url = f"http://127.0.0.1:{port}"
            _wait(url)
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            proc = ctx.Process(target=_load, args=(url, seconds, concurrency, streams, queue))
            proc.start()
            result = queue.get()
            proc.join()
        finally:
            server.terminate()
            server.wait(10)
    return {**result, "concurrency": concurrency, "bases": bases}


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
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--bases", default="seed")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    r = run(args.seconds, args.concurrency, args.streams, args.bases)
    if args.json:
        sys.stdout.write(json.dumps(r, indent=2) + "\n")
        return
    print(f"{r['requests']} single-sample updates in {r['seconds']:.1f} s, "
          f"concurrency {r['concurrency']}, bases {r['bases']}")
    print(f"{'updates/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    print(f"{r['updates_per_s']:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['errors']:>8}")


if __name__ == "__main__":
    main()
