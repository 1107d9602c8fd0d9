"""The jobs the CLI offers, as library functions: evaluate, train, predict, demo.

They return data and write files; they never print. Progress is reported through a
callback taking a short message.
"""

from __future__ import annotations

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
from cputwin.evaluation.protocols import Evaluation, evaluate_honest, evaluate_seed
from cputwin.evaluation.report import write_report
from cputwin.models import TwinStack
from cputwin.telemetry.ingest import load_runs, resolve_paths
from cputwin.telemetry.schema import RUN_COLUMN, TIMESTAMP, WORKLOAD

Progress = Callable[[str, float], None]
PROTOCOLS = ("honest", "seed", "both")


def sample_path() -> Path:
    """The embedded sample: real runs recorded with `cputwin collect --workload all`."""
    return Path(str(files("cputwin") / "data" / "sample"))


def evaluate(
    data: Any,
    protocol: str = "honest",
    target: str = "cpu_util_core_0",
    train_fraction: float = 0.8,
    report_dir: Path | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, Any], list[Evaluation]]:
    """Run one protocol (or both) and optionally write the HTML report.

    Returns the JSON summary (for `both`, {"seed": ..., "honest": ..., "audit": ...}).
    """
    if protocol not in PROTOCOLS:
        raise DataError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    frame = load_runs(data)
    from cputwin.telemetry.ingest import schema_of

    schema_of(frame).check_target(target)
    evaluations = []
    if protocol in ("seed", "both"):
        evaluations.append(evaluate_seed(frame, target=target, progress=progress))
    if protocol in ("honest", "both"):
        honest, _ = evaluate_honest(frame, target, train_fraction, progress=progress)
        evaluations.append(honest)
    if report_dir is not None:
        write_report(Path(report_dir), evaluations, f"cputwin evaluation: {target}")
    if protocol == "both":
        summary = {e.summary["protocol"]: e.summary for e in evaluations}
        summary["audit"] = evaluations[0].audit
        return summary, evaluations
    return evaluations[0].summary, evaluations


def train(
    data: Any,
    out: Path,
    target: str = "cpu_util_core_0",
    progress: Progress | None = None,
    stack: TwinStack | None = None,
) -> dict[str, Any]:
    """Fit a twin on all of `data` and save it; metrics are the out-of-fold scores."""
    paths = resolve_paths(data)
    frame = load_runs(paths)
    stack = stack if stack is not None else TwinStack()
    stack.set_params(target=target)
    stack.fit(frame, progress=progress)
    y = frame[target].to_numpy()[stack.oof_index_]
    oof = stack.oof_predictions_
    stacked = stack.meta_intercept_ + oof @ np.array(list(stack.meta_weights_.values()))
    metrics = {"out_of_fold": {
        **{s.name: scores(y, oof[:, j]) for j, s in enumerate(stack.specs_)},
        "stack": scores(y, stacked),
    }}
    training = {"fingerprint": fingerprint(paths), "rows": frame.height,
                "runs": frame[RUN_COLUMN].n_unique()}
    save_twin(stack, Path(out), training=training, metrics=metrics)
    return {"twin": str(out), "target": target, "rows": frame.height, **metrics,
            "meta": {"weights": stack.meta_weights_, "intercept": stack.meta_intercept_}}


def predict(twin: Path, data: Any, out: Path) -> dict[str, Any]:
    """Predict every row of `data` with a saved twin and write a parquet of predictions."""
    stack, _ = load_twin(Path(twin))
    frame = load_runs(data)
    bases, valid = stack.predict_bases(frame)
    pred = stack.combine(bases)
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
    result = {"predictions": str(out), "rows": frame.height, "predicted": int(ok.sum())}
    if ok.sum() >= 2:
        result["scores"] = scores(frame[stack.target].to_numpy()[ok], pred[ok])
    return result


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
