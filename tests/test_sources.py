"""Telemetry where it already lives: CSV, Telegraf line protocol, Prometheus, node_exporter.

The Prometheus and node_exporter tests run Debian's real programs on free loopback ports
(skipped, with the reason, where they are not installed)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cputwin import load_runs
from cputwin.errors import DataError
from cputwin.telemetry.collector import Collector, Sampler, read_metadata, ticks
from cputwin.telemetry.counters import MODES, CounterBreak, interval_utilisation, run_starts
from cputwin.telemetry.ingest import DataWarning, parse_column_map
from cputwin.telemetry.prometheus import (
    NodeExporterSampler,
    counters_to_frame,
    load_prometheus,
    parse_node_metrics,
    parse_time,
)
from cputwin.telemetry.schema import UNLABELLED
from cputwin.telemetry.telegraf import parse_line
from helpers import synthetic_run

CLI = [sys.executable, "-m", "cputwin"]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


# ---------------------------------------------------------------- CSV

@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 60), cores=st.integers(1, 6), seed=st.integers(0, 1000))
def test_a_csv_with_cputwins_columns_loads_as_its_parquet_does(tmp_path_factory, n, cores,
                                                                 seed):
    tmp_path = tmp_path_factory.mktemp("csv")
    run = synthetic_run(n=n, cores=cores, seed=seed)
    run.write_parquet(tmp_path / "a.parquet")
    (tmp_path / "csv").mkdir()
    run.write_csv(tmp_path / "csv" / "a.csv")
    from_parquet, from_csv = load_runs(tmp_path / "a.parquet"), load_runs(tmp_path / "csv")
    assert from_csv.columns == from_parquet.columns
    assert from_csv.drop("host").equals(from_parquet.drop("host"))


def test_a_csv_with_other_names_loads_through_a_column_map(tmp_path):
    run = synthetic_run(n=30, cores=2).drop("workload_cpu_percent")
    stamps = pl.from_epoch((run["timestamp"] * 1e6).cast(pl.Int64), time_unit="us")
    exported = run.rename({"cpu_util_core_0": "c0", "cpu_util_core_1": "c1",
                           "cpu_util_overall": "all", "workload_type": "job"}).with_columns(
        stamps.dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").alias("timestamp")).rename({"timestamp": "ts"})
    exported.write_csv(tmp_path / "export.csv")
    with pytest.raises(DataError, match="missing required columns"):
        load_runs(tmp_path / "export.csv")
    mapping = parse_column_map("ts=timestamp, c0=cpu_util_core_0,c1=cpu_util_core_1,"
                               "all=cpu_util_overall,job=workload_type")
    frame = load_runs(tmp_path / "export.csv", columns=mapping)
    assert np.allclose(frame["timestamp"].to_numpy(), run["timestamp"].to_numpy(), atol=1e-5)
    assert np.allclose(frame["cpu_util_core_1"].to_numpy(), run["cpu_util_core_1"].to_numpy())


@pytest.mark.parametrize(("text", "fragment"), [
    ("ts", "'ts' is not OLD=NEW"), ("a=b,c=b", "same name"), ("=x", "not OLD=NEW")])
def test_a_bad_column_map_is_one_error(text, fragment):
    with pytest.raises(DataError, match=fragment):
        parse_column_map(text)


def test_the_cli_reads_csv_with_columns_and_says_what_is_wrong_in_one_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\x00\x01garbage,\n\xff\xfe")
    one_line_error(cli("evaluate", str(bad)), str(bad))
    run = synthetic_run(n=30, cores=2).rename({"cpu_util_core_0": "c0"})
    run.write_csv(tmp_path / "r.csv")
    one_line_error(cli("evaluate", str(tmp_path / "r.csv"), "--columns", "c0"), "--columns")
    one_line_error(cli("evaluate", str(tmp_path / "r.csv")), "missing required column")


# ---------------------------------------------------------------- Telegraf line protocol

TELEGRAF = """\
# telegraf's cpu input, percpu and totalcpu, 10 s apart; lines out of order
cpu,cpu=cpu1,host=web\\ 1 usage_idle=50,usage_user=40,usage_system=10 1700000010000000000
cpu,cpu=cpu0,host=web\\ 1 usage_idle=90,usage_user=10 1700000010000000000
cpu,cpu=cpu-total,host=web\\ 1 usage_idle=70 1700000010000000000
mem,host=web\\ 1 used_percent=41.5,available=1234i 1700000010000000000
cpu,cpu=cpu0,host=web\\ 1 usage_idle=80,usage_user=20 1700000000000000000
cpu,cpu=cpu1,host=web\\ 1 usage_idle=60,usage_guest=0 1700000000000000000
cpu,cpu=cpu-total,host=web\\ 1 usage_idle=70 1700000000000000000
cpu,cpu=cpu0,host=web\\ 1 usage_user=5 1700000020000000000
cpu,cpu=cpu1,host=web\\ 1 usage_idle=100 1700000020000000000
"""


def test_telegraf_lines_in_any_order_with_a_total_and_missing_fields(tmp_path):
    path = tmp_path / "web.lp"
    path.write_text(TELEGRAF)
    with pytest.warns(DataWarning, match="dropped 1 timestamps"):
        frame = load_runs(path)
    assert frame["timestamp"].to_list() == [1_700_000_000.0, 1_700_000_010.0]
    assert frame["cpu_util_core_0"].to_list() == [20.0, 10.0]
    assert frame["cpu_util_core_1"].to_list() == [40.0, 50.0]
    assert frame["cpu_util_overall"].to_list() == [30.0, 30.0]  # cpu-total, as Telegraf gave it
    assert frame["host"].unique().to_list() == ["web 1"]
    assert frame["workload_type"].unique().to_list() == [UNLABELLED]


def test_telegraf_time_counters_stand_in_for_a_missing_usage_idle(tmp_path):
    lines = [f"cpu,cpu=cpu0 time_idle={idle},time_user={user},time_system=1 {t}"
             for t, idle, user in ((1, 10.0, 5.0), (2, 10.5, 5.5), (3, 10.75, 6.25))]
    (tmp_path / "c.influx").write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings():  # the first line only starts the counters: no loss
        warnings.simplefilter("error", DataWarning)
        frame = load_runs(tmp_path / "c.influx")  # (timestamps in seconds)
    assert frame["cpu_util_core_0"].to_list() == [50.0, 75.0]
    assert frame["cpu_util_overall"].to_list() == [50.0, 75.0]  # no cpu-total: the cores' mean


def test_a_nan_usage_idle_is_a_missing_value_not_a_broken_file(tmp_path):
    path = tmp_path / "web.lp"
    path.write_text(TELEGRAF.replace("usage_idle=90,usage_user=10", "usage_idle=NaN"))
    with pytest.warns(DataWarning, match="dropped 2 timestamps"):
        frame = load_runs(path)
    assert frame["timestamp"].to_list() == [1_700_000_000.0]


def test_telegraf_gaps_end_runs_and_precision_is_read_from_the_size(tmp_path):
    stamps = [1_700_000_000_000 + 10_000 * k for k in (0, 1, 2, 3, 10, 11, 12)]  # ms
    (tmp_path / "g.lp").write_text("".join(f"cpu,cpu=cpu0 usage_idle={k} {t}\n"
                                           for k, t in enumerate(stamps)))
    frame = load_runs(tmp_path / "g.lp")
    assert frame["run"].unique(maintain_order=True).to_list() == ["g-1", "g-2"]
    assert frame["timestamp"][0] == 1_700_000_000.0


@pytest.mark.parametrize(("text", "fragment"), [
    ("cpu,cpu=cpu0 usage_idle=1 12\ncpu,cpu=cpu0 usage_idle=oops 13\n", "line 2: field value"),
    ("cpu,cpu=cpu0 usage_idle=1\n", "line 1: no timestamp"),
    ("cpu usage_idle=1 1\n", "a cpu line without a cpu tag"),
    ("cpu,cpu=cpu0,host=a usage_idle=1 1\ncpu,cpu=cpu0,host=b usage_idle=1 2\n", "2 hosts"),
    ("mem used=1 1\n", "no 'cpu' measurement lines"),
    ("cpu,cpu=cpu-total usage_idle=1 1\n", "no per-core lines"),
    ("cpu,cpu=cpu0 usage_idle=\"x\" 1\n", "usage_idle must be a number"),
    ("cpu,cpu=cpu0 usage_idle=250 1\n", "outside [0, 100]"),
])
def test_bad_line_protocol_is_one_error_naming_the_file(tmp_path, text, fragment):
    path = tmp_path / "bad.lp"
    path.write_text(text)
    with pytest.raises(DataError, match=r"bad\.lp") as caught:
        load_runs(path)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
                 min_size=1, max_size=8)


def _escape(text: str, chars: str) -> str:
    return "".join("\\" + c if c in chars + "\\" else c for c in text)


@settings(max_examples=200, deadline=None)
@given(measurement=_names, tags=st.dictionaries(_names, _names, max_size=3),
       fields=st.dictionaries(_names, st.one_of(
           st.floats(allow_nan=False, allow_infinity=False), st.integers(-2**62, 2**62),
           st.booleans(), st.text(max_size=8)), min_size=1, max_size=4),
       stamp=st.one_of(st.none(), st.integers(0, 2**62)))
def test_line_protocol_round_trips(measurement, tags, fields, stamp):
    """What a writer escapes as the format says, the parser reads back exactly."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return f"{v}i"
        if isinstance(v, float):
            return repr(v)
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    key = ",".join([_escape(measurement, ", "),
                    *(f"{_escape(k, ',= ')}={_escape(v, ',= ')}" for k, v in tags.items())])
    line = key + " " + ",".join(f"{_escape(k, ',= ')}={value(v)}" for k, v in fields.items())
    if stamp is not None:
        line += f" {stamp}"
    assert parse_line(line) == (measurement, tags, fields, stamp)


@settings(max_examples=50, deadline=None)
@given(idle=st.lists(st.lists(st.floats(0, 100), min_size=3, max_size=3), min_size=2,
                     max_size=20), order=st.randoms(use_true_random=False))
def test_telegraf_rows_are_the_lines_values_whatever_their_order(tmp_path_factory, idle, order):
    lines = [f"cpu,cpu=cpu{c} usage_idle={v!r} {1_700_000_000 + 10 * t}000000000"
             for t, row in enumerate(idle) for c, v in enumerate(row)]
    order.shuffle(lines)
    path = tmp_path_factory.mktemp("lp") / "h.lp"
    path.write_text("\n".join(lines))
    frame = load_runs(path)
    expected = 100.0 - np.array(idle)
    got = frame.select([f"cpu_util_core_{c}" for c in range(3)]).to_numpy()
    assert np.allclose(got, expected, atol=1e-9)
    assert np.allclose(frame["cpu_util_overall"].to_numpy(), expected.mean(axis=1), atol=1e-9)


# ---------------------------------------------------------------- counters

@settings(max_examples=200, deadline=None)
@given(deltas=st.lists(st.lists(st.floats(0, 5), min_size=len(MODES), max_size=len(MODES))
                       .filter(lambda d: sum(d) > 1e-3), min_size=1, max_size=6))
def test_utilisation_is_one_minus_idle_over_all_modes(deltas):
    prev = {c: dict.fromkeys(MODES, 100.0) for c in range(len(deltas))}
    cur = {c: {m: 100.0 + d for m, d in zip(MODES, row, strict=True)}
           for c, row in enumerate(deltas)}
    overall, cores = interval_utilisation(prev, cur)
    idle = MODES.index("idle")
    for row, got in zip(deltas, cores, strict=True):
        assert got == pytest.approx(100 * (1 - row[idle] / sum(row)), abs=1e-6)
        assert 0 <= got <= 100
    assert overall == pytest.approx(
        100 * (1 - sum(r[idle] for r in deltas) / sum(map(sum, deltas))), abs=1e-6)


def test_a_reset_or_other_cores_is_no_interval():
    a = {0: {"idle": 5.0, "user": 5.0}, 1: {"idle": 5.0, "user": 5.0}}
    with pytest.raises(CounterBreak, match="backwards"):
        interval_utilisation(a, {0: {"idle": 1.0, "user": 6.0}, 1: a[1]})
    with pytest.raises(CounterBreak, match="set of cores"):
        interval_utilisation(a, {0: a[0]})
    assert run_starts(np.array([0.0, 1, 2, 5, 6])).tolist() == [True, False, False, True, False]


def test_counters_become_runs_ending_at_gaps_resets_and_other_cores():
    def counters(t, offset=0.0, cores=(0, 1)):  # core c is busy a quarter of the time × (c + 1)
        return {c: {"user": 0.25 * (c + 1) * t - offset,
                    "idle": (1 - 0.25 * (c + 1)) * t - offset} for c in cores}
    by_time = {float(t): counters(t) for t in (0, 1, 2, 3, 10, 11, 12, 13)}  # a gap after 3
    by_time |= {float(t): counters(t, 100.0) for t in (14, 15, 16)}  # a reset at 14
    by_time |= {float(t): counters(t, 100.0, (0,)) for t in (17, 18)}  # core 1 offline
    with pytest.warns(DataWarning, match="dropped 1 intervals of runs with fewer cores"):
        frame = counters_to_frame(by_time, "h")
    assert frame["run"].to_list() == ["h-1"] * 3 + ["h-2"] * 3 + ["h-3"] * 2
    assert frame["timestamp"].to_list() == [1.0, 2, 3, 11, 12, 13, 15, 16]
    assert frame["cpu_util_core_0"].to_list() == [25.0] * 8
    assert frame["cpu_util_core_1"].to_list() == [50.0] * 8
    assert frame["cpu_util_overall"].to_list() == [37.5] * 8


@pytest.mark.parametrize(("text", "expected"), [
    ("1700000000", 1_700_000_000.0), ("2023-11-14T22:13:20Z", 1_700_000_000.0),
    ("2023-11-14T22:13:20", 1_700_000_000.0), ("now", 1_700_000_000.0),
    ("now-10m", 1_699_999_400.0)])
def test_times_are_epoch_iso_or_relative(text, expected):
    assert parse_time(text, now=1_700_000_000.0) == expected
    with pytest.raises(DataError, match="expected seconds"):
        parse_time("yesterday")
    with pytest.raises(DataError, match="not a finite number"):
        parse_time("nan")


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.lists(st.floats(0, 1e9), min_size=len(MODES), max_size=len(MODES)),
                       min_size=1, max_size=8),
       freq=st.one_of(st.none(), st.floats(1e8, 5e9)))
def test_node_exporter_text_gives_back_its_counters(values, freq):
    lines = ["# HELP node_cpu_seconds_total Seconds the CPUs spent in each mode.",
             "# TYPE node_cpu_seconds_total counter"]
    lines += [f'node_cpu_seconds_total{{cpu="{c}",mode="{m}"}} {v!r}'
              for c, row in enumerate(values) for m, v in zip(MODES, row, strict=True)]
    if freq is not None:
        lines += ["# TYPE node_cpu_scaling_frequency_hertz gauge"]
        lines += [f'node_cpu_scaling_frequency_hertz{{cpu="{c}"}} {freq!r}'
                  for c in range(len(values))]
    counters, freqs = parse_node_metrics(("\n".join(lines) + "\n").encode(), "u")
    assert counters == {c: dict(zip(MODES, row, strict=True)) for c, row in enumerate(values)}
    assert freqs["cpu_freq_current_mhz"] == (None if freq is None else pytest.approx(freq / 1e6))


@pytest.mark.parametrize(("body", "fragment"), [
    (b"<html>not metrics</html>", "not Prometheus text format"),
    (b"\xff\xfe", "not Prometheus text format"),
    (b"# TYPE up gauge\nup 1\n", "no node_cpu_seconds_total"),
])
def test_garbage_from_an_exporter_is_one_error(body, fragment):
    with pytest.raises(DataError, match=fragment):
        parse_node_metrics(body, "http://x/metrics")


# ---------------------------------------------------------------- the real programs

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
PROMETHEUS = "/usr/bin/prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {seconds} s")


def start(cmd: list[str], ready: str, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    try:
        wait_ready(ready, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def node_exporter(tmp_path_factory):
    if not os.access(NODE_EXPORTER, os.X_OK):
        pytest.skip(f"{NODE_EXPORTER} not installed (Debian package prometheus-node-exporter; "
                    ".ci/run installs it)")
    port = free_port()
    proc = start([NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}"],
                 f"http://127.0.0.1:{port}/metrics",
                 tmp_path_factory.mktemp("node") / "node_exporter.log")
    yield f"127.0.0.1:{port}"
    stop(proc)


@pytest.fixture(scope="module")
def prometheus(node_exporter, tmp_path_factory):
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip(f"{PROMETHEUS} not installed (Debian package prometheus; .ci/run installs it)")
    home, port = tmp_path_factory.mktemp("prometheus"), free_port()
    config = home / "prometheus.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "node",
                            "static_configs": [{"targets": [node_exporter]}]}]}))
    proc = start([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={home / 'data'}",
                  f"--web.listen-address=127.0.0.1:{port}"],
                 f"http://127.0.0.1:{port}/-/ready", home / "prometheus.log")
    yield f"http://127.0.0.1:{port}", time.time()
    stop(proc)


@pytest.fixture(scope="module")
def side_by_side(node_exporter, prometheus):
    """Ten seconds at 1 Hz read both ways at the same ticks: cputwin's psutil sampler and a
    scrape of the real node_exporter, with a busy loop pinned to core 0 throughout."""
    busy = subprocess.Popen([sys.executable, "-c",
                             "import os; os.sched_setaffinity(0, {0})\nwhile True: pass"])
    try:
        local = Sampler()
        remote = NodeExporterSampler(f"http://{node_exporter}/metrics")
        rows = [(local.sample("x"), remote.sample("x")) for _ in ticks(1.0, 10)]
    finally:
        busy.kill()
        busy.wait()
    return rows


def _cores(row: dict) -> np.ndarray:
    return np.array([v for k, v in sorted(row.items()) if k.startswith("cpu_util_core_")])


def test_node_exporter_agrees_with_the_psutil_collector(side_by_side):
    local = np.array([_cores(a) for a, _ in side_by_side])
    remote = np.array([_cores(b) for _, b in side_by_side])
    assert local.shape == remote.shape and local.shape[1] == os.cpu_count()
    mean_abs = np.abs(local - remote).mean(axis=0)
    assert (mean_abs <= 2.0).all(), mean_abs
    assert remote[:, 0].mean() > 50  # the pinned busy loop is seen on its core


def test_an_import_from_prometheus_matches_the_direct_scrape(side_by_side, prometheus,
                                                             node_exporter):
    url, _ = prometheus
    first, last = side_by_side[0][1]["timestamp"], side_by_side[-1][1]["timestamp"]
    deadline = time.time() + 20
    while True:  # until the server has stored a scrape past the window
        frame = load_prometheus(url, node_exporter, first - 1, last + 1)
        if frame.height and frame["timestamp"].max() >= last or time.time() > deadline:
            break
        time.sleep(0.2)
    assert frame["host"].unique().to_list() == [node_exporter]
    steps = np.diff(frame["timestamp"].to_numpy())
    # raw scrapes, one real interval per row; a scrape the server missed ends a run
    assert abs(np.median(steps) - 1.0) < 0.05 and (steps < 1.5).mean() >= 0.8, steps
    assert frame["run"].n_unique() == 1 + (steps > 1.5).sum()
    # the interior of the side-by-side window, read both ways: Prometheus scrapes at its
    # own phase, so each edge interval may reach up to a second outside the busy loop
    direct = np.array([_cores(b) for _, b in side_by_side[2:]])
    # an interval that ends after the last direct tick reaches past the busy loop's end
    frame = frame.filter(pl.col("timestamp").is_between(first + 1.5, last - 0.2))
    imported = frame.select(sorted(c for c in frame.columns if c.startswith("cpu_util_core_")))
    assert imported.height >= 3  # the server's first scrapes may come a few seconds late
    diff = np.abs(imported.to_numpy().mean(axis=0) - direct.mean(axis=0))
    # the same counters, read over intervals of another phase while the machine runs
    # the tests: within a few points (a wrong formula is off by tens)
    assert (diff <= 10.0).all(), diff
    assert imported["cpu_util_core_0"].min() > 90  # the pinned busy loop, in every interval


def test_import_train_and_watch_a_remote_host_end_to_end(tmp_path, prometheus, node_exporter,
                                                         side_by_side):
    url, started = prometheus
    # a minute of 1 s scrapes: enough rows for a linear twin's history and its three
    # out-of-fold blocks (about 47 rows)
    time.sleep(max(0.0, started + 60 - time.time()))
    out = tmp_path / "runs"
    imported = cli("import", "prometheus", url, "--instance", node_exporter,
                   "--start", str(started), "--end", "now", "-o", str(out), "--json")
    assert imported.returncode == 0, imported.stderr
    runs = json.loads(imported.stdout)["runs"]
    assert runs and all(Path(r["path"]).exists() for r in runs)
    meta = read_metadata(Path(runs[0]["path"]))
    assert meta["host"] == node_exporter and meta["source"] == "prometheus"
    again = cli("import", "prometheus", url, "--instance", node_exporter,
                "--start", str(started), "--end", "now", "-o", str(out))
    one_line_error(again, "already exists")
    twin = tmp_path / "remote.cputwin"
    trained = cli("train", str(out), "-o", str(twin), "--bases", "physics_linear")
    assert trained.returncode == 0, trained.stderr
    watched = cli("watch", str(twin), "--from", f"http://{node_exporter}/metrics",
                  "--seconds", "3", "--json")
    assert watched.returncode == 0, watched.stderr
    assert json.loads(watched.stdout)["ticks"] == 3


def test_collect_from_a_node_exporter_keeps_the_collectors_guarantees(tmp_path, node_exporter):
    result = Collector(rate=2).record_from(
        NodeExporterSampler(f"http://{node_exporter}/metrics"), 3, tmp_path)
    frame = load_runs(result.path)
    assert frame.height == 6 and abs(result.median_step - 0.5) < 0.02  # drift-free ticks
    assert frame["host"].unique().to_list() == [node_exporter]
    assert frame["workload_type"].unique().to_list() == [UNLABELLED]
    assert read_metadata(result.path)["source"] == "node_exporter"
    labelled = cli("collect", "--from", f"http://{node_exporter}/metrics", "--seconds", "2",
                   "--rate", "2", "--label", "web", "--out", str(tmp_path), "--json")
    assert labelled.returncode == 0, labelled.stderr
    path = Path(json.loads(labelled.stdout)["runs"][0]["path"])
    assert load_runs(path)["workload_type"].unique().to_list() == ["web"]


def test_an_exporter_that_goes_away_leaves_recoverable_parts(tmp_path):
    if not os.access(NODE_EXPORTER, os.X_OK):
        pytest.skip(f"{NODE_EXPORTER} not installed")
    port = free_port()
    proc = start([NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}"],
                 f"http://127.0.0.1:{port}/metrics", tmp_path / "log")
    collect = subprocess.Popen([*CLI, "collect", "--from", f"http://127.0.0.1:{port}/metrics",
                                "--seconds", "60", "--rate", "4", "--out", str(tmp_path / "o")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not list(tmp_path.glob("o/*.parts/part-*.parquet")):
            time.sleep(0.1)
    finally:
        stop(proc)
    _, stderr = collect.communicate(timeout=30)
    assert collect.returncode == 2, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: http://127.0.0.1:")
    assert "Traceback" not in stderr
    parts = list(tmp_path.glob("o/*.parts"))
    assert len(parts) == 1
    recovered = cli("recover", str(parts[0]), "--json")
    assert recovered.returncode == 0, recovered.stderr
    run = Path(json.loads(recovered.stdout)["path"])
    assert read_metadata(run)["host"] == f"127.0.0.1:{port}"


@pytest.mark.parametrize(("url", "fragment"), [
    ("http://127.0.0.1:{closed}/metrics", "cannot reach it"),
    ("ftp://example/metrics", "not an http(s) URL")])
def test_an_unreachable_exporter_is_one_error(tmp_path, url, fragment):
    url = url.format(closed=free_port())
    one_line_error(cli("collect", "--from", url, "--seconds", "1", "--out", str(tmp_path)),
                   fragment)
    assert not list(tmp_path.iterdir())


def test_a_csv_host_column_names_the_host_for_per_host_grouping(tmp_path):
    from cputwin.telemetry.ingest import host_of

    for name, host in (("a", "web1"), ("b", "web2")):
        synthetic_run(n=20, cores=2).with_columns(pl.lit(host).alias("host")).write_csv(
            tmp_path / f"{name}.csv")
    assert [host_of(tmp_path / f"{n}.csv") for n in "ab"] == ["web1", "web2"]
    assert sorted(load_runs(tmp_path)["host"].unique().to_list()) == ["web1", "web2"]


def test_collect_from_starts_no_workload(tmp_path):
    one_line_error(cli("collect", "--from", "http://127.0.0.1:9/metrics", "--workload", "idle",
                       "--out", str(tmp_path / "o")), "with --from nothing is started")
    assert not (tmp_path / "o").exists()
