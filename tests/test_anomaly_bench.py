"""bench/anomaly.py's scoring, baselines and hidden loads, on synthetic scores and real CPU time."""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    """A bench module by path (bench/ on sys.path would shadow dask with bench/dask.py)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


S = _load("anomaly_scoring")
A = _load("anomaly")
ALARM = S.Alarm()
RATE_HZ = 10.0


def scored(rel: np.ndarray, t0: float = 0.0) -> S.Scored:
    rel = np.asarray(rel, float)
    rel = rel[:, None] if rel.ndim == 1 else rel
    return S.Scored(t0 + np.arange(rel.shape[0]) / RATE_HZ, rel)


def with_bursts(n: int, events: list[S.Event], inside: float, outside, core: int = 0,
                cores: int = 1) -> S.Scored:
    """Relative scores: `outside` everywhere (a value or an array), `inside` during events."""
    rel = np.zeros((n, cores)) + (np.asarray(outside)[:, None] if np.ndim(outside) else outside)
    stamps = np.arange(n) / RATE_HZ
    for e in events:
        rel[(stamps >= e.start) & (stamps <= e.end), e.core] = inside
    return S.Scored(stamps, rel)


EVENTS = [S.Event("full", 0, 10.0, 15.0), S.Event("full", 0, 30.0, 33.0),
          S.Event("half", 0, 50.0, 55.0)]


# ------------------------------------------------------------------ PR-AUC


def test_pr_auc_of_a_perfect_score_is_one():
    run = with_bursts(700, EVENTS, inside=5.0, outside=0.1)
    full = [e for e in EVENTS if e.kind == "full"]
    assert S.event_pr_auc([run], EVENTS, full, ALARM) == pytest.approx(1.0)


def test_pr_auc_of_a_useless_score_is_low():
    events = [S.Event("full", 0, 100.0 * k + 20.0, 100.0 * k + 25.0) for k in range(20)]
    rng = np.random.default_rng(0)
    noise = scored(rng.normal(0, 1, 20_000))  # noise that knows nothing of the events
    assert S.event_pr_auc([noise], events, events, ALARM) < 0.3
    perfect = with_bursts(20_000, events, inside=5.0, outside=rng.normal(0, 1, 20_000))
    assert S.event_pr_auc([perfect], events, events, ALARM) > 0.95


def test_pr_auc_of_a_score_high_only_outside_events_is_near_zero():
    outside = np.zeros(700)
    outside[200:260] = 9.0  # one long false episode, away from every window
    outside[400:420] = 9.0
    run = with_bursts(700, EVENTS, inside=0.0, outside=outside)
    full = [e for e in EVENTS if e.kind == "full"]
    assert S.event_pr_auc([run], EVENTS, full, ALARM) < 0.05


def test_pr_auc_ignores_episodes_inside_other_kinds_windows():
    # the half event is high too: an episode inside a window is no false positive
    run = with_bursts(700, EVENTS, inside=5.0, outside=0.1)
    full = [e for e in EVENTS if e.kind == "full"]
    assert S.event_pr_auc([run], EVENTS, full, ALARM) == pytest.approx(1.0)
    assert S.event_pr_auc([run], EVENTS, [], ALARM) is None


# ------------------------------------------------------------------ recall and delay


def test_an_alarm_inside_the_window_counts_with_its_delay():
    run = with_bursts(700, EVENTS[:1], inside=5.0, outside=0.0)
    (delay,) = S.detections([run], EVENTS[:1], ALARM)
    # five ticks above the threshold: the fifth tick after the start raises
    assert delay == pytest.approx((ALARM.raise_ticks - 1) / RATE_HZ, abs=1e-9)


@pytest.mark.parametrize("alarm_from, alarm_to, counted", [
    (16.5, 17.5, True),     # raised within 2 s after the end: counted
    (17.6, 19.0, False),    # raised later than 2 s after the end: missed
    (5.0, 20.0, False),     # already up before the start: no raise inside, missed
])
def test_the_window_is_start_to_two_seconds_after_the_end(alarm_from, alarm_to, counted):
    event = S.Event("full", 0, 10.0, 15.0)
    rel = np.zeros(300)
    rel[int(alarm_from * RATE_HZ):int(alarm_to * RATE_HZ)] = 5.0
    (delay,) = S.detections([scored(rel)], [event], ALARM)
    assert (delay is not None) == counted


def test_an_alarm_on_another_core_does_not_count():
    event = S.Event("any_core", 1, 10.0, 15.0)
    run = with_bursts(300, [S.Event("x", 0, 10.0, 15.0)], inside=5.0, outside=0.0, cores=2)
    assert S.detections([run], [event], ALARM) == [None]
    assert S.detections([with_bursts(300, [event], 5.0, 0.0, cores=2)], [event], ALARM)[0]


def test_recall_and_delays_summary():
    out = S.recall_and_delays([0.5, None, 1.5, 1.0])
    assert out["recall"] == 0.75 and out["median_delay_s"] == 1.0
    assert S.recall_and_delays([])["recall"] is None


def test_loads_the_detector_called_blind_are_counted_apart_from_recall_with_headroom():
    stamps = np.arange(0.0, 30.0, 0.1)
    blind = np.zeros((stamps.size, 2), bool)
    blind[(stamps >= 20) & (stamps < 24), 1] = True  # core 1 saturated for 4 s of 5
    scored = S.Scored(stamps, np.zeros((stamps.size, 2)), blind)
    seen, saturated = S.Event("full", 1, 10.0, 15.0), S.Event("full", 1, 20.0, 25.0)
    shares = [S.blind_share([scored], e) for e in (seen, saturated)]
    assert shares[0] == 0.0 and 0.7 < shares[1] < 0.9
    out = S.with_headroom([1.2, None], shares)
    assert out == {"events": 1, "recall": 1.0, "blind_events": 1}
    assert S.blind_share([S.Scored(stamps, np.zeros((stamps.size, 2)))], seen) is None


# ------------------------------------------------------------------ thresholds and baselines


def ar_noise(rng: np.random.Generator, n: int, cores: int = 1, sd: float = 4.0) -> np.ndarray:
    noise = np.zeros((n, cores))
    for i in range(1, n):
        noise[i] = 0.8 * noise[i - 1] + rng.normal(0, sd, cores)
    return noise


def test_threshold_for_rate_meets_the_rate_over_an_hour_and_on_fresh_data():
    rng = np.random.default_rng(1)
    hour = int(3600 * RATE_HZ)
    train, fresh = (S.ewma(ar_noise(rng, int(1.5 * hour)), ALARM.alpha)[:, 0] for _ in range(2))
    t = S.threshold_for_rate([train], RATE_HZ, ALARM)
    assert S.raises(train / t, ALARM).size <= 1.5 * ALARM.rate_per_hour
    assert S.raises(fresh / t, ALARM).size <= 3 * ALARM.rate_per_hour  # a Poisson 1.5 at most 3
    assert t > np.quantile(train, 0.999)


def synthetic_runs(seed: int, n: int = 300) -> list[S.Run]:
    """Two cores, three workloads with their own levels and an AR(1) wobble."""
    rng = np.random.default_rng(seed)
    runs = []
    for k, (workload, level) in enumerate([("idle", 3.0), ("cpu_bound", 60.0), ("io", 25.0)]):
        noise = ar_noise(rng, n, 2)
        cores = np.clip(level + noise + [0.0, 10.0], 0, 100)
        runs.append(S.Run(f"{workload}_{k}", workload, 1000.0 * k + np.arange(n) / RATE_HZ, cores))
    return runs


@pytest.mark.parametrize("make", [lambda: S.StaticThreshold(), lambda: S.NetdataKMeans(0),
                                  lambda: S.HalfSpaceTrees(0, n_trees=10, height=8),
                                  lambda: S.PCAError()],
                         ids=["static", "netdata_kmeans", "halfspacetrees", "pca"])
def test_each_baseline_meets_the_rate_on_its_own_training_scores(make):
    train = synthetic_runs(2)
    model = S.Calibrated(make(), ALARM, rate_hz=RATE_HZ).fit(train)
    hours = sum(r.stamps.size for r in train) / RATE_HZ / 3600
    raised = S.false_alarms([model.score(r) for r in train], ALARM)
    assert raised / (hours * 2) <= ALARM.rate_per_hour
    assert all(np.isfinite(t) and t > 0 for t in model.thresholds_.values())


@pytest.mark.parametrize("make", [lambda: S.StaticThreshold(), lambda: S.NetdataKMeans(0),
                                  lambda: S.PCAError()],
                         ids=["static", "netdata_kmeans", "pca"])
def test_each_per_core_baseline_sees_a_full_load_on_its_core(make):
    """A sanity check that the baselines can alarm at all: core 0 pinned at 100 %."""
    model = S.Calibrated(make(), ALARM, rate_hz=RATE_HZ).fit(synthetic_runs(3))
    run = synthetic_runs(4)[0]  # idle
    run.cores[100:160, 0] = 100.0
    event = S.Event("full", 0, run.stamps[100], run.stamps[159])
    assert S.detections([model.score(run)], [event], ALARM)[0] is not None


def test_netdata_features_are_smoothed_differences_with_lags():
    x = np.arange(12, dtype=float) ** 2  # differences 1, 3, 5, …: smoothed over 3 = 3, 5, …
    f = S.netdata_features(x, smooth=3, lags=5)
    assert f.shape == (12, 6)
    assert np.isnan(f[:8]).any(axis=1).all() and not np.isnan(f[8:]).any()
    np.testing.assert_allclose(f[8], [13.0, 11.0, 9.0, 7.0, 5.0, 3.0])


def test_ewma_starts_at_the_first_value_and_skips_nan():
    out = S.ewma(np.array([[np.nan], [1.0], [np.nan], [2.0]]), 0.5)
    assert np.isnan(out[0, 0]) and out[1, 0] == 1.0 and np.isnan(out[2, 0])
    assert out[3, 0] == 1.5


# ------------------------------------------------------------------ the hidden loads


def test_plan_keeps_loads_inside_the_run_and_apart():
    rng = random.Random(5)
    kinds = A.KindQueue(rng)
    plans = [A.plan_run(36.0, kinds, 0, 4, rng) for _ in range(30)]
    seen = [p["kind"] for plan in plans for p in plan]
    counts = [seen.count(k) for k in S.KINDS]
    assert max(counts) - min(counts) <= 2  # the kinds take turns
    for plan in plans:
        assert plan and plan[0]["offset"] >= A.WARMUP_S
        assert plan[-1]["offset"] + plan[-1]["length"] <= 36.0 - A.END_S + 1e-9
        for a, b in zip(plan, plan[1:], strict=False):
            assert b["offset"] >= a["offset"] + a["length"] + A.GAP_S - 1e-9
        for p in plan:
            duty, shortest, longest, on_target = A.KIND_SPECS[p["kind"]]
            assert shortest <= p["length"] <= longest and (p["core"] == 0 or not on_target)
    with pytest.raises(ValueError, match="--seconds"):
        A.plan_run(10.0, kinds, 0, 4, rng)


def cpu_share(core: int, duty: float, seconds: float = 1.2) -> tuple[float, float]:
    """Share of a core the hidden load used in steady state (psutil's CPU times, read from
    outside), and the share of the time it waited for the core (the kernel's schedstat)."""
    proc = mp.get_context("fork").Process(target=A.hidden_load, args=(core, seconds + 0.6, duty))
    proc.start()
    stat = Path(f"/proc/{proc.pid}/schedstat")
    try:
        watched = psutil.Process(proc.pid)
        time.sleep(0.3)
        t0, c0, w0 = time.monotonic(), sum(watched.cpu_times()[:2]), int(stat.read_text().split()[1])
        time.sleep(seconds)
        wall = time.monotonic() - t0
        used = sum(watched.cpu_times()[:2]) - c0
        waited = (int(stat.read_text().split()[1]) - w0) / 1e9
        return used / wall, waited / wall
    finally:
        proc.join()


@pytest.mark.skipif(not Path("/proc/self/schedstat").exists(), reason="needs Linux's schedstat")
@pytest.mark.parametrize("duty", [0.5, 0.25])
def test_partial_duty_loop_uses_its_share_of_a_core(duty):
    core = min(os.sched_getaffinity(0))
    used, waited = cpu_share(core, duty)
    if waited > 1.0 - duty - 0.1:  # it cannot catch up on what others took
        pytest.skip(f"core {core} is busy with other work (the loop waited for it "
                    f"{waited:.0%} of the time): a duty cycle cannot be measured there")
    assert used == pytest.approx(duty, abs=0.08)


# ------------------------------------------------------------------ the command


def synthetic_recording(root: Path, seed: int = 0, n: int = 400) -> None:
    """A small 2-core recording in the bench's layout, hidden loads added to the injected
    runs' core 0 (the command's plumbing, not a measure of anything)."""
    import json

    import polars as pl

    rng = np.random.default_rng(seed)
    events, t0 = [], 1.7e9
    for part in ("train", "normal", "inject"):
        for k, (workload, level) in enumerate([("idle", 3.0), ("cpu_bound", 55.0),
                                               ("io_bound", 20.0)]):
            stamps = t0 + np.arange(n) / RATE_HZ
            cores = np.clip(level + ar_noise(rng, n, 2, sd=2.0), 0, 100)
            if part == "inject":
                for start in (10.0, 25.0):
                    inside = (stamps >= t0 + start) & (stamps <= t0 + start + 4.0)
                    cores[inside, 0] = np.minimum(100.0, cores[inside, 0] + 80.0)
                    events.append({"kind": "full", "core": 0, "start": t0 + start,
                                   "end": t0 + start + 4.0})
            (root / part).mkdir(parents=True, exist_ok=True)
            pl.DataFrame({"timestamp": stamps, "cpu_util_overall": cores.mean(axis=1),
                          "cpu_util_core_0": cores[:, 0], "cpu_util_core_1": cores[:, 1],
                          "workload_cpu_percent": np.full(n, level),
                          "workload_type": [workload] * n}
                         ).write_parquet(root / part / f"{workload}_{k}.parquet")
            t0 += n / RATE_HZ + 5.0
    (root / "events.json").write_text(json.dumps(events))
    (root / "recording.json").write_text(json.dumps(
        {"seed": seed, "train_seconds": n / RATE_HZ, "normal_seconds": n / RATE_HZ,
         "seconds": n / RATE_HZ, "target_core": 0,
         "instrument": {"logical_cores": 2, "cpu_model": "synthetic"}}))


def run_bench(*args: str):
    import subprocess

    return subprocess.run([sys.executable, str(BENCH / "anomaly.py"), *args],
                          capture_output=True, text=True, timeout=600)


def test_score_prints_one_json_object_with_every_kind_and_detector(tmp_path):
    import json

    synthetic_recording(tmp_path / "recording_0")
    done = run_bench("--score", str(tmp_path), "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["recordings"] == 1 and out["normal_hours"] == pytest.approx(120 / 3600, rel=0.01)
    assert set(out["kinds"]) == set(S.KINDS)
    assert set(out["false_alarms_per_hour"]) == set(S.DETECTORS)
    for per in out["kinds"].values():
        assert set(per) == set(S.DETECTORS)
        for cell in per.values():
            assert {"recall_min", "recall_mean", "median_delay_s", "p95_delay_s",
                    "pr_auc"} <= set(cell)
    full = out["kinds"]["full"]["static"]
    assert full["events"] == 6 and 0.0 <= full["recall_mean"] <= 1.0
    assert out["kinds"]["half"]["cputwin"]["recall_mean"] is None  # no such load recorded
    headroom = out["kinds"]["full"]["cputwin"]["headroom"]
    assert headroom["events"] + headroom["blind_events"] == 6
    assert out["instrument"]["cpu_model"] == "synthetic"
    table = run_bench("--score", str(tmp_path), "--markdown")
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith("| ")]
    assert rows[0] == "| detector | " + " | ".join(S.KINDS) + " | false alarms per core-hour |"
    assert [r.split(" | ")[0][2:] for r in rows[1:1 + len(S.DETECTORS)]] == list(S.DETECTORS)


def test_score_of_a_folder_without_recordings_is_one_line_exit_2(tmp_path):
    done = run_bench("--score", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "no recordings" in done.stderr and "Traceback" not in done.stderr


def test_alarms_on_relative_scores_are_the_detectors_own():
    """The bench raises cputwin's alarms from score / threshold: the same ticks as the
    detector's own stream."""
    from cputwin.live.detector import Detector

    rng = np.random.default_rng(7)
    residuals = rng.normal(0, 3, 3000)
    residuals[500:530] += 25.0
    residuals[1800:1806] += 40.0
    detector = Detector(centre={"*": 0.0}, scale={"*": 3.0}, threshold=2.5)
    state = detector.stream()
    verdicts = [state.update(r, "w") for r in residuals]
    own = [i for i, v in enumerate(verdicts) if v.event == "raise"]
    rel = np.array([v.score for v in verdicts]) / detector.threshold
    assert own and list(S.raises(rel, S.Alarm.of(detector))) == own


def test_slower_sources_wait_for_the_twins_history_before_the_first_load():
    assert A.warmup_s(10.0) == A.WARMUP_S
    assert A.warmup_s(1.0) == 31.0  # 30 ticks of history at 1 Hz, then a second of scores
    rng = random.Random(3)
    plan = A.plan_run(120.0, A.KindQueue(rng), 0, 2, rng, A.warmup_s(1.0))
    assert plan and plan[0]["offset"] >= 31.0
    with pytest.raises(ValueError, match="injected runs need"):
        A.plan_run(40.0, A.KindQueue(rng), 0, 2, rng, A.warmup_s(1.0))


def test_an_unlabelled_run_is_scraped_from_the_real_node_exporter(tmp_path):
    import shutil

    if not (shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")):
        pytest.skip("prometheus-node-exporter not installed (Debian package; .ci/run installs it)")
    from cputwin.telemetry.ingest import load_runs
    from cputwin.telemetry.schema import UNLABELLED

    proc, url = A.node_exporter(tmp_path)
    try:
        A.record_unlabelled(tmp_path / "runs", 0.5, url, rate=4.0)  # the workloads take turns
    finally:
        proc.terminate()
        proc.wait(10)
    frame = load_runs(tmp_path / "runs")
    assert frame["run"].n_unique() == 1  # one run, as an exporter gives
    assert frame["workload_type"].unique().to_list() == [UNLABELLED]
    assert frame.height >= 0.5 * len(A.WORKLOADS) * 4.0 - 3
    proc, url = A.node_exporter(tmp_path)
    try:  # a narrower normal operation: only the workloads named
        A.record_unlabelled(tmp_path / "two", 1.0, url, rate=4.0, names=["idle", "io_bound"])
    finally:
        proc.terminate()
        proc.wait(10)
    assert 2 * 4.0 - 3 <= load_runs(tmp_path / "two").height <= 2 * 4.0 + 1
