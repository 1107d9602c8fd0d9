"""A self-contained HTML report (PNG plots inlined as base64) for one or two protocols."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from cputwin.evaluation.protocols import SEED_SETS, Evaluation  # noqa: E402
from cputwin.output import write_atomic  # noqa: E402
from cputwin.telemetry.schema import RUN_COLUMN, TIMESTAMP, WORKLOAD  # noqa: E402


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plot_over_time(pred: pl.DataFrame, title: str) -> str:
    runs = pred[RUN_COLUMN].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 2.0 * len(runs)), squeeze=False,
                             layout="constrained")
    for ax, run in zip(axes[:, 0], runs, strict=True):
        part = pred.filter(pl.col(RUN_COLUMN) == run).sort(TIMESTAMP)
        t = part[TIMESTAMP].to_numpy() - part[TIMESTAMP][0]
        ax.plot(t, part["actual"].to_numpy(), lw=0.8, label="actual", color="black")
        ax.plot(t, part["stack"].to_numpy(), lw=0.8, label="twin (stack)", color="tab:orange")
        ax.set_title(f"{run} ({part[WORKLOAD][0]})", fontsize=9)
        ax.set_ylabel("%")
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("seconds into the test period")
    fig.suptitle(title)
    return _png(fig)


def plot_scatter(pred: pl.DataFrame, title: str) -> str:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(pred["actual"], pred["stack"], s=3, alpha=0.4)
    ax.plot([0, 100], [0, 100], color="grey", lw=0.8)
    ax.set_xlabel("actual %")
    ax.set_ylabel("twin %")
    ax.set_title(title)
    return _png(fig)


def plot_residuals(pred: pl.DataFrame, title: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist((pred["actual"] - pred["stack"]).to_numpy(), bins=60, color="tab:blue")
    ax.set_xlabel("residual: actual − twin (percentage points)")
    ax.set_title(title)
    return _png(fig)


def plot_r2_per_workload(summary: dict, title: str) -> str:
    wls = list(summary["per_workload"])
    models = list(summary["r2"])
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        vals = [max(summary["per_workload"][w]["r2"].get(m, np.nan), -1.0) for w in wls]
        ax.bar(np.arange(len(wls)) + i * width, vals, width, label=m)
    ax.set_xticks(np.arange(len(wls)) + 0.4 - width / 2, wls, rotation=20, fontsize=8)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_ylabel("R² (clipped at −1)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _png(fig)


def metrics_table(summary: dict) -> str:
    rows = "".join(
        f"<tr><td>{m}</td><td>{summary['r2'][m]:.4f}</td><td>{summary['mae'][m]:.3f}</td>"
        f"<td>{summary['rmse'][m]:.3f}</td></tr>"
        for m in summary["r2"]
    )
    w = summary["meta"]["weights"]
    weights = ", ".join(f"{k} {v:.4f}" for k, v in w.items())
    return (
        f"<p>protocol <b>{summary['protocol']}</b>, target <code>{summary['target']}</code>, "
        f"mode <b>{summary.get('mode', 'sensor')}</b>, meta-model {summary['meta'].get('kind', 'ridge')}, "
        f"rows train {summary['rows']['train']}, test {summary['rows']['test']}</p>"
        "<table><tr><th>model</th><th>R²</th><th>MAE</th><th>RMSE</th></tr>"
        f"{rows}</table><p>meta weights: {weights}; intercept "
        f"{summary['meta']['intercept']:.4f}</p><p><b>{html.escape(summary['verdict'])}</b></p>"
    )


def section(ev: Evaluation) -> str:
    s = ev.summary
    name = f"{s['protocol']} · {s['target']}"
    imgs = [
        plot_over_time(ev.predictions, f"{name}: actual and twin over each run's test rows"),
        plot_scatter(ev.predictions, f"{name}: twin vs actual"),
        plot_residuals(ev.predictions, f"{name}: residual distribution"),
        plot_r2_per_workload(s, f"{name}: R² per workload"),
    ]
    tags = "".join(f'<img alt="plot" src="data:image/png;base64,{b}">' for b in imgs)
    return f"<section><h2>{html.escape(name)}</h2>{metrics_table(s)}{tags}</section>"


def explain_difference(seed: Evaluation, honest: Evaluation) -> str:
    """Plain words, with this data's own measurements, for why the two protocols differ."""
    a = seed.audit
    s, h = seed.summary["r2"], honest.summary["r2"]
    items = [
        f"The random split puts {a['test_rows_with_a_training_neighbour_100ms_away']:.0%} of the "
        "stack's test rows right next (100 ms away, same run) to a row the V2.0 model trained on; "
        "CPU load changes little in 100 ms, so the test is close to a memory test.",
        f"{a['stack_test_rows_seen_by_v2.0']:.0%} of the rows the stack is scored on were "
        "training rows of the V2.0 base model itself (its own split was drawn on a "
        "different number of rows).",
        f"The two feature frames are 'aligned' by position: row i of V2.0 and row i of V2.3 are "
        f"a median of {a['alignment_offset_samples_median']:.0f} samples apart; "
        f"{a['aligned_pairs_sharing_timestamp']} of {a['aligned_pairs']} pairs share a timestamp. "
        f"Scored against V2.0's targets, V2.3's predictions give R² "
        f"{a['v2.3_r2_on_stack_split_after_misalignment']:.4f}, which is why the meta-model "
        "gives it almost no weight.",
        "The meta-model was fitted on the bases' in-sample predictions, so it learns to trust "
        "the base that memorised the most.",
        f"After concatenating and sorting, {a['rows_whose_history_crosses_a_run']} rows have lags "
        "that reach into a different run.",
        honest_comparison(s, h, honest.summary.get("bases", [])),
    ]
    lis = "".join(f"<li>{html.escape(i)}</li>" for i in items)
    return f"<section><h2>Why the seed's number does not hold</h2><ul>{lis}</ul></section>"


def honest_comparison(seed: dict, honest: dict, bases: list[str]) -> str:
    """The honest protocol's scores beside the seed's: of the same pair when the honest
    side trained it, else of the bases it did train (named, so nothing is implied)."""
    seed_scores = f"the seed's {seed['v2.0']:.4f} / {seed['v2.3']:.4f} / {seed['stack']:.4f}"
    how = "Scored honestly (each run's past trains, its future tests, out-of-fold stacking)"
    if all(b in honest for b in SEED_SETS):
        return (f"{how} the same feature sets give V2.0 {honest['v2.0']:.4f}, V2.3 "
                f"{honest['v2.3']:.4f}, stack {honest['stack']:.4f}, against {seed_scores} "
                "(V2.0 / V2.3 / stack).")
    return (f"{how} the twin's own bases ({', '.join(bases)}) give a stack R² of "
            f"{honest['stack']:.4f}, against {seed_scores} for the seed's pair "
            "(V2.0 / V2.3 / stack) under the seed's protocol; --bases seed scores that "
            "same pair honestly.")


def write_report(out_dir: Path, evaluations: list[Evaluation], title: str) -> Path:
    """Write `report.html` into `out_dir` and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_name = {e.summary["protocol"]: e for e in evaluations}
    body = "".join(section(e) for e in evaluations)
    if "seed" in by_name and "honest" in by_name:
        body = explain_difference(by_name["seed"], by_name["honest"]) + body
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}img{max-width:100%;display:block;margin:1em 0}"
        f"</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return write_atomic(out_dir / "report.html",
                        lambda tmp: tmp.write_text(page, encoding="utf-8"))
