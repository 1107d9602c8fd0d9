"""Built-in labelled workloads, each run in its own child process until told to stop.

None touches the internet: network_bound talks HTTP to a server it starts on 127.0.0.1.
A workload reports a crash through `errors` and exits non-zero, so the collector can
refuse to save an idle machine under a busy label (the seed's network_bound run).
"""

from __future__ import annotations

import http.server
import multiprocessing as mp
import os
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable

WorkloadFn = Callable[[object], None]  # receives a multiprocessing Event: stop when set


def cpu_bound(stop) -> None:
    x = 0
    while not stop.is_set():
        for i in range(20_000):
            x = (x * 31 + i) % 1_000_003


def io_bound(stop) -> None:
    """Write, fsync and read back 8 MiB in turn, in a file without a name (unlinked as it
    is created), so a workload killed with SIGKILL leaves nothing on disk."""
    block = os.urandom(1 << 20)
    with tempfile.TemporaryFile(prefix="cputwin-io-") as f:
        while not stop.is_set():
            f.seek(0)
            for _ in range(8):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
            f.seek(0)
            while f.read(1 << 20):
                pass


def memory_bound(stop) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    big = np.ones(32 * 1024 * 1024 // 8)  # 32 MiB, past the caches
    while not stop.is_set():
        idx = rng.integers(0, big.size, size=200_000)
        big[idx] += 1.0
        big = big.copy()


class _PhaseStop:
    """The stop signal of one phase: set when the workload stops or the phase is over."""

    def __init__(self, stop, seconds: float) -> None:
        self.stop = stop
        self.end = time.monotonic() + seconds

    def is_set(self) -> bool:
        return self.stop.is_set() or time.monotonic() >= self.end

    def wait(self, timeout: float | None = None) -> bool:
        self.stop.wait(max(0.0, self.end - time.monotonic()))
        return self.is_set()


def mixed_workload(stop) -> None:
    """CPU, I/O, memory and idle phases of 1.5 s in turn."""
    phases = (cpu_bound, io_bound, memory_bound, idle)
    i = 0
    while not stop.is_set():
        phases[i % len(phases)](_PhaseStop(stop, 1.5))
        i += 1


class _Payload(http.server.BaseHTTPRequestHandler):
    body = os.urandom(256 * 1024)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args) -> None:
        return None


def network_bound(stop) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Payload)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/payload"
    try:
        while not stop.is_set():
            with urllib.request.urlopen(url, timeout=5) as resp:
                resp.read()
    finally:
        server.shutdown()
        server.server_close()


def idle(stop) -> None:
    stop.wait()


WORKLOADS: dict[str, WorkloadFn] = {
    "cpu_bound": cpu_bound,
    "io_bound": io_bound,
    "memory_bound": memory_bound,
    "mixed_workload": mixed_workload,
    "network_bound": network_bound,
    "idle": idle,
}


def _exit_with_parent(parent: int) -> None:
    """A collector killed by SIGKILL cannot stop its workload; without this, a busy loop
    would outlive it for good. Polls, as re-parenting is all a child can see of it."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _child(fn: WorkloadFn, stop, errors, parent: int) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    try:
        fn(stop)
    except BaseException as exc:  # report any death, then exit non-zero
        line = traceback.format_exception_only(type(exc), exc)[-1].strip()
        errors.put(line)
        os._exit(1)


class WorkloadProcess:
    """A workload in a child process: start, check it is alive, stop it cleanly."""

    def __init__(self, fn: WorkloadFn) -> None:
        ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
        self.stop_event = ctx.Event()
        self.errors = ctx.SimpleQueue()  # put() is synchronous: survives os._exit
        self.process = ctx.Process(target=_child, daemon=True,
                                   args=(fn, self.stop_event, self.errors, os.getpid()))
        self.started = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        self.process.start()

    def died(self) -> str | None:
        """Why the workload ended before it was told to stop, or None if it is alive."""
        if self.process.is_alive() or self.stop_event.is_set():
            return None
        self.process.join(1)
        code = self.process.exitcode
        after = time.monotonic() - self.started
        detail = "" if self.errors.empty() else self.errors.get()
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return f"died after {after:.1f} s ({how}){': ' + detail if detail else ''}"

    def stop(self, timeout: float = 5.0) -> int | None:
        self.stop_event.set()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        return self.process.exitcode
