"""The jobs the CLI offers, as library functions: evaluate, train, predict, demo.

They return data and write files; they never print. Progress is reported through a
callback taking a short message.
"""

from __future__ import annotations

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
from cputwin.errors import DataError
from cputwin.evaluation.metrics import scores
from cputwin.evaluation.protocols import (
    Evaluation,
    Fit,
    evaluate_honest,
    evaluate_seed,
    evaluate_transfer,
    local_fit,
)
from cputwin.evaluation.report import write_report
from cputwin.features.engine import unseen_workloads
from cputwin.live.detector import Detector, calibrate
from cputwin.models import TwinStack
from cputwin.models.base import params_for, resolve_bases
from cputwin.telemetry.collector import file_safe
from cputwin.telemetry.ingest import DataWarning, load_hosts, load_runs, resolve_paths, schema_of
from cputwin.telemetry.schema import HOST, RUN_COLUMN, TIMESTAMP, UNLABELLED, WORKLOAD

Progress = Callable[[str, float], None]
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
) -> TwinStack:
    """A stack as the CLI builds it: the seed's pair keeps the seed's RidgeCV meta-model,
    any other set of bases lets the out-of-fold score choose (`auto`).

    max_rounds caps every LightGBM base's boosting rounds (early stopping may stop
    sooner); float32 halves the feature matrices (both for millions of rows).
    """
    if meta is None:
        meta = "ridge" if bases == "seed" else "auto"
    base_params = None
    if max_rounds is not None:
        if max_rounds < 1:
            raise DataError(f"max rounds must be at least 1, got {max_rounds}")
        base_params = {b.name: {"n_estimators": min(max_rounds, params_for(b.name, b.params)
                                                    ["n_estimators"])}
                       for b in resolve_bases(bases) if b.learner == "lgbm"}
    return TwinStack(bases=bases, target=target, mode=mode, meta_model=meta,
                     host_category=host_category, base_params=base_params,
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
    columns: dict[str, str] | None = None,
    **stack_options: Any,
) -> tuple[dict[str, Any], list[Evaluation]]:
    """Run a protocol for one target or every core, optionally writing the HTML report.

    With `test_data`, the twin trains on all of `data` and is scored on all of
    `test_data` (another machine): protocol "transfer". `stack_options` go to
    `make_stack` (bases, mode, meta, host_category, max_rounds, float32); `dask` fits
    on a cluster (`fitter`).
    Returns the JSON summary: one target's object; for `both`, {"seed", "honest",
    "audit"}; for target `all`, {"targets": {...}, "mean": {"r2", "mae", "rmse"}}.
    """
    if protocol not in PROTOCOLS:
        raise DataError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    frame = load_runs(data, columns)
    test_frame = load_runs(test_data, columns) if test_data is not None else None
    targets = targets_of(frame, target)
    if protocol != "honest" and (len(targets) > 1 or test_frame is not None):
        raise DataError("--target all and --test use the honest protocol; drop --protocol")
    summaries, evaluations = {}, []
    with fitter(dask) as fit:
        for t in targets:
            report = partial(progress, t) if progress and len(targets) > 1 else progress
            one, runs = _evaluate_target(frame, test_frame, t, protocol, train_fraction, report,
                                         fit, stack_options)
            evaluations += runs
            summaries[t] = one
    if report_dir is not None:
        write_report(Path(report_dir), evaluations, f"cputwin evaluation: {target}")
    if len(targets) == 1:
        return summaries[targets[0]], evaluations
    mean = {m: float(np.mean([s[m]["stack"] for s in summaries.values()]))
            for m in ("r2", "mae", "rmse")}
    return {"targets": summaries, "mean": mean}, evaluations


def _evaluate_target(frame, test_frame, target, protocol, train_fraction, report, fit,
                     stack_options) -> tuple[dict[str, Any], list[Evaluation]]:
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
        runs[-1].summary["timing"] = stack.time_span()
    summary = ({**{e.summary["protocol"]: e.summary for e in runs}, "audit": runs[0].audit}
               if protocol == "both" else runs[0].summary)
    return summary, runs


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
    columns: dict[str, str] | None = None,
    **stack_options: Any,
) -> dict[str, Any]:
    """Fit a twin on all of `data` and save it; metrics are the out-of-fold scores.

    per_host: one twin per host (`load_hosts`), each saved as `out/<host>.cputwin`;
    hosts may differ in core count. Returns {"hosts": {host: that twin's result}}.
    `stack_options` go to `make_stack`; `dask` fits on a cluster (`fitter`).
    """
    paths = resolve_paths(data)
    if per_host and stack_options.get("host_category"):
        raise DataError("--per-host and --host-category exclude each other: one twin per host, "
                        "or one twin over all hosts")
    out = Path(out)
    if per_host and out.exists() and not out.is_dir():
        raise DataError(f"{out}: --per-host writes one twin per host into a folder; this is a file")
    frames = load_hosts(paths, columns) if per_host else {None: load_runs(paths, columns)}
    results = {}
    with fitter(dask) as fit:
        for host, frame in frames.items():
            report = partial(progress, host) if progress and host else progress
            path = out / f"{file_safe(host)}.cputwin" if host else out
            path.parent.mkdir(parents=True, exist_ok=True)
            results[host] = train_frame(frame, fingerprint(paths), path, target, report, fit,
                                        **stack_options)
    return {"hosts": results} if per_host else results[None]


def train_frame(
    frame: pl.DataFrame,
    data_fingerprint: str,
    out: Path,
    target: str,
    progress: Progress | None = None,
    fit: Fit = local_fit,
    **stack_options: Any,
) -> dict[str, Any]:
    """Fit, calibrate the detector, save; the result names the out-of-fold scores."""
    schema_of(frame).check_target(target)
    stack = fit(make_stack(target, **stack_options), frame, progress)
    y = frame[target].to_numpy()[stack.oof_index_]
    oof = stack.oof_predictions_
    stacked = stack.meta_.predict(oof, frame[WORKLOAD].to_numpy()[stack.oof_index_])
    metrics = {"out_of_fold": {
        **{s.name: scores(y, oof[:, j]) for j, s in enumerate(stack.base_specs_)},
        "stack": scores(y, stacked),
    }}
    training = {"fingerprint": data_fingerprint, "rows": frame.height,
                "runs": frame[RUN_COLUMN].n_unique()}
    if HOST in frame.columns:
        training["hosts"] = sorted(frame[HOST].unique().to_list())
    detector = calibrate(stack, frame)
    save_twin(stack, out, training=training, metrics=metrics, detector=detector.to_dict())
    return {"twin": str(out), "target": target, "mode": stack.mode, "rows": frame.height,
            **({"hosts": training["hosts"]} if "hosts" in training else {}), **metrics,
            "timing": stack.time_span(),
            "meta": {"kind": stack.meta_.kind, "weights": stack.meta_weights_,
                     "intercept": stack.meta_intercept_}}


def predict(twin: Path, data: Any, out: Path, columns: dict[str, str] | None = None
            ) -> dict[str, Any]:
    """Predict every row of `data` with a saved twin and write a parquet of predictions."""
    stack, _ = load_twin(Path(twin))
    frame = load_runs(data, columns)
    bases, valid = stack.predict_bases(frame)
    pred = stack.combine(bases, frame[WORKLOAD].to_numpy())
    table = frame.select(RUN_COLUMN, TIMESTAMP, WORKLOAD, pl.col(stack.target).alias("actual"))
    table = table.with_columns(
        *[pl.Series(name, p) for name, p in bases.items()],
        pl.Series("twin", pred),
        pl.Series("residual", frame[stack.target].to_numpy() - pred),
    )
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    table.write_parquet(tmp)
    tmp.replace(out)
    ok = valid
    result = {"predictions": str(out), "target": stack.target, "mode": stack.mode,
              "rows": frame.height, "predicted": int(ok.sum())}
    if ok.sum() >= 2:
        result["scores"] = scores(frame[stack.target].to_numpy()[ok], pred[ok])
    return result


def live_workload(stack: TwinStack, workload: str | None) -> str:
    """The workload live samples are labelled with: the one given, else UNLABELLED (with
    a warning when the twin never saw that label)."""
    label = workload or UNLABELLED
    if note := unseen_workloads([label], stack.workloads_):
        warnings.warn(note, DataWarning, stacklevel=2)
    return label


def open_twin(path: Path) -> tuple[TwinStack, Detector | None, dict[str, Any]]:
    """A saved twin: its stack, its anomaly detector (if calibrated), its payload."""
    stack, payload = load_twin(Path(path))
    detector = Detector.from_dict(payload["detector"]) if payload.get("detector") else None
    return stack, detector, payload


@dataclass
class DemoResult:
    summary: dict[str, Any]
    report: Path
    twin: Path
    data: Path


def demo(
    out_dir: Path,
    data: Path | None = None,
    progress: Progress | None = None,
) -> DemoResult:
    """Evaluate honestly on `data` (the embedded sample by default), write report and twin."""
    out_dir = Path(out_dir)
    data = data if data is not None else sample_path()
    summary, _ = evaluate(data, "honest", report_dir=out_dir, progress=progress)
    twin = out_dir / "twin.cputwin"
    train(data, twin, progress=progress)
    return DemoResult(summary, out_dir / "report.html", twin, Path(data))
