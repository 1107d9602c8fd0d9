"""Evaluation protocols.

honest: features per run; each run's first `train_fraction` trains, the rest tests;
        the meta-model sees only out-of-fold predictions (`TwinStack`).
seed:   the seed notebook's exact procedure, flaws included, so its table can be
        reproduced and its flaws measured (docs/seed-notebook.md): all runs concatenated and
        sorted by time, bases trained on their own random split with early stopping on
        the rows they are scored on, the two frames "aligned" by position, the
        meta-model fitted on in-sample predictions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import train_test_split

from cputwin.errors import DataError
from cputwin.evaluation.metrics import score_table, verdict
from cputwin.evaluation.summary import MetaSummary, ProtocolSummary, Rows
from cputwin.features import build_features, get_spec
from cputwin.models import TwinStack
from cputwin.models.base import fit_lgbm, params_for
from cputwin.models.stack import SharedFits
from cputwin.telemetry.ingest import schema_of
from cputwin.telemetry.schema import HOST, RUN_COLUMN, TIMESTAMP, WORKLOAD

SEED_SETS = ("v2.0", "v2.3")
Fit = Callable[..., TwinStack]  # (stack, training frame, progress) -> the fitted stack
SEED_SPLIT = dict(test_size=0.2, random_state=42)


@dataclass
class Evaluation:
    """A protocol's result: its summary, per-row predictions for plots, and (the seed
    protocol) its measured leaks."""

    summary: ProtocolSummary
    predictions: pl.DataFrame
    audit: dict[str, Any] = field(default_factory=dict)


def split_in_time(frame: pl.DataFrame, train_fraction: float) -> pl.Series:
    """True for the first `train_fraction` of each run's rows."""
    if not 0 < train_fraction < 1:
        raise DataError(f"train fraction must be between 0 and 1, got {train_fraction}")
    pos = pl.int_range(pl.len()).over(RUN_COLUMN)
    cut = (pl.len().over(RUN_COLUMN) * train_fraction).floor()
    return frame.select((pos < cut).alias("train"))["train"]


def local_fit(stack: TwinStack, frame: pl.DataFrame, progress=None,
              shared: SharedFits | None = None) -> TwinStack:
    return stack.fit(frame, progress=progress, shared=shared)


def evaluate_honest(
    frame: pl.DataFrame,
    stack: TwinStack,
    train_fraction: float = 0.8,
    progress: Callable[[str, float], None] | None = None,
    fit: Fit = local_fit,
) -> tuple[Evaluation, TwinStack]:
    """Train on each run's past, score on its future. `fit` fits the stack (here, or on a
    Dask cluster: `cputwin.models.cluster`)."""
    is_train = split_in_time(frame, train_fraction).to_numpy()
    train = frame.filter(pl.Series(is_train))
    started = time.perf_counter()
    fit(stack, train, progress)
    seconds = time.perf_counter() - started
    evaluation = score_stack(stack, frame, ~is_train, train, "honest")
    evaluation.summary.train_fraction = train_fraction
    evaluation.summary.training_seconds = round(seconds, 2)
    return evaluation, stack


def evaluate_transfer(
    train: pl.DataFrame,
    test: pl.DataFrame,
    stack: TwinStack,
    progress: Callable[[str, float], None] | None = None,
    fit: Fit = local_fit,
) -> tuple[Evaluation, TwinStack]:
    """Train on all of one dataset (one machine), score on all of another."""
    started = time.perf_counter()
    fit(stack, train, progress)
    seconds = time.perf_counter() - started
    evaluation = score_stack(stack, test, np.ones(test.height, bool), train, "transfer")
    evaluation.summary.training_seconds = round(seconds, 2)
    evaluation.summary.machines = {"train_cores": stack.schema_.n_cores,
                                   "test_cores": schema_of(test).n_cores}
    return evaluation, stack


def score_stack(stack: TwinStack, frame: pl.DataFrame, candidate: np.ndarray,
                train: pl.DataFrame, protocol: str) -> Evaluation:
    """Score every base, their average, the stack and a per-workload-mean baseline on the
    `candidate` rows of `frame` that have full history."""
    target = stack.target
    bases, valid = stack.predict_bases(frame)
    test = candidate & valid
    if test.sum() < 2:
        raise DataError("too few test rows: give longer runs or a smaller --train-fraction")
    y = frame[target].to_numpy()
    wl = frame[WORKLOAD].to_numpy()
    preds = {name: p[test] for name, p in bases.items()}
    preds["average"] = np.mean(np.column_stack(list(preds.values())), axis=1)
    preds["stack"] = stack.combine({n: bases[n][test] for n in bases}, wl[test])
    preds["workload_mean"] = workload_mean_baseline(
        train[target].to_numpy(), train[WORKLOAD].to_numpy(), wl[test])
    table = score_table({n: y[test] for n in preds}, preds, {n: wl[test] for n in preds})
    per_host = None
    if HOST in frame.columns:
        hosts = frame[HOST].to_numpy()[test]
        per_host = score_table({n: y[test] for n in preds}, preds,
                               {n: hosts for n in preds}).per_workload
    meta = MetaSummary(kind=stack.meta_.kind, weights=stack.meta_weights_,
                       intercept=stack.meta_intercept_)
    if len(stack.meta_.weights) > 1:
        meta.per_workload = {g: dict(zip(stack.meta_.names, map(float, w), strict=True))
                             for g, w in stack.meta_.weights.items() if g != "*"}
    if stack.meta_scores_:
        meta.out_of_fold_sse = stack.meta_scores_
    summary = ProtocolSummary(
        protocol=protocol, target=target, mode=stack.mode,
        bases=[b.name for b in stack.base_specs_],
        rows=Rows(train=stack.n_train_rows_, test=int(test.sum())),
        **vars(table), per_host=per_host, meta=meta, verdict=verdict(table.r2["stack"]))
    rows = frame.filter(pl.Series(test)).select(RUN_COLUMN, TIMESTAMP, WORKLOAD)
    predictions = rows.with_columns(
        pl.Series("actual", y[test]), *[pl.Series(n, p) for n, p in preds.items()]
    )
    return Evaluation(summary=summary, predictions=predictions)


def workload_mean_baseline(y_train: np.ndarray, wl_train: np.ndarray, wl_test: np.ndarray) -> np.ndarray:
    """Predict each row as its workload's mean in training (the overall mean if unseen)."""
    means = {w: y_train[wl_train == w].mean() for w in np.unique(wl_train)}
    fallback = y_train.mean()
    return np.array([means.get(w, fallback) for w in wl_test])


def evaluate_seed(
    frame: pl.DataFrame,
    target: str = "cpu_util_core_0",
    progress: Callable[[str, float], None] | None = None,
) -> Evaluation:
    """Reproduce the seed notebook exactly, and measure what it leaks."""
    progress = progress or (lambda _msg, _frac: None)
    merged = frame.sort(TIMESTAMP, maintain_order=True)
    run_of_row = merged[RUN_COLUMN].to_numpy()
    one = merged.with_columns(pl.lit("all").alias(RUN_COLUMN))
    workloads = sorted(frame[WORKLOAD].unique().to_list())
    y_all = one[target].to_numpy()
    wl_all = one[WORKLOAD].to_numpy()
    frames, models, own = {}, {}, {}
    for name in SEED_SETS:
        mat = build_features(one, get_spec(name), target, workloads)
        rows = np.flatnonzero(mat.valid)  # the seed's dropna + reset_index
        frames[name] = (mat, rows)
        idx_tr, idx_te = train_test_split(np.arange(rows.size), **SEED_SPLIT)
        progress(f"training {name} as the seed did", SEED_SETS.index(name) / len(SEED_SETS))
        X, y = mat.X[rows], y_all[rows]
        model = fit_lgbm(params_for(name), X[idx_tr], y[idx_tr], mat.names,
                         eval_set=(X[idx_te], y[idx_te]))
        models[name] = model
        own[name] = {"pred": model.booster_.predict(X[idx_te]), "rows": rows[idx_te],
                     "train_rows": rows[idx_tr]}

    # positional "alignment": row i of each frame, whatever time it came from
    n = min(r.size for _, r in frames.values())
    aligned = {name: frames[name][1][:n] for name in SEED_SETS}
    y_aligned = y_all[aligned["v2.0"]]
    pos_tr, pos_te = train_test_split(np.arange(n), **SEED_SPLIT)

    def base_predictions(positions: np.ndarray) -> np.ndarray:
        return np.column_stack([
            models[s].booster_.predict(frames[s][0].X[aligned[s][positions]]) for s in SEED_SETS
        ])

    meta_X_tr, meta_X_te = base_predictions(pos_tr), base_predictions(pos_te)
    meta = RidgeCV().fit(meta_X_tr, y_aligned[pos_tr])
    stack_pred = meta.predict(meta_X_te)
    stack_rows = aligned["v2.0"][pos_te]
    train_rows_v20 = aligned["v2.0"][pos_tr]

    y = {s: y_all[own[s]["rows"]] for s in SEED_SETS}
    preds = {s: own[s]["pred"] for s in SEED_SETS}
    wl = {s: wl_all[own[s]["rows"]] for s in SEED_SETS}
    preds["average"] = meta_X_te.mean(axis=1)
    preds["stack"] = stack_pred
    preds["workload_mean"] = workload_mean_baseline(
        y_aligned[pos_tr], wl_all[train_rows_v20], wl_all[stack_rows])
    for extra in ("average", "stack", "workload_mean"):
        y[extra], wl[extra] = y_all[stack_rows], wl_all[stack_rows]
    table = score_table(y, preds, wl)
    summary = ProtocolSummary(
        protocol="seed", target=target, mode="sensor", bases=list(SEED_SETS),
        rows=Rows(train=int(pos_tr.size), test=int(pos_te.size)),
        **vars(table),
        meta=MetaSummary(kind="ridge",
                         weights=dict(zip(SEED_SETS, map(float, meta.coef_), strict=True)),
                         intercept=float(meta.intercept_)),
        verdict=verdict(table.r2["stack"]),
        notes="v2.0 and v2.3 are scored on their own random test splits, as published; "
              "average, stack and workload_mean on the stack's split of the aligned rows.",
    )
    audit = seed_audit(merged, run_of_row, frames, own, aligned, pos_tr, pos_te, meta_X_te,
                       y_all, target)
    predictions = pl.DataFrame({
        RUN_COLUMN: run_of_row[stack_rows], TIMESTAMP: merged[TIMESTAMP].to_numpy()[stack_rows],
        WORKLOAD: wl_all[stack_rows], "actual": y_all[stack_rows],
        "stack": stack_pred, "average": preds["average"], "workload_mean": preds["workload_mean"],
    })
    return Evaluation(summary=summary, predictions=predictions, audit=audit)


def seed_audit(merged, run_of_row, frames, own, aligned, pos_tr, pos_te, meta_X_te, y_all, target):
    """Measure each flaw docs/seed-notebook.md names, on this data."""
    from sklearn.metrics import r2_score

    ts = merged[TIMESTAMP].to_numpy()
    stack_test = aligned["v2.0"][pos_te]
    audit: dict[str, Any] = {}
    for s in SEED_SETS:
        seen = np.isin(aligned[s][pos_te], own[s]["train_rows"])
        audit[f"stack_test_rows_seen_by_{s}"] = float(seen.mean())
    offset = aligned["v2.3"] - aligned["v2.0"]
    audit["alignment_offset_samples_median"] = float(np.median(offset))
    audit["aligned_pairs_sharing_timestamp"] = int((ts[aligned["v2.0"]] == ts[aligned["v2.3"]]).sum())
    audit["aligned_pairs"] = int(offset.size)
    train_set = np.zeros(ts.size, bool)
    train_set[own["v2.0"]["train_rows"]] = True
    neighbour = np.zeros(stack_test.size, bool)
    for d in (-1, 1):
        j = np.clip(stack_test + d, 0, ts.size - 1)
        neighbour |= train_set[j] & (run_of_row[j] == run_of_row[stack_test])
    audit["test_rows_with_a_training_neighbour_100ms_away"] = float(neighbour.mean())
    history = max(get_spec(s).history for s in SEED_SETS)
    crossing = np.array([
        i >= 1 and run_of_row[max(0, i - history)] != run_of_row[i] for i in range(ts.size)
    ])
    audit["rows_whose_history_crosses_a_run"] = int(crossing.sum())
    audit["meta_trained_on_in_sample_predictions"] = True
    audit["v2.3_r2_on_stack_split_after_misalignment"] = float(
        r2_score(y_all[stack_test], meta_X_te[:, 1]))
    audit["v2.0_r2_on_stack_split"] = float(r2_score(y_all[stack_test], meta_X_te[:, 0]))
    return audit
