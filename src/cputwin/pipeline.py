"""The jobs the CLI offers, as library functions: evaluate, train, predict, demo.

They return data and write files; they never print. Progress is reported through a
callback taking a short message.
"""

from __future__ import annotations

import re
from collections.abc import Callable
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
    evaluate_honest,
    evaluate_seed,
    evaluate_transfer,
)
from cputwin.evaluation.report import write_report
from cputwin.live.detector import Detector, calibrate
from cputwin.models import TwinStack
from cputwin.telemetry.ingest import load_hosts, load_runs, resolve_paths, schema_of
from cputwin.telemetry.schema import HOST, RUN_COLUMN, TIMESTAMP, WORKLOAD

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
) -> TwinStack:
    """A stack as the CLI builds it: the seed's pair keeps the seed's RidgeCV meta-model,
    any other set of bases lets the out-of-fold score choose (`auto`)."""
    if meta is None:
        meta = "ridge" if bases == "seed" else "auto"
    return TwinStack(bases=bases, target=target, mode=mode, meta_model=meta,
                     host_category=host_category)


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
    bases: str | list[str] = "twin",
    mode: str = "sensor",
    meta: str | None = None,
    test_data: Any = None,
    host_category: bool = False,
) -> tuple[dict[str, Any], list[Evaluation]]:
    """Run a protocol for one target or every core, optionally writing the HTML report.

    With `test_data`, the twin trains on all of `data` and is scored on all of
    `test_data` (another machine): protocol "transfer".
    Returns the JSON summary: one target's object; for `both`, {"seed", "honest",
    "audit"}; for target `all`, {"targets": {...}, "mean": {"r2", "mae", "rmse"}}.
    """
    if protocol not in PROTOCOLS:
        raise DataError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    frame = load_runs(data)
    test_frame = load_runs(test_data) if test_data is not None else None
    targets = targets_of(frame, target)
    if protocol != "honest" and (len(targets) > 1 or test_frame is not None):
        raise DataError("--target all and --test use the honest protocol; drop --protocol")
    summaries, evaluations = {}, []
    for t in targets:
        stack = make_stack(t, bases, mode, meta, host_category)
        report = partial(progress, t) if progress and len(targets) > 1 else progress
        if test_frame is not None:
            ev, _ = evaluate_transfer(frame, test_frame, stack, report)
            runs = [ev]
        else:
            runs = []
            if protocol in ("seed", "both"):
                runs.append(evaluate_seed(frame, target=t, progress=report))
            if protocol in ("honest", "both"):
                runs.append(evaluate_honest(frame, stack, train_fraction, report)[0])
        evaluations += runs
        summaries[t] = (
            {**{e.summary["protocol"]: e.summary for e in runs}, "audit": runs[0].audit}
            if protocol == "both" else runs[0].summary
        )
    if report_dir is not None:
        write_report(Path(report_dir), evaluations, f"cputwin evaluation: {target}")
    if len(targets) == 1:
        return summaries[targets[0]], evaluations
    mean = {m: float(np.mean([s[m]["stack"] for s in summaries.values()]))
            for m in ("r2", "mae", "rmse")}
    return {"targets": summaries, "mean": mean}, evaluations


def partial(progress: Progress, label: str) -> Progress:
    return lambda msg, frac: progress(f"{label}: {msg}", frac)


def train(
    data: Any,
    out: Path,
    target: str = "cpu_util_core_0",
    progress: Progress | None = None,
    *,
    bases: str | list[str] = "twin",
    mode: str = "sensor",
    meta: str | None = None,
    per_host: bool = False,
    host_category: bool = False,
) -> dict[str, Any]:
    """Fit a twin on all of `data` and save it; metrics are the out-of-fold scores.

    per_host: one twin per host (`load_hosts`), each saved as `out/<host>.cputwin`;
    hosts may differ in core count. Returns {"hosts": {host: that twin's result}}.
    """
    paths = resolve_paths(data)
    if per_host and host_category:
        raise DataError("--per-host and --host-category exclude each other: one twin per host, "
                        "or one twin over all hosts")
    if not per_host:
        return train_frame(load_runs(paths), fingerprint(paths), Path(out), target, progress,
                           bases=bases, mode=mode, meta=meta, host_category=host_category)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: --per-host writes one twin per host into a folder; this is a file")
    out.mkdir(parents=True, exist_ok=True)
    hosts = load_hosts(paths)
    results = {}
    for host, frame in hosts.items():
        report = partial(progress, host) if progress else None
        results[host] = train_frame(frame, fingerprint(paths), out / f"{file_safe(host)}.cputwin",
                                    target, report, bases=bases, mode=mode, meta=meta)
    return {"hosts": results}


def file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


def train_frame(
    frame: pl.DataFrame,
    data_fingerprint: str,
    out: Path,
    target: str,
    progress: Progress | None = None,
    *,
    bases: str | list[str] = "twin",
    mode: str = "sensor",
    meta: str | None = None,
    host_category: bool = False,
) -> dict[str, Any]:
    """Fit, calibrate the detector, save; the result names the out-of-fold scores."""
    schema_of(frame).check_target(target)
    stack = make_stack(target, bases, mode, meta, host_category).fit(frame, progress=progress)
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
    return {"twin": str(out), "target": target, "mode": mode, "rows": frame.height,
            **({"hosts": training["hosts"]} if "hosts" in training else {}), **metrics,
            "meta": {"kind": stack.meta_.kind, "weights": stack.meta_weights_,
                     "intercept": stack.meta_intercept_}}


def predict(twin: Path, data: Any, out: Path) -> dict[str, Any]:
    """Predict every row of `data` with a saved twin and write a parquet of predictions."""
    stack, _ = load_twin(Path(twin))
    frame = load_runs(data)
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
