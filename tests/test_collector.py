from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import pytest

from cputwin import load_runs
from cputwin.errors import DataError, WorkloadError
from cputwin.telemetry.collector import (
    Collector,
    ProcessMeter,
    Sampler,
    read_metadata,
    recover_parts,
)
from cputwin.telemetry.schema import Schema


def crashing_workload(stop):
    time.sleep(0.3)
    raise ImportError("No module named 'requests'")


def killed_workload(stop):
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGKILL)


def quiet_exit_workload(stop):
    time.sleep(0.3)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return Collector(rate=10).record("cpu_bound", 4, out)


def test_rate_is_held(short_run):
    ts = load_runs(short_run.path)["timestamp"].to_numpy()
    assert abs(np.median(np.diff(ts)) - 0.1) <= 0.002
    assert 36 <= ts.size <= 40


def test_schema_and_label(short_run):
    raw = pl.read_parquet(short_run.path)
    cores = os.cpu_count()
    assert raw.columns == Schema(n_cores=cores).column_order()
    assert raw["workload_type"].unique().to_list() == ["cpu_bound"]
    assert short_run.path.name.startswith("cpu_bound_")
    assert raw["timestamp"].dtype == pl.Float64
    meta = read_metadata(short_run.path)
    assert meta["logical_cores"] == cores and meta["rate_hz"] == 10
    assert meta["workload_exit_status"] == 0 and meta["host"]
    assert not list(short_run.path.parent.glob("*.parts"))


def test_overall_is_the_cores_over_the_same_interval_on_a_busy_machine():
    """Overall and per-core come from one read of the counters: a machine kept busy (which
    delays a second read by a variable amount) cannot pull them apart."""
    bursty = ("import random, time\n"
              "while True:\n"
              "    end = time.time() + random.uniform(0.001, 0.03)\n"
              "    while time.time() < end: pass\n"
              "    time.sleep(random.uniform(0.001, 0.03))")
    busy = [subprocess.Popen([sys.executable, "-c", bursty])
            for _ in range((os.cpu_count() or 1) + 1)]
    try:
        sampler = Sampler()
        gaps = []
        for _ in range(40):
            time.sleep(0.1)
            row = sampler.sample("cpu_bound")
            cores = [row[c] for c in sampler.schema.core_columns]
            gaps.append(abs(row["cpu_util_overall"] - float(np.mean(cores))))
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert float(np.median(gaps)) <= 1.0, gaps


def test_the_workload_cpu_use_is_its_own(short_run, tmp_path):
    """cpu_bound keeps about one core busy; idle uses next to nothing, whatever else runs."""
    busy = load_runs(short_run.path)["workload_cpu_percent"].to_numpy()
    assert busy.size and not np.isnan(busy).any()
    assert 60 <= np.median(busy) <= 120
    idle = load_runs(Collector(rate=10).record("idle", 2, tmp_path).path)
    assert np.median(idle["workload_cpu_percent"].to_numpy()) <= 10


def test_a_meter_counts_the_children_of_its_process():
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        meter = ProcessMeter(os.getpid())
        time.sleep(1.0)
        assert 60 <= meter.read() <= 120  # the child's busy loop, not this process
    finally:
        child.kill()
        child.wait()


def test_a_meter_counts_children_that_live_shorter_than_a_tick(tmp_path):
    """A `make`-like tree: 25 busy children of ~30-60 ms each, one after another, so most are
    born and reaped between two reads. The kernel's own account of the tree once reaped
    (RUSAGE_CHILDREN of this process) is the reference the meter must match."""
    import resource

    done, busy = tmp_path / "done", tmp_path / "busy.sh"
    busy.write_text("i=0; while [ $i -lt 40000 ]; do i=$((i+1)); done\n")
    script = f"for n in $(seq 25); do sh {busy}; done; touch {done}; sleep 30"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    root = subprocess.Popen(["sh", "-c", script])
    try:
        meter = ProcessMeter(root.pid)
        metered, last = 0.0, time.monotonic()
        while not done.exists():
            time.sleep(0.1)
            percent, now = meter.read(), time.monotonic()
            metered += (percent or 0.0) / 100 * (now - last)
            last = now
    finally:
        root.kill()
        root.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    kernel = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert kernel > 0.3, "the children did too little work to test anything"
    assert 0.85 * kernel <= metered <= 1.05 * kernel + 0.05


@pytest.mark.parametrize(("fn", "fragment"), [
    (crashing_workload, "exit code 1): ImportError: No module named 'requests'"),
    (killed_workload, "killed by signal 9"),
    (quiet_exit_workload, "died after"),
])
def test_a_dying_workload_fails_the_run_and_saves_nothing(tmp_path, fn, fragment):
    with pytest.raises(WorkloadError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        Collector().record("network_bound", 3, tmp_path, workload_fn=fn)
    assert list(tmp_path.iterdir()) == []


def test_unknown_workload_and_bad_rate(tmp_path):
    with pytest.raises(DataError, match="unknown workload 'gpu'"):
        Collector().record("gpu", 1, tmp_path)
    with pytest.raises(DataError, match="rate must be"):
        Collector(rate=0)


def _gone_within(procs: list[psutil.Process], seconds: float) -> bool:
    """Whether every process exited (a zombie nobody reaps counts as exited)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


def test_samples_survive_kill_9(tmp_path):
    cmd = [sys.executable, "-m", "cputwin", "collect", "--workload", "idle", "--seconds", "60",
           "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline and len(list(tmp_path.glob("*.parts/part-*.parquet"))) < 6:
        time.sleep(0.1)
    time.sleep(0.3)
    workload = psutil.Process(proc.pid).children()
    assert workload, "the collector runs its workload in a child process"
    killed_at = time.time()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert _gone_within(workload, 5.0), "the workload outlived its killed collector"
    parts = list(tmp_path.glob("*.parts"))
    assert len(parts) == 1
    frame = pl.read_parquet(parts[0] / "part-*.parquet")
    ts = frame["timestamp"].to_numpy()
    assert ts.size >= 15
    # flushed every 0.5 s: the newest sample on disk is about that old (plus a write)
    assert killed_at - ts.max() < 1.5
    assert np.all(np.diff(ts) > 0)
    recovered = subprocess.run([sys.executable, "-m", "cputwin", "recover", str(parts[0]),
                                "--json"], capture_output=True, text=True, check=True)
    run = Path(json.loads(recovered.stdout)["path"])
    assert json.loads(recovered.stdout)["rows"] == ts.size
    assert load_runs(run).height == ts.size
    assert read_metadata(run)["recovered"] is True
    assert run.name.startswith("idle_")
    again = subprocess.run([sys.executable, "-m", "cputwin", "recover", str(parts[0])],
                           capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.startswith("error: ")
    assert "Traceback" not in again.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_collect_stopped_by_ctrl_c_or_sigterm_stops_its_workload_and_keeps_its_parts(
        tmp_path, signum):
    cmd = [sys.executable, "-m", "cputwin", "collect", "--workload", "idle", "--seconds", "60",
           "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and len(list(tmp_path.glob("*.parts/part-*.parquet"))) < 3:
        time.sleep(0.1)
    workload = psutil.Process(proc.pid).children()
    assert workload, "the collector runs its workload in a child process"
    time.sleep(0.3)  # a few samples taken since the last part (parts come every 0.5 s)
    flushed = max(pl.read_parquet(p)["timestamp"].max() for p in tmp_path.glob("*.parts/part-*"))
    sent_at = time.time()
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 130 and stderr.strip().endswith("interrupted"), stderr
    assert "Traceback" not in stderr
    assert _gone_within(workload, 2.0), "the collector stopped without stopping its workload"
    parts = list(tmp_path.glob("*.parts"))
    assert len(parts) == 1
    ts = pl.read_parquet(parts[0] / "part-*.parquet")["timestamp"].to_numpy()
    # flushed on the way out: the samples taken since the last periodic part are kept too
    assert ts.size >= 10 and ts.max() > flushed and sent_at - ts.max() < 1.0


def test_recovery_never_writes_over_a_run(tmp_path):
    (tmp_path / "idle_1.parts").mkdir()
    (tmp_path / "idle_1.parquet").write_bytes(b"a run")
    with pytest.raises(DataError, match="already exists"):
        recover_parts(tmp_path / "idle_1.parts")
    assert (tmp_path / "idle_1.parquet").read_bytes() == b"a run"
    with pytest.raises(DataError, match="not a folder of run parts"):
        recover_parts(tmp_path / "idle_1.parquet")


def test_a_run_never_replaces_a_file_of_the_same_name(tmp_path):
    """Two runs of one workload in one second got one name, and the second replaced the
    first: the run takes the next free name instead."""
    from datetime import datetime, timedelta

    now = datetime.now()
    taken = {}
    for s in range(-1, 4):  # every name this run could get from the clock
        path = tmp_path / f"idle_{(now + timedelta(seconds=s)).strftime('%Y%m%d_%H%M%S')}.parquet"
        path.write_bytes(b"an earlier run")
        taken[path] = path.read_bytes()
    run = Collector(rate=10).record("idle", 0.5, tmp_path)
    assert run.path not in taken and run.path.name.startswith("idle_")
    assert load_runs(run.path).height >= 3
    assert all(p.read_bytes() == b"an earlier run" for p in taken)


def test_concurrent_collects_into_one_folder_both_keep_their_run(tmp_path):
    cmd = [sys.executable, "-m", "cputwin", "collect", "--workload", "idle", "--seconds", "1",
           "--out", str(tmp_path), "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in results]
    paths = {json.loads(out)["runs"][0]["path"] for out, _ in results}
    assert len(paths) == 3 and all(load_runs(p).height > 0 for p in paths)
    assert sorted(str(p) for p in tmp_path.glob("*.parquet")) == sorted(paths)


def test_a_recovered_run_keeps_its_host_and_metadata(tmp_path):
    calls = itertools.count(1)

    def interrupt(_fraction):
        if next(calls) == 10:  # counted, not timed: a stalled tick is skipped
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Collector(rate=10, flush_interval=0.2).record("idle", 30, tmp_path, tick=interrupt)
    parts = list(tmp_path.glob("*.parts"))
    assert len(parts) == 1
    run, rows = recover_parts(parts[0])
    meta = read_metadata(run)
    assert meta["recovered"] is True and rows == 10  # every sample taken, flushed or not
    assert meta["host"] == socket.gethostname() and meta["workload"] == "idle"
    assert meta["rate_hz"] == 10 and meta["logical_cores"] == os.cpu_count()
    assert load_runs(run)["host"].unique().to_list() == [socket.gethostname()]


def test_kill_9_during_io_bound_leaves_nothing_in_the_temp_folder(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    cmd = [sys.executable, "-m", "cputwin", "collect", "--workload", "io_bound", "--seconds", "60",
           "--out", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TMPDIR": str(scratch)})
    deadline = time.time() + 30
    while time.time() < deadline and len(list(tmp_path.glob("runs/*.parts/part-*"))) < 4:
        time.sleep(0.1)
    workload = psutil.Process(proc.pid).children()
    assert workload, "the collector runs its workload in a child process"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert _gone_within(workload, 5.0)
    left = [p for p in scratch.rglob("*") if p.is_file()]
    assert left == [], f"left behind: {[(str(p), p.stat().st_size) for p in left]}"


def test_collect_all_lists_every_run_whole_on_a_terminal(tmp_path):
    """On a terminal, lines printed while progress bars redraw were garbled; the runs are
    listed after the bars, each on a line of its own."""
    import pty
    import re

    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "cputwin", "collect", "--workload", "all", "--seconds", "0.5",
           "--out", str(out)]
    leader, follower = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=follower, stdout=follower, stderr=follower,
                            env={**os.environ, "COLUMNS": "300", "TERM": "xterm"})
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal closed: the command exited
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(60) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode("utf-8", "replace"))
    lines = [line.strip() for line in text.replace("\r", "\n").split("\n")]
    runs = sorted(out.glob("*.parquet"))
    assert len(runs) == 6
    for run in runs:
        assert any(line.startswith(f"{run} (") and line.endswith(" s)") for line in lines), (
            run, lines)


def test_two_watch_records_in_one_second_are_two_files(tmp_path):
    from cputwin.live.stream import Tick
    from cputwin.live.watch import Recorder
    from cputwin.telemetry.collector import Sampler

    sampler = Sampler()
    first, second = Recorder(tmp_path, sampler), Recorder(tmp_path, sampler)
    tick = Tick(prediction=1.0, bases=None, residual=0.0, score=0.0)
    for recorder in (first, second):
        recorder.add(sampler.sample("idle"), tick)
    paths = {first.close({"watch": True}), second.close({"watch": True})}
    assert len(paths) == 2 and all(load_runs(p).height == 1 for p in paths)
