from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from cputwin.cli import app
from helpers import synthetic_run, write_run

runner = CliRunner()
COMMANDS = ["evaluate", "train", "predict", "collect", "demo", "watch", "serve"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("command", [[], *[[c] for c in COMMANDS]])
def test_help_everywhere(command):
    result = run(*command, "--help")
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.startswith("cputwin ")


@pytest.fixture(scope="module")
def honest_json(sample_data, tmp_path_factory):
    report = tmp_path_factory.mktemp("report")
    result = run("evaluate", sample_data, "--json", "-o", report)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), report


def test_evaluate_json_is_one_object_with_the_documented_keys(honest_json):
    summary, _ = honest_json
    assert {"protocol", "target", "mode", "rows", "r2", "mae", "rmse", "per_workload", "meta",
            "verdict"} <= set(summary)
    assert summary["protocol"] == "honest" and summary["mode"] == "sensor"
    assert set(summary["r2"]) == {*summary["bases"], "average", "stack", "workload_mean"}
    assert {"physics_linear", "gbm_l2", "gbm_pooled"} <= set(summary["bases"])
    assert set(summary["meta"]["weights"]) == set(summary["bases"])
    assert summary["meta"]["kind"].startswith("auto:")
    assert summary["rows"]["train"] > summary["rows"]["test"] > 0
    assert set(summary["per_workload"]) == {"cpu_bound", "io_bound", "memory_bound",
                                            "mixed_workload", "network_bound", "idle"}
    assert summary["verdict"].startswith(f"R² {summary['r2']['stack']:.4f}: ")
    assert "MISSION" not in summary["verdict"] and "BREAKTHROUGH" not in summary["verdict"]


def test_report_is_self_contained_html_with_plots(honest_json):
    _, report = honest_json
    page = (report / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "src=\"http" not in page


@pytest.mark.parametrize(("args", "fragment"), [
    (["evaluate", "/no/such/file.parquet"], "no such file or folder"),
    (["evaluate", "{sample}", "--protocol", "magic"], "'magic' is not one of 'honest'"),
    (["evaluate", "{sample}", "--target", "cpu_util_core_99"], "is not a core of this data"),
    (["evaluate", "{sample}", "--train-fraction", "1.5"], "train fraction must be between"),
    (["evaluate", "{bad}"], "must be numeric"),
    (["predict", "{junk}", "{sample}", "-o", "{out}"], "not a cputwin twin file"),
    (["collect", "--workload", "gpu", "-o", "{out}"], "'gpu' is not one of 'all'"),
    (["serve", "{junk}"], "not a cputwin twin file"),
    (["watch", "{junk}", "--seconds", "1"], "not a cputwin twin file"),
    (["evaluate", "{sample}", "--mode", "psychic"], "'psychic' is not one of 'sensor'"),
    (["evaluate", "{sample}", "--bases", "v2.0,v9"], "unknown base model 'v9'"),
    (["evaluate", "{sample}", "--meta", "median"], "'median' is not one of 'auto'"),
    (["evaluate", "{sample}", "--target", "all", "--protocol", "seed"], "use the honest protocol"),
    (["train", "{sample}", "-o", "{out}", "--target", "cpu_util_core_7"], "is not a core"),
    (["evaluate", "{sample}", "--bases", "detect_wcpu"], "reads 'workload_cpu_percent'"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, sample_data, args, fragment):
    bad = write_run(synthetic_run().with_columns(pl.col("cpu_util_core_0").cast(pl.String)),
                    tmp_path, "bad")
    junk = tmp_path / "junk.cputwin"
    junk.write_text("hello")
    fill = {"sample": sample_data, "bad": bad, "junk": junk, "out": tmp_path / "o.parquet"}
    result = run(*[a.format(**fill) for a in args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and fragment in lines[-1]
    assert "Traceback" not in result.output
    assert not (tmp_path / "o.parquet").exists()


def test_train_then_predict(sample_data, tmp_path):
    twin = tmp_path / "t.cputwin"
    result = run("train", sample_data, "-o", twin, "--json", "--bases", "seed",
                 "--mode", "independent")
    assert result.exit_code == 0, result.output
    trained = json.loads(result.stdout)
    assert set(trained["out_of_fold"]) == {"v2.0", "v2.3", "stack"}
    assert trained["mode"] == "independent"
    preds = tmp_path / "p.parquet"
    result = run("predict", twin, sample_data, "-o", preds, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["mode"] == "independent"
    table = pl.read_parquet(preds)
    assert {"run", "timestamp", "actual", "v2.0", "v2.3", "twin", "residual"} <= set(table.columns)
    assert table["twin"].drop_nans().len() == json.loads(result.stdout)["predicted"]
    other = write_run(synthetic_run(cores=3), tmp_path / "three", "r")
    result = run("predict", twin, other, "-o", tmp_path / "x.parquet")
    assert result.exit_code == 2 and "trained on" in result.stderr


def test_seed_protocol_reproduces_the_notebook(seed_data):
    result = run("evaluate", seed_data, "--protocol", "seed", "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert round(s["r2"]["v2.0"], 4) == 0.7088
    assert round(s["r2"]["v2.3"], 4) == 0.6979
    assert round(s["r2"]["stack"], 4) == 0.7436
    assert round(s["meta"]["weights"]["v2.0"], 4) == 1.0579
    assert round(s["meta"]["weights"]["v2.3"], 4) == 0.0300
    assert s["verdict"] == ("R² 0.7436: above the seed's best single model (0.71), below "
                            "the notebook's goal of 0.85")
    text = run("evaluate", seed_data, "--protocol", "seed")
    assert text.exit_code == 0
    for fragment in ("0.7088", "0.6979", "0.7436", "v2.0 1.0579 / v2.3 0.0300",
                     "stack: R² 0.7436, MAE"):
        assert fragment in text.stdout
    assert "goal of 0.85" not in text.stdout  # the numbers, not a banner


def test_target_all_reports_every_core_and_the_mean(sample_data):
    result = run("evaluate", sample_data, "--target", "all", "--bases", "physics_linear,gbm_l2",
                 "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert set(s["targets"]) == {"cpu_util_core_0", "cpu_util_core_1"}
    r2 = [t["r2"]["stack"] for t in s["targets"].values()]
    assert s["mean"]["r2"] == pytest.approx(sum(r2) / 2)
    assert all(t["mode"] == "sensor" and t["target"] == name for name, t in s["targets"].items())


def test_a_core_the_others_do_not_explain_is_named(tmp_path):
    """Core 2 runs on its own (noise the other cores never show): its twin cannot beat
    each workload's mean by much, and evaluate says so for that core only."""
    rng = np.random.default_rng(3)
    for i, workload in enumerate(["cpu_bound", "idle"] * 2):
        run_ = synthetic_run(n=400, cores=3, workload=workload, seed=i, t0=1e9 + 1e4 * i)
        alone = rng.uniform(0, 100, run_.height)
        run_ = run_.with_columns(pl.Series("cpu_util_core_2", alone)).with_columns(
            pl.mean_horizontal("cpu_util_core_0", "cpu_util_core_1", "cpu_util_core_2")
            .alias("cpu_util_overall"))
        write_run(run_, tmp_path / "data", f"r{i}")
    result = run("evaluate", tmp_path / "data", "--target", "all", "--mode", "independent",
                 "--bases", "physics_linear,gbm_l2", "--max-rounds", "30")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # as one line, whatever the terminal's width
    assert text.count("workload_mean baseline") == 1, text
    assert "cpu_util_core_2: the stack's R² " in text


def test_transfer_to_another_machine(sample_data, tmp_path):
    four = tmp_path / "four"
    for i in range(3):
        write_run(synthetic_run(n=300, cores=4, seed=i, workload="cpu_bound", t0=1e9 + 1e4 * i),
                  four, f"r{i}")
    result = run("evaluate", four, "--test", sample_data, "--bases", "portable", "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["protocol"] == "transfer"
    assert s["machines"] == {"train_cores": 4, "test_cores": 2}
    refused = run("evaluate", four, "--test", sample_data, "--bases", "seed")
    assert refused.exit_code == 2 and "only a twin of portable bases" in refused.stderr


def test_watch_records_and_exits_cleanly(sample_data, tmp_path):
    twin = tmp_path / "portable.cputwin"  # portable: runs on a machine of any core count
    assert run("train", sample_data, "-o", twin, "--bases", "physics_linear,gbm_portable",
               "--mode", "independent").exit_code == 0
    events = tmp_path / "events.jsonl"
    result = run("watch", twin, "--seconds", "4", "-o", tmp_path / "rec", "--events", events,
                 "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert 30 <= summary["ticks"] <= 40
    table = pl.read_parquet(summary["record"])
    assert table.height == summary["ticks"]
    assert {"prediction", "residual", "score", "alarm", "blind",
            "cpu_util_core_0"} <= set(table.columns)
    assert table["blind"].dtype == pl.Boolean
    assert table["prediction"].drop_nulls().len() > 0  # past the twin's history
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert all(e["event"] in ("raise", "clear") for e in lines)
    assert sum(e["event"] == "raise" for e in lines) == summary["alarms"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_watch_stopped_by_ctrl_c_or_sigterm_flushes_its_record(sample_data, tmp_path, signum):
    twin = tmp_path / "portable.cputwin"
    assert run("train", sample_data, "-o", twin, "--bases", "physics_linear",
               "--mode", "independent").exit_code == 0
    rec, events = tmp_path / "rec", tmp_path / "events.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "cputwin", "watch", str(twin), "--output",
                             str(rec), "--events", str(events), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and len(list(rec.glob("*.parts/part-*.parquet"))) < 3:
        time.sleep(0.1)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["interrupted"] and summary["ticks"] >= 10
    assert pl.read_parquet(summary["record"]).height == summary["ticks"]
    assert not list(rec.glob("*.parts")), "the record was left in parts"
    assert events.exists()


def test_watch_feeds_a_twin_the_cpu_use_of_the_workload_it_is_given(tmp_path):
    cores = os.cpu_count()
    files = [write_run(synthetic_run(n=300, cores=cores, seed=i, t0=1e9 + 1e4 * i), tmp_path,
                       f"r{i}") for i in range(3)]
    twin = tmp_path / "wcpu.cputwin"
    trained = run("train", *files, "-o", twin, "--bases", "detect_wcpu", "--mode",
                  "independent", "--max-rounds", "20")
    assert trained.exit_code == 0, trained.output
    refused = run("watch", twin, "--seconds", "1")
    assert refused.exit_code == 2 and "give the process id of the workload" in refused.stderr
    job = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        result = run("watch", twin, "--seconds", "3", "--pid", job.pid, "-o",
                     tmp_path / "rec", "--json")
    finally:
        job.kill()
        job.wait()
    assert result.exit_code == 0, result.output
    table = pl.read_parquet(json.loads(result.stdout)["record"])
    own = table["workload_cpu_percent"].drop_nulls().to_numpy()
    assert own.size >= table.height - 1 and 50 <= float(np.median(own)) <= 120
    assert table["prediction"].drop_nulls().len() > 0
    gone = run("watch", twin, "--seconds", "1", "--pid", job.pid)
    assert gone.exit_code == 2 and f"no process with pid {job.pid}" in gone.stderr


def _fleet(root, cores_of_host):
    for h, (host, cores) in enumerate(cores_of_host.items()):
        for i in range(3):
            write_run(synthetic_run(n=300, cores=cores, seed=10 * h + i, workload="cpu_bound",
                                    t0=1e9 + 1e4 * i), root / host, f"r{i}")
    return sorted(root.glob("*/*.parquet"))


def test_train_per_host_writes_one_twin_per_machine(tmp_path):
    files = _fleet(tmp_path / "fleet", {"alpha": 4, "beta": 2})
    out = tmp_path / "twins"
    result = run("train", *map(str, files), "-o", out, "--bases", "physics_linear,gbm_l2",
                 "--per-host", "--json")
    assert result.exit_code == 0, result.output
    hosts = json.loads(result.stdout)["hosts"]
    assert set(hosts) == {"alpha", "beta"}
    assert sorted(p.name for p in out.iterdir()) == ["alpha.cputwin", "beta.cputwin"]
    assert hosts["alpha"]["hosts"] == ["alpha"]
    # each twin predicts its own machine (4 and 2 cores) unchanged
    for host in ("alpha", "beta"):
        pred = run("predict", out / f"{host}.cputwin", tmp_path / "fleet" / host, "-o",
                   tmp_path / f"{host}.parquet", "--json")
        assert pred.exit_code == 0, pred.output
    mixed = run("train", *map(str, files), "-o", tmp_path / "one.cputwin")
    assert mixed.exit_code == 2 and "--per-host" in mixed.stderr


def test_evaluate_reports_each_host(tmp_path):
    files = _fleet(tmp_path / "fleet", {"alpha": 4, "beta": 4})
    result = run("evaluate", *map(str, files), "--bases", "physics_linear,gbm_l2", "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert set(s["per_host"]) == {"alpha", "beta"}
    rows = sum(entry["rows"] for entry in s["per_host"].values())
    assert rows == s["rows"]["test"]
    text = run("evaluate", *map(str, files), "--bases", "physics_linear,gbm_l2")
    assert "R² per host" in text.stdout


def test_one_twin_over_all_hosts_with_host_categories(tmp_path):
    files = _fleet(tmp_path / "fleet", {"alpha": 4, "beta": 4})
    result = run("train", *map(str, files), "-o", tmp_path / "fleet.cputwin", "--bases",
                 "physics_linear,gbm_l2", "--host-category", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["hosts"] == ["alpha", "beta"]
    pred = run("predict", tmp_path / "fleet.cputwin", *map(str, files), "-o",
               tmp_path / "p.parquet", "--json")
    assert pred.exit_code == 0, pred.output
    both = run("train", *map(str, files), "-o", tmp_path / "x", "--per-host", "--host-category")
    assert both.exit_code == 2 and "exclude each other" in both.stderr


def test_the_watch_view_says_alarm_blind_or_ok_per_core():
    from cputwin.cli import machine_panel
    from cputwin.live.stream import CoreTick, Tick

    tick = Tick(98.0, {}, cores=[
        CoreTick("cpu_util_core_0", 98.0, 2.0, 0.4, blind=True),
        CoreTick("cpu_util_core_1", 10.0, 80.0, 9.0, alarm=True, event="raise"),
        CoreTick("cpu_util_core_2", 30.0, 1.0, 0.1)])
    row = {"cpu_util_core_0": 100.0, "cpu_util_core_1": 90.0, "cpu_util_core_2": 31.0}
    lines = machine_panel(row, tick, None, "independent", "idle").splitlines()
    state = {line.split()[0]: line.split()[-1] for line in lines if line.startswith("core_")}
    assert state == {"core_0": "[yellow]blind[/]", "core_1": "red]ALARM[/]", "core_2": "[green]ok[/]"}
