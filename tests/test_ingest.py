from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cputwin import load_runs
from cputwin.errors import DataError
from cputwin.telemetry.collector import Collector
from cputwin.telemetry.ingest import DataWarning, load_hosts, resample
from cputwin.telemetry.schema import UNLABELLED, factorize
from helpers import synthetic_run, write_run


def _nan_in_core(f: pl.DataFrame) -> pl.DataFrame:
    vals = f["cpu_util_core_1"].to_numpy().copy()
    vals[5] = np.nan
    return f.with_columns(pl.Series("cpu_util_core_1", vals))


BAD_RUNS = [
    (lambda f: f.drop("cpu_util_core_2"), "missing required column 'cpu_util_core_2'"),
    (lambda f: f.drop("cpu_util_overall"), "missing required column 'cpu_util_overall'"),
    (lambda f: f.drop([c for c in f.columns if c.startswith("cpu_util_core")]), "no per-core data"),
    (lambda f: f.with_columns(pl.col("cpu_util_core_0").cast(pl.String)), "must be numeric"),
    (_nan_in_core, "1 missing (null or NaN) values, the first in data row 6 (the first at "
                   "timestamp 1700000000.5); drop or fill those rows"),
    (lambda f: f.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(None)
                              .otherwise(pl.col("cpu_util_overall")).alias("cpu_util_overall")),
     "missing (null or NaN)"),
    (lambda f: f.with_columns(pl.lit(101.0).alias("cpu_util_core_3")), "outside [0, 100]"),
    (lambda f: f.with_columns(pl.lit(-1.0).alias("cpu_util_overall")), "outside [0, 100]"),
    (lambda f: f.head(0), "holds no rows"),
    (lambda f: f.with_columns(pl.when(pl.int_range(pl.len()) == 7).then(float("inf"))
                              .otherwise(pl.col("timestamp")).alias("timestamp")),
     "'timestamp' has infinite values"),
    (lambda f: f.with_columns(pl.lit(-5.0).alias("workload_cpu_percent")),
     "'workload_cpu_percent' has 200 negative or infinite"),
    (lambda f: f.with_columns(pl.when(pl.int_range(pl.len()) < 2).then(float("inf"))
                              .otherwise(pl.col("workload_cpu_percent"))
                              .alias("workload_cpu_percent")),
     "'workload_cpu_percent' has 2 negative or infinite"),
]


@pytest.mark.parametrize(("mutate", "fragment"), BAD_RUNS)
def test_bad_run_gives_one_clear_line_naming_the_file(tmp_path, mutate, fragment):
    path = write_run(mutate(synthetic_run()), tmp_path, "bad")
    with pytest.raises(DataError) as info:
        load_runs(path)
    msg = str(info.value)
    assert fragment in msg
    assert str(path) in msg
    assert "\n" not in msg


def test_unreadable_file(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="cannot read as parquet"):
        load_runs(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.parquet"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty.parquet"):
        load_runs(path)


def test_missing_path_and_empty_glob(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_runs(tmp_path / "nope.parquet")
    with pytest.raises(DataError, match="matches no files"):
        load_runs(str(tmp_path / "*.parquet"))
    with pytest.raises(DataError, match="holds no .parquet"):
        load_runs(tmp_path)


def test_unsorted_timestamps_are_sorted_with_a_warning(tmp_path):
    f = synthetic_run()
    path = write_run(f.reverse(), tmp_path, "rev")
    with pytest.warns(DataWarning, match="not sorted"):
        out = load_runs(path)
    assert out["timestamp"].is_sorted()
    np.testing.assert_array_equal(out["cpu_util_core_0"].to_numpy(), f["cpu_util_core_0"].to_numpy())


def test_duplicated_timestamps_are_dropped_with_a_warning(tmp_path):
    f = synthetic_run(n=50)
    path = write_run(pl.concat([f, f.head(5)]).sort("timestamp"), tmp_path, "dup")
    with pytest.warns(DataWarning, match="dropped 5 rows"):
        out = load_runs(path)
    assert out.height == 50


def test_different_core_counts_are_an_error(tmp_path):
    write_run(synthetic_run(cores=4), tmp_path, "a")
    write_run(synthetic_run(cores=2), tmp_path, "b")
    with pytest.raises(DataError, match="different core counts"):
        load_runs(tmp_path)


def test_unknown_extra_columns_are_ignored(tmp_path):
    f = synthetic_run().with_columns(pl.lit("x").alias("gpu_fan"), pl.lit(3).alias("other"))
    out = load_runs(write_run(f, tmp_path, "extra"))
    assert "gpu_fan" not in out.columns and "other" not in out.columns


def test_runs_are_named_by_file_and_kept_apart(tmp_path):
    write_run(synthetic_run(n=30, workload="a"), tmp_path, "one")
    write_run(synthetic_run(n=40, workload="b", t0=1.0), tmp_path, "two")
    out = load_runs(tmp_path)
    assert out.group_by("run").len().sort("run").rows() == [("one", 30), ("two", 40)]


def test_host_comes_from_the_column_else_the_folder(tmp_path):
    write_run(synthetic_run(n=20).with_columns(pl.lit("db-7").alias("host")), tmp_path / "x", "a")
    write_run(synthetic_run(n=20), tmp_path / "web-1", "a")
    out = load_runs([tmp_path / "x", tmp_path / "web-1"])
    assert out.columns[:2] == ["run", "host"]
    # two hosts: each run is named host/stem, so both hosts' run "a" stay two runs
    assert out.group_by("run", "host").len().sort("run").rows() == [
        ("db-7/a", "db-7", 20), ("web-1/a", "web-1", 20)]
    alone = load_runs(tmp_path / "web-1")
    assert alone["run"].unique().to_list() == ["a"] and alone["host"][0] == "web-1"


def test_a_run_with_two_hosts_is_refused(tmp_path):
    f = synthetic_run(n=20).with_columns(
        pl.when(pl.int_range(pl.len()) < 10).then(pl.lit("a")).otherwise(pl.lit("b")).alias("host"))
    with pytest.raises(DataError, match="one run is one host"):
        load_runs(write_run(f, tmp_path, "mixed"))


def test_host_comes_from_the_collector_metadata(tmp_path):
    import socket

    result = Collector(rate=20).record("idle", 0.5, tmp_path / "rec")
    assert load_runs(result.path)["host"][0] == socket.gethostname()


def test_load_hosts_keeps_machines_of_different_core_counts_apart(tmp_path):
    write_run(synthetic_run(n=20, cores=4), tmp_path / "big", "r")
    write_run(synthetic_run(n=30, cores=2), tmp_path / "small", "r")
    with pytest.raises(DataError, match="--per-host"):
        load_runs(tmp_path.glob("*/*.parquet"))
    hosts = load_hosts(sorted(tmp_path.glob("*/*.parquet")))
    assert {h: f.height for h, f in hosts.items()} == {"big": 20, "small": 30}
    assert "cpu_util_core_3" in hosts["big"].columns and "cpu_util_core_3" not in hosts["small"].columns


def test_seed_files_load_unchanged(seed_data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # the seed's files are out of order
        out = load_runs(seed_data)
    assert out.height == 6928
    assert out["run"].n_unique() == 7


@st.composite
def valid_runs(draw):
    n = draw(st.integers(1, 60))
    cores = draw(st.integers(1, 8))
    util = st.floats(0, 100, allow_nan=False, allow_infinity=False)
    cols = {f"cpu_util_core_{i}": draw(st.lists(util, min_size=n, max_size=n)) for i in range(cores)}
    start = draw(st.floats(0, 2e9, allow_nan=False))
    steps = draw(st.lists(st.floats(0.01, 10), min_size=n, max_size=n))
    # the overall load is the mean of the cores, give or take half a point
    jitter = draw(st.lists(st.floats(-0.5, 0.5), min_size=n, max_size=n))
    overall = np.clip(np.mean(list(cols.values()), axis=0) + jitter, 0, 100)
    return pl.DataFrame({
        "timestamp": np.cumsum([start, *steps[1:]]),
        "cpu_util_overall": overall,
        **cols,
        "workload_type": [draw(st.sampled_from(["cpu_bound", "idle", "x y"]))] * n,
    })


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run=valid_runs())
def test_any_valid_run_round_trips(tmp_path, run):
    path = write_run(run, tmp_path, "gen")
    out = load_runs(path)
    assert out.height == run.height
    for col in run.columns:
        if col != "workload_type":
            np.testing.assert_array_equal(out[col].to_numpy(), run[col].to_numpy())
    assert out["workload_type"].to_list() == run["workload_type"].to_list()


def test_a_file_with_a_run_column_holds_many_runs(tmp_path):
    a = synthetic_run(n=30, seed=1).with_columns(pl.lit("b-run").alias("run"))
    b = synthetic_run(n=20, seed=2).with_columns(pl.lit("a-run").alias("run"))
    # interleaved and reversed: runs come back in first-seen order, each sorted in time
    mixed = pl.concat([a, b]).reverse()
    with pytest.warns(DataWarning, match="not sorted"):
        out = load_runs(write_run(mixed, tmp_path, "export"))
    assert out.group_by("run", maintain_order=True).len().rows() == [("a-run", 20), ("b-run", 30)]
    for _, run in out.group_by("run"):
        assert run["timestamp"].is_sorted()
    # the same timestamp in two runs is no duplicate; twice in one run is
    clean = load_runs(write_run(pl.concat([a, b]), tmp_path / "clean", "export"))
    assert clean.height == 50
    with pytest.warns(DataWarning, match="dropped 5 rows"):
        assert load_runs(write_run(pl.concat([a, a.head(5)]), tmp_path / "dup", "x")).height == 30
    write_run(a, tmp_path / "two", "other")
    write_run(a.with_columns(pl.lit("b-run").alias("run")), tmp_path / "two", "again")
    with pytest.raises(DataError, match="'b-run'"):
        load_runs(tmp_path / "two")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_shuffle_of_many_runs_in_one_file_loads_as_each_run_sorted(tmp_path, data):
    n_runs = data.draw(st.integers(1, 5))
    frame = pl.concat([synthetic_run(n=data.draw(st.integers(1, 30)), cores=2, seed=i)
                       .with_columns(pl.lit(f"r{i}").alias("run")) for i in range(n_runs)])
    # timestamps drawn per row (duplicates within a run possible), rows in any order
    ts = data.draw(st.lists(st.integers(0, 40), min_size=frame.height, max_size=frame.height))
    order = data.draw(st.permutations(list(range(frame.height))))
    shuffled = frame.with_columns(pl.Series("timestamp", [float(t) for t in ts]))[order]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        out = load_runs(write_run(shuffled, tmp_path / f"p{len(order)}", "many"))
    first_seen = shuffled["run"].unique(maintain_order=True).to_list()
    assert out["run"].unique(maintain_order=True).to_list() == first_seen
    expected = shuffled.unique(subset=["run", "timestamp"], keep="first", maintain_order=True)
    assert out.height == expected.height
    for name, run in out.group_by("run", maintain_order=True):
        assert run["timestamp"].is_sorted() and run["timestamp"].n_unique() == run.height
        want = expected.filter(pl.col("run") == name[0]).sort("timestamp", maintain_order=True)
        assert run["cpu_util_core_1"].to_list() == want["cpu_util_core_1"].to_list()


def test_a_run_without_labels_is_one_unlabelled_workload(tmp_path):
    f = synthetic_run(n=30)
    write_run(f.drop("workload_type"), tmp_path / "a", "none")
    write_run(f.with_columns(pl.lit(None, pl.String).alias("workload_type")), tmp_path / "a",
              "empty")
    out = load_runs(tmp_path / "a")
    assert out["workload_type"].to_list() == [UNLABELLED] * 60
    # mixed with labelled runs: each run keeps what it has
    write_run(f, tmp_path / "a", "labelled")
    mixed = load_runs(tmp_path / "a")
    assert dict(mixed.group_by("run").agg(pl.col("workload_type").first()).rows()) == {
        "empty": UNLABELLED, "labelled": "cpu_bound", "none": UNLABELLED}
    # a label missing on some rows only is still an error
    holes = f.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(None)
                           .otherwise(pl.col("workload_type")).alias("workload_type"))
    with pytest.raises(DataError, match="'workload_type' has 1 missing"):
        load_runs(write_run(holes, tmp_path / "b", "holes"))


def test_missing_workload_cpu_is_accepted(tmp_path):
    f = synthetic_run(n=30).with_columns(pl.lit(float("nan")).alias("workload_cpu_percent"))
    assert load_runs(write_run(f, tmp_path, "nan")).height == 30


def _drop_last_core(frame: pl.DataFrame) -> pl.DataFrame:
    cores = [c for c in frame.columns if c.startswith("cpu_util_core_")]
    return frame.drop(cores[-1])


@pytest.mark.parametrize("source", ["seed", "sample"])
def test_recorded_runs_pass_the_overall_check_and_fail_it_without_a_core(
        request, tmp_path, source):
    folder = request.getfixturevalue("seed_data" if source == "seed" else "sample_data")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        warnings.filterwarnings("ignore", ".*(timestamps were not sorted|dropped)", DataWarning)
        load_runs(folder)  # no warning about the overall either
    for path in sorted(folder.glob("*.parquet")):
        write_run(_drop_last_core(pl.read_parquet(path)), tmp_path, path.stem)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(DataError, match=r"not the mean of the (7|1) core columns.*median "
                                            r"\|overall − mean\(cores\)\| \d+\.\d\d points") as info:
            load_runs(tmp_path)
    assert "\n" not in str(info.value)


def test_overall_a_little_off_warns_and_far_off_is_refused(tmp_path):
    f = synthetic_run(n=100, cores=4)  # 10 Hz, 4 cores: one reading's resolution is 2.5 points
    shifted = [f.with_columns((pl.col("cpu_util_overall") + d).clip(0, 100)) for d in (2.2, 3.0)]
    with pytest.warns(DataWarning, match=r"median \|overall − mean\(cores\)\| 2\.\d\d points"):
        load_runs(write_run(shifted[0], tmp_path / "warn", "r"))
    with pytest.raises(DataError, match="is a core column missing"):
        load_runs(write_run(shifted[1], tmp_path / "refuse", "r"))


def test_the_collectors_core_count_must_match_the_columns(tmp_path):
    result = Collector(rate=20).record("idle", 0.5, tmp_path / "rec")
    raw = pq.read_table(result.path)
    cores = [c for c in raw.column_names if c.startswith("cpu_util_core_")]
    fewer = raw.drop([cores[-1]]).replace_schema_metadata(raw.schema.metadata)
    pq.write_table(fewer, tmp_path / "fewer.parquet")
    with pytest.raises(DataError, match=f"recorded {len(cores)} logical cores, the file has "
                                        f"{len(cores) - 1} core columns"):
        load_runs(tmp_path / "fewer.parquet")


def test_a_fifo_is_refused_at_once(tmp_path):
    """A named pipe called run.parquet would block the reader forever (and SIGTERM with it)."""
    fifo = tmp_path / "run.parquet"
    os.mkfifo(fifo)
    code = f"from cputwin import load_runs; load_runs({str(fifo)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert f"DataError: {fifo}: not a regular file" in proc.stderr


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_resample_averages_each_runs_bins_and_never_mixes_runs(data):
    step = data.draw(st.sampled_from([0.5, 1.0, 15.0]))
    frames = []
    for i in range(data.draw(st.integers(1, 3))):
        n = data.draw(st.integers(1, 80))
        frames.append(synthetic_run(n=n, cores=2, seed=i, workload=f"w{i % 2}", t0=1000.0 * i)
                      .with_columns(pl.lit(f"r{i}").alias("run")))
    frame = pl.concat(frames)
    out = resample(frame, step)
    assert out.columns == frame.columns
    for (name,), part in frame.group_by("run", maintain_order=True):
        got = out.filter(pl.col("run") == name)
        bins = (part["timestamp"] // step).to_numpy()
        assert got.height == len(set(bins))
        assert got["workload_type"].unique().to_list() == part["workload_type"].unique().to_list()
        np.testing.assert_allclose((got["timestamp"] // step).to_numpy(), sorted(set(bins)))
        expected = [part["cpu_util_core_1"].to_numpy()[bins == b].mean() for b in sorted(set(bins))]
        np.testing.assert_allclose(got["cpu_util_core_1"].to_numpy(), expected)


@settings(max_examples=100, deadline=None)
@given(labels=st.lists(st.sampled_from(["idle", "cpu_bound", "a", "", "ü b"]), max_size=60))
def test_factorize_gives_each_row_its_label(labels):
    names, codes = factorize(np.array(labels, dtype=object))
    assert len(set(names)) == len(names) and set(names) == set(labels)
    assert [names[c] for c in codes] == labels


def test_utilisation_given_as_ratios_is_pointed_out(tmp_path):
    run = synthetic_run(n=100, cores=2)
    utilisation = [c for c in run.columns if c.startswith("cpu_util_")]
    write_run(run, tmp_path / "percent", "r")
    write_run(run.with_columns(pl.col(utilisation) / 100), tmp_path / "ratio", "r")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        load_runs(tmp_path / "percent")
    with pytest.warns(DataWarning, match="0-1 ratios, multiply them by 100"):
        load_runs(tmp_path / "ratio")


@pytest.mark.parametrize("per_second", [1, 1_000, 1_000_000, 1_000_000_000])
def test_csv_epoch_timestamps_in_s_ms_us_or_ns_become_seconds(tmp_path, per_second):
    run = synthetic_run(n=50, cores=2).with_columns(pl.col("timestamp").round(1))
    stamps = (run["timestamp"] * 10).cast(pl.Int64) * (per_second // 10 or 1)
    if per_second == 1:
        stamps = run["timestamp"]
    run.with_columns(stamps.alias("timestamp")).write_csv(tmp_path / "r.csv")
    got = load_runs(tmp_path / "r.csv")["timestamp"].to_numpy()
    np.testing.assert_allclose(got, run["timestamp"].to_numpy(), rtol=0, atol=1e-6)


def test_a_column_map_names_every_numbered_core_at_once(tmp_path):
    from cputwin.telemetry.ingest import parse_column_map

    run = synthetic_run(n=50, cores=12)
    exported = run.rename({f"cpu_util_core_{k}": f"node_cpu{k}_busy" for k in range(12)}
                          | {"cpu_util_overall": "total", "timestamp": "time"})
    exported.write_csv(tmp_path / "export.csv")
    columns = parse_column_map("time=timestamp,total=cpu_util_overall,"
                               "node_cpu{n}_busy=cpu_util_core_{n}")
    got = load_runs(tmp_path / "export.csv", columns)
    assert got.select(run.columns).equals(run.select(run.columns))
    with pytest.raises(DataError, match="needs {n} on both sides"):
        parse_column_map("cpu{n}=cpu_util_core_0")


@pytest.mark.parametrize("separator", [",", ";", "\t"])
def test_a_csv_separated_by_commas_semicolons_or_tabs_reads_the_same(tmp_path, separator):
    run = synthetic_run(n=50, cores=2)
    run.write_csv(tmp_path / "r.csv", separator=separator)
    assert load_runs(tmp_path / "r.csv").select(run.columns).equals(run)
