"""The jobs the CLI offers, as library functions: evaluate, train, predict, demo.

They return data and write files; they never print. Progress is reported through a
callback taking a short message.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cputwin.artifact import fingerprint, load_twin, save_twin
from cputwin.errors import CputwinError, DataError
from cputwin.evaluation.metrics import scores
from cputwin.evaluation.protocols import (
    SEED_SETS,
    Evaluation,
    Fit,
    evaluate_honest,
    evaluate_seed,
    evaluate_transfer,
    local_fit,
    split_in_time,
)
from cputwin.evaluation.report import write_report
from cputwin.evaluation.summary import (
    ComparisonSummary,
    DetectorSummary,
    FleetScores,
    Headline,
    HostR2,
    MetaSummary,
    OutOfFold,
    PerHost,
    PredictResult,
    ProtocolSummary,
    Spread,
    Summary,
    TargetsSummary,
    TrainResult,
)
from cputwin.features.engine import unseen_workloads
from cputwin.live.detector import Detector, calibrate
from cputwin.live.twin import Twin, open_twin  # noqa: F401 (part of the pipeline's API)
from cputwin.models import TwinStack
from cputwin.models.base import params_for, resolve_bases
from cputwin.models.cluster import run_each
from cputwin.models.stack import ALL_CORES, Progress, SharedFits
from cputwin.output import check_file, check_folder, write_atomic
from cputwin.telemetry.collector import file_safe
from cputwin.telemetry.ingest import DataWarning, host_of, load_runs, resolve_paths, schema_of
from cputwin.telemetry.schema import HOST, RUN_COLUMN, TIMESTAMP, UNLABELLED, WORKLOAD, WORKLOAD_CPU

PROTOCOLS = ("honest", "seed", "both")


def sample_path() -> Path:
    """The embedded sample: real runs recorded with `cputwin collect --workload all`."""
    return Path(str(files("cputwin") / "data" / "sample"))


def make_stack(
    target: str = "cpu_util_core_0",
    bases: str | list[str] = "twin",
    mode: str = "sensor",
    meta: str | None = None,
    host_category: bool = False,
    max_rounds: int | None = None,
    float32: bool = False,
    threads: int | None = None,
) -> TwinStack:
    """A stack as the CLI builds it: the seed's pair keeps the seed's RidgeCV meta-model,
    any other set of bases lets the out-of-fold score choose (`auto`).

    max_rounds caps every LightGBM base's boosting rounds (early stopping may stop
    sooner); float32 halves the feature matrices (both for millions of rows); threads
    caps LightGBM's threads per base (several twins trained side by side).
    """
    if meta is None:
        meta = "ridge" if bases == "seed" else "auto"
    if max_rounds is not None and max_rounds < 1:
        raise DataError(f"max rounds must be at least 1, got {max_rounds}")
    base_params = {}
    for b in resolve_bases(bases):
        if b.learner == "lgbm" and (max_rounds is not None or threads is not None):
            base_params[b.name] = {
                **({} if max_rounds is None else
                   {"n_estimators": min(max_rounds, params_for(b.name, b.params)["n_estimators"])}),
                **({} if threads is None else {"n_jobs": threads})}
    return TwinStack(bases=bases, target=target, mode=mode, meta_model=meta,
                     host_category=host_category, base_params=base_params or None,
                     feature_dtype="float32" if float32 else "float64")


@contextmanager
def fitter(dask: str | None = None) -> Iterator[Fit]:
    """How stacks are fitted: in this process, or (`dask`: a scheduler address or
    `local:N`) on a Dask cluster, open for the duration."""
    if dask is None:
        yield local_fit
        return
    from cputwin.models.cluster import connect, fit_on_dask

    with connect(dask) as client:
        yield lambda stack, frame, progress=None: fit_on_dask(stack, frame, client, progress)


def targets_of(frame: pl.DataFrame, target: str) -> list[str]:
    """`all` is every core of the data; anything else must be one of its cores."""
    schema = schema_of(frame)
    if target == "all":
        return schema.core_columns
    return [schema.check_target(target)]


def evaluate(
    data: Any,
    protocol: str = "honest",
    target: str = "cpu_util_core_0",
    train_fraction: float = 0.8,
    report_dir: Path | None = None,
    progress: Progress | None = None,
    *,
    test_data: Any = None,
    dask: str | None = None,
    per_host: bool = False,
    jobs: int = 1,
    columns: dict[str, str] | None = None,
    **stack_options: Any,
) -> tuple[Summary | PerHost, list[Evaluation]]:
    """Run a protocol for one target or every core, optionally writing the HTML report.

    With `test_data`, the twin trains on all of `data` and is scored on all of
    `test_data` (another machine): protocol "transfer". `stack_options` go to
    `make_stack` (bases, mode, meta, host_category, max_rounds, float32); `dask` fits
    on a cluster (`fitter`).
    Returns the summary (a `ProtocolSummary`; for `both` a `ComparisonSummary`; for
    target `all` a `TargetsSummary`) and the evaluations behind it.
    per_host: each host on its own (`evaluate_hosts`, a `PerHost`); the evaluations stay
    with the hosts.
    columns: a file's column names -> cputwin's (`load_runs`).
    """
    if protocol not in PROTOCOLS:
        raise DataError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if report_dir is not None:
        check_folder(report_dir)  # before the fit, not after it
    if per_host:
        if test_data is not None:
            raise DataError("--per-host and --test exclude each other: --test scores one twin")
        return evaluate_hosts(data, target, progress, protocol=protocol,
                              train_fraction=train_fraction, report_dir=report_dir, jobs=jobs,
                              dask=dask, **stack_options, **_column_option(columns)), []
    if jobs != 1:
        raise DataError("--jobs runs hosts side by side: it needs --per-host")
    frame = load_runs(data, columns)
    test_frame = load_runs(test_data, columns) if test_data is not None else None
    targets = targets_of(frame, target)
    if protocol != "honest" and (len(targets) > 1 or test_frame is not None):
        raise DataError("--target all and --test use the honest protocol; drop --protocol")
    summaries, evaluations = {}, []
    with fitter(dask) as fit:
        if dask is None and len(targets) > 1:  # every core's twin: pooled bases fitted once
            fit = functools.partial(local_fit, shared=SharedFits())
        for t in targets:
            report = partial(progress, t) if progress and len(targets) > 1 else progress
            one, runs = _evaluate_target(frame, test_frame, t, protocol, train_fraction, report,
                                         fit, stack_options)
            evaluations += runs
            summaries[t] = one
    if report_dir is not None:
        write_report(Path(report_dir), evaluations, f"cputwin evaluation: {target}", data=data)
    if len(targets) == 1:
        return summaries[targets[0]], evaluations
    mean = Headline(*(float(np.mean([getattr(s.headline(), m) for s in summaries.values()]))
                      for m in ("r2", "mae", "rmse")))
    return TargetsSummary(targets=summaries, mean=mean), evaluations


def _evaluate_target(frame, test_frame, target, protocol, train_fraction, report, fit,
                     stack_options) -> tuple[ProtocolSummary | ComparisonSummary, list[Evaluation]]:
    """One target's protocol runs, and its summary."""
    stack = make_stack(target, **stack_options)
    if test_frame is not None:
        runs = [evaluate_transfer(frame, test_frame, stack, report, fit)[0]]
    else:
        runs = []
        if protocol in ("seed", "both"):
            runs.append(evaluate_seed(frame, target=target, progress=report))
        if protocol in ("honest", "both"):
            runs.append(evaluate_honest(frame, stack, train_fraction, report, fit)[0])
    if protocol != "seed":  # the twin's lags and windows, in samples and seconds
        runs[-1].summary.timing = stack.time_span()
    if protocol == "both":
        seed, honest = runs
        return ComparisonSummary(seed=seed.summary, honest=honest.summary, audit=seed.audit,
                                 compares=compares(honest.summary)), runs
    return runs[0].summary, runs


def compares(honest: ProtocolSummary) -> str:
    """What `--protocol both` sets side by side, in a line."""
    return (f"seed protocol on the seed's pair ({' + '.join(SEED_SETS)}, RidgeCV meta-model) "
            f"against the honest protocol on {', '.join(honest.bases)} "
            f"({honest.meta.kind} meta-model)")


def _column_option(columns: dict[str, str] | None) -> dict[str, Any]:
    """`columns` as a keyword for each host's own call (`run_each` passes options on)."""
    return {"columns": columns} if columns else {}


def partial(progress: Progress, label: str) -> Progress:
    return lambda msg, frac: progress(f"{label}: {msg}", frac)


def train(
    data: Any,
    out: Path,
    target: str = "cpu_util_core_0",
    progress: Progress | None = None,
    *,
    per_host: bool = False,
    dask: str | None = None,
    jobs: int = 1,
    sign_key: str | bytes | None = None,
    columns: dict[str, str] | None = None,
    **stack_options: Any,
) -> TrainResult | PerHost:
    """Fit a twin on all of `data` and save it; metrics are the out-of-fold scores.

    per_host: one twin per host, each saved as `out/<host>.cputwin` (`train_hosts`).
    `stack_options` go to `make_stack`; `dask` fits on a cluster (`fitter`); `sign_key`
    signs the file (`save_twin`).
    """
    paths = resolve_paths(data)
    if per_host:
        return train_hosts(paths, out, target, progress, jobs=jobs, dask=dask,
                           sign_key=sign_key, **stack_options, **_column_option(columns))
    if jobs != 1:
        raise DataError("--jobs runs hosts side by side: it needs --per-host")
    out = check_file(out)  # before the fit, not after it
    with fitter(dask) as fit:
        return train_frame(load_runs(paths, columns), fingerprint(paths), out, target, progress, fit,
                           sign_key=sign_key, **stack_options)


# ------------------------------------------------------------------- one twin per host
def hosts_of(paths: list[Path]) -> dict[str, list[Path]]:
    """Files grouped by the host that recorded them (`host_of`), hosts in sorted order."""
    by_host: dict[str, list[Path]] = {}
    for path in paths:
        by_host.setdefault(host_of(path), []).append(path)
    return dict(sorted(by_host.items()))


def train_hosts(
    paths: list[Path],
    out: Path,
    target: str,
    progress: Progress | None = None,
    *,
    jobs: int = 1,
    dask: str | None = None,
    **stack_options: Any,
) -> PerHost:
    """One twin per host, saved as `out/<host>.cputwin`; hosts may differ in core count.

    Hosts train one after another, in `jobs` local processes, or as one task each on the
    Dask cluster at `dask`; each task reads its own host's files by path. A host that
    fails (unreadable files, too short to stack) is listed under "failed" with its
    reason and the others still train. Returns each host's `TrainResult` and each failed
    host's reason.
    """
    if stack_options.get("host_category"):
        raise DataError("--per-host and --host-category exclude each other: one twin per host, "
                        "or one twin over all hosts")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: --per-host writes one twin per host into a folder; this is a file")
    check_folder(out)
    calls = {host: ([str(p) for p in files], str(out / f"{file_safe(host)}.cputwin"), target,
                    stack_options) for host, files in hosts_of(paths).items()}
    return split_failures(run_each(_train_host, calls, jobs, dask, count_hosts(progress)))


def _train_host(paths: list[str], out: str, target: str, options: dict[str, Any],
                threads: int | None = None) -> TrainResult | PerHost:
    """One host's twin, wherever it runs (a local process, a Dask worker)."""
    return train(paths, Path(out), target, threads=threads, **options)


def evaluate_hosts(data: Any, target: str, progress: Progress | None = None, *,
                   protocol: str = "honest", train_fraction: float = 0.8,
                   report_dir: Path | None = None, jobs: int = 1, dask: str | None = None,
                   **stack_options: Any) -> PerHost:
    """`evaluate` for each host on its own (run as `train_hosts` runs hosts), with the
    fleet's distribution of the stack's R² (`fleet_scores`). A report, if asked, goes to
    `report_dir/<host>/`.
    """
    calls = {host: ([str(p) for p in files], protocol, target, train_fraction,
                    None if report_dir is None else str(Path(report_dir) / file_safe(host)),
                    stack_options) for host, files in hosts_of(resolve_paths(data)).items()}
    result = split_failures(run_each(_evaluate_host, calls, jobs, dask, count_hosts(progress)))
    result.fleet = fleet_scores(result.hosts, len(result.failed))
    return result


def _evaluate_host(paths: list[str], protocol: str, target: str, train_fraction: float,
                   report_dir: str | None, options: dict[str, Any],
                   threads: int | None = None) -> Summary | PerHost:
    return evaluate(paths, protocol, target, train_fraction,
                    None if report_dir is None else Path(report_dir), threads=threads,
                    **options)[0]


def count_hosts(progress: Progress | None) -> Callable[[str, int, int], None] | None:
    """Progress that counts hosts done."""
    if progress is None:
        return None
    return lambda host, n, total: progress(f"{n}/{total} hosts ({host})", n / total)


def split_failures(results: dict[str, Any]) -> PerHost:
    """Hosts whose task returned, and hosts whose task raised, with the reason in a line."""
    ok = {h: r for h, r in results.items() if not isinstance(r, BaseException)}
    failed = {h: str(r) if isinstance(r, CputwinError) else f"{type(r).__name__}: {r}"
              for h, r in results.items() if isinstance(r, BaseException)}
    return PerHost(hosts=ok, failed=failed)


def fleet_scores(summaries: dict[str, Summary], failed: int = 0,
                 n_worst: int = 3) -> FleetScores:
    """How the stack's R² spreads over hosts (each host's `headline()`: its target's, the
    mean over cores, or the honest protocol's): median, mean, range, the worst hosts."""
    per_host = {h: s.headline() for h, s in summaries.items()}
    r2 = {h: s.r2 for h, s in per_host.items() if not np.isnan(s.r2)}
    values = np.array(list(r2.values()))
    stats = (Spread(float(np.median(values)), float(values.mean()), float(values.min()),
                    float(values.max())) if values.size else Spread(*[float("nan")] * 4))
    worst = sorted(r2, key=r2.__getitem__)[:n_worst]
    return FleetScores(hosts=len(summaries), failed=failed, r2=stats,
                       worst=[HostR2(h, r2[h]) for h in worst], per_host=per_host)


def machine_options(frame: pl.DataFrame, options: dict[str, Any]) -> dict[str, Any]:
    """A machine twin's options: the default preset becomes the pooled detection one
    (`detect_wcpu` where the data measures the workload's own CPU use, else `detect`), and
    a sensor-mode machine twin is told what its alarms cannot see."""
    options = dict(options)
    if options.get("bases", "twin") == "twin":
        measured = WORKLOAD_CPU in frame.columns and frame[WORKLOAD_CPU].null_count() < frame.height
        options["bases"] = "detect_wcpu" if measured else "detect"
    if options.get("mode", "sensor") == "sensor":
        warnings.warn(DataWarning(
            "this twin of every core is in sensor mode: it reads the overall load, which "
            "holds each core's own, so its alarms cannot see extra load on a core; for "
            "anomaly detection train it in independent mode"), stacklevel=3)
    return options


def train_frame(
    frame: pl.DataFrame,
    data_fingerprint: str,
    out: Path,
    target: str,
    progress: Progress | None = None,
    fit: Fit = local_fit,
    sign_key: str | bytes | None = None,
    **stack_options: Any,
) -> TrainResult:
    """Fit, calibrate the detector, save (signed with `sign_key`, if given); the result
    names the out-of-fold scores."""
    if target == ALL_CORES:  # a named target is checked by the stack's fit
        stack_options = machine_options(frame, stack_options)
    stack = fit(make_stack(target, **stack_options), frame, progress)
    oof = out_of_fold_scores(stack, frame)
    training = {"fingerprint": data_fingerprint, "rows": frame.height,
                "runs": frame[RUN_COLUMN].n_unique()}
    if HOST in frame.columns:
        training["hosts"] = sorted(frame[HOST].unique().to_list())
    detector = calibrate(stack, frame)
    detectors = detector if isinstance(detector, dict) else {stack.target: detector}
    warn_blind_spots(detectors, stack.mode)
    save_twin(stack, out, training=training, metrics={"out_of_fold": oof.to_dict()},
              detector=None if stack.machine_ else detector.to_dict(),
              detectors={c: d.to_dict() for c, d in detectors.items()} if stack.machine_ else None,
              sign_key=sign_key)
    return TrainResult(twin=str(out), target=target, mode=stack.mode, rows=frame.height,
                       hosts=training.get("hosts"), out_of_fold=oof,
                       detector=detector_summary(detectors), timing=stack.time_span(),
                       meta=MetaSummary(kind=stack.meta_.kind, weights=stack.meta_weights_,
                                        intercept=stack.meta_intercept_))


def out_of_fold_scores(stack: TwinStack, frame: pl.DataFrame) -> OutOfFold:
    """Each base's and the stack's scores on the out-of-fold rows (a machine twin: per
    core, and the stack's mean over cores)."""
    rows = stack.oof_index_ % frame.height
    core = stack.oof_index_ // frame.height
    actual = np.column_stack([frame[c].to_numpy() for c in stack.targets_])[rows, core]
    oof = stack.oof_predictions_
    stacked = stack.meta_.predict(oof, frame[WORKLOAD].to_numpy()[rows])
    models = {**{s.name: scores(actual, oof[:, j]) for j, s in enumerate(stack.base_specs_)},
              "stack": scores(actual, stacked)}
    per_core = ({c: scores(actual[core == k], stacked[core == k])
                 for k, c in enumerate(stack.targets_)} if stack.machine_ else None)
    return OutOfFold(models=models, per_core=per_core)


def warn_blind_spots(detectors: dict[str, Detector], mode: str) -> None:
    """One plain line per core and workload where the detector is nearly blind."""
    for core, d in detectors.items():
        for workload, points in d.blind_spots().items():
            what = "all workloads" if workload == "*" else f"workload {workload}"
            need = ("more load than any core can take" if not np.isfinite(points)
                    else f"{points:.0f} points of extra load")
            warnings.warn(
                f"{core}: the anomaly detector needs {need} to alarm within "
                f"{d.power_window_s:.3g} s in {what} "
                f"({d.blind_reason(workload)}); record longer, on a quieter machine, or with "
                "the workload's own CPU use (cputwin collect records it; --bases detect_wcpu)"
                + ("; detection needs --mode independent" if mode == "sensor" else ""),
                DataWarning, stacklevel=2)


def detector_summary(detectors: dict[str, Detector]) -> dict[str, DetectorSummary]:
    """Per watched core: threshold, power per workload (the smallest sustained extra load
    that alarms within its window: 2 s at 10 Hz), and the workloads where it is blind."""
    return {core: DetectorSummary(threshold=d.threshold, window_s=round(d.power_window_s, 3),
                                  power=d.power, blind=d.blind_spots(),
                                  unexplained=d.calibration.get("unexplained_workloads", {}))
            for core, d in detectors.items()}


def predict(twin: Path, data: Any, out: Path, key: str | bytes | None = None,
            columns: dict[str, str] | None = None) -> PredictResult:
    """Predict every row of `data` with a saved twin and write a parquet of predictions.

    key: the signing key the twin must be signed with (`load_twin`); columns: a file's
    column names -> cputwin's (`load_runs`)."""
    out = check_file(out)
    stack, _ = load_twin(Path(twin), key)
    frame = load_runs(data, columns)
    if stack.machine_:
        return _predict_machine(stack, frame, out)
    bases, valid = stack.predict_bases(frame)
    pred = stack.combine(bases, frame[WORKLOAD].to_numpy())
    table = frame.select(RUN_COLUMN, TIMESTAMP, WORKLOAD, pl.col(stack.target).alias("actual"))
    table = table.with_columns(
        *[pl.Series(name, p) for name, p in bases.items()],
        pl.Series("twin", pred),
        pl.Series("residual", frame[stack.target].to_numpy() - pred),
    )
    write_atomic(out, table.write_parquet)
    return PredictResult(
        predictions=str(out), target=stack.target, mode=stack.mode, rows=frame.height,
        predicted=int(valid.sum()),
        scores={stack.target: scores(frame[stack.target].to_numpy()[valid], pred[valid])}
        if valid.sum() >= 2 else None)


def _predict_machine(stack: TwinStack, frame: pl.DataFrame, out: Path) -> PredictResult:
    """A machine twin's predictions: for every core K, `twin_<K>` and `residual_<K>`."""
    cores = stack.cores_of(frame)
    pred = stack.predict(frame)
    actual = frame.select(cores).to_numpy()
    table = frame.select(RUN_COLUMN, TIMESTAMP, WORKLOAD).with_columns(
        *[pl.Series(f"twin_{c}", pred[:, k]) for k, c in enumerate(cores)],
        *[pl.Series(f"residual_{c}", actual[:, k] - pred[:, k]) for k, c in enumerate(cores)])
    write_atomic(out, table.write_parquet)
    ok = ~np.isnan(pred).any(axis=1)
    return PredictResult(
        predictions=str(out), target=ALL_CORES, cores=cores, mode=stack.mode,
        rows=frame.height, predicted=int(ok.sum()),
        scores={c: scores(actual[ok, k], pred[ok, k]) for k, c in enumerate(cores)}
        if ok.sum() >= 2 else None)


def live_workload(stack: TwinStack, workload: str | None) -> str:
    """The workload live samples are labelled with: the one given, else UNLABELLED (with
    a warning when the twin never saw that label)."""
    label = workload or UNLABELLED
    if note := unseen_workloads([label], stack.workloads_):
        warnings.warn(note, DataWarning, stacklevel=2)
    return label


@dataclass
class DemoResult:
    summary: ProtocolSummary
    report: Path
    twin: Path
    data: Path


DEMO_TRAIN_FRACTION = 0.8
# Seconds of one fit per training row and core (the twin preset, the honest split):
# `cputwin demo --json` on the embedded sample, 2 cores: training_seconds 1.44 (median of 3)
# for 1440 rows, so 1.44 * min(2, 4) / 1440.
DEMO_SECONDS_PER_ROW_CORE = 0.002


def demo_estimate(rows: int | None = None, cores: int | None = None) -> dict[str, Any]:
    """How many rows `demo` will fit on (the embedded sample's, or `rows` recorded live)
    and about how many seconds that takes on `cores` cores: said before it starts."""
    import os

    if rows is None:
        rows = int(split_in_time(load_runs(sample_path()), DEMO_TRAIN_FRACTION).sum())
    else:
        rows = int(rows * DEMO_TRAIN_FRACTION)
    cores = cores or os.cpu_count() or 1
    return {"train_rows": rows, "cores": cores,
            "seconds": rows * DEMO_SECONDS_PER_ROW_CORE / min(cores, 4)}


def demo(
    out_dir: Path,
    data: Path | None = None,
    progress: Progress | None = None,
) -> DemoResult:
    """Evaluate honestly on `data` (the embedded sample by default) and save that same fit
    as the twin: one fit, and the report scores exactly the twin that is written (trained
    on each run's first 80%)."""
    out_dir = Path(out_dir)
    data = data if data is not None else sample_path()
    check_folder(out_dir)
    paths = resolve_paths(data)
    frame = load_runs(paths)
    target = "cpu_util_core_0"
    evaluation, stack = evaluate_honest(frame, make_stack(target), DEMO_TRAIN_FRACTION,
                                        progress)
    evaluation.summary.timing = stack.time_span()
    report = write_report(out_dir, [evaluation], f"cputwin demo: {target}", data=data)
    train = frame.filter(split_in_time(frame, DEMO_TRAIN_FRACTION))
    twin = out_dir / "twin.cputwin"
    train_frame(train, fingerprint(paths), twin, target, fit=lambda *_: stack)
    return DemoResult(evaluation.summary, report, twin, Path(data))
