"""A self-contained HTML report (PNG plots inlined as base64) for one or two protocols,
and the plain-words lines the CLI prints under its tables (`result_line`,
`workload_notes`): one wording for both."""

from __future__ import annotations

import base64
import html
import io
import math
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from cputwin import __version__  # noqa: E402
from cputwin.evaluation.protocols import SEED_SETS, Evaluation  # noqa: E402
from cputwin.evaluation.summary import ProtocolSummary  # noqa: E402
from cputwin.output import write_atomic  # noqa: E402
from cputwin.telemetry.schema import RUN_COLUMN, TIMESTAMP, WORKLOAD  # noqa: E402


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


LOW_R2 = 0.5  # below this, a workload's R² gets a line saying why
BASELINE_MARGIN = 0.1  # a stack's R² within this of the workload_mean baseline gets a line
R2_FLOOR = -1.0  # bars below it are clipped (and marked) so one bad workload keeps the scale
GAP_STEPS = 3.0  # a step this many times the run's median step is a gap, not a line


def with_gaps(t: np.ndarray, *series: np.ndarray) -> tuple[np.ndarray, ...]:
    """`t` and `series` with a NaN inserted at every time gap, so a plotted line breaks
    there instead of drawing a straight line across time that has no samples."""
    if t.size < 3:
        return (t, *series)
    dt = np.diff(t)
    cut = np.flatnonzero(dt > GAP_STEPS * np.median(dt)) + 1
    return tuple(np.insert(np.asarray(x, float), cut, np.nan) for x in (t, *series))


def plot_over_time(pred: pl.DataFrame, title: str) -> str:
    """One panel per run (runs are never joined); gaps within a run break the line."""
    runs = pred[RUN_COLUMN].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 2.0 * len(runs)), squeeze=False,
                             layout="constrained")
    for ax, run in zip(axes[:, 0], runs, strict=True):
        part = pred.filter(pl.col(RUN_COLUMN) == run).sort(TIMESTAMP)
        t, actual, twin = with_gaps(part[TIMESTAMP].to_numpy() - part[TIMESTAMP][0],
                                    part["actual"].to_numpy(), part["stack"].to_numpy())
        ax.plot(t, actual, lw=0.8, label="actual", color="black")
        ax.plot(t, twin, lw=0.8, label="twin (stack)", color="tab:orange")
        ax.set_title(f"{run} ({part[WORKLOAD][0]})", fontsize=9)
        ax.set_ylabel("core use (%)")
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("time since the run's first test row (s)")
    fig.suptitle(title)
    return _png(fig)


def plot_scatter(pred: pl.DataFrame, title: str) -> str:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(pred["actual"], pred["stack"], s=3, alpha=0.4)
    ax.plot([0, 100], [0, 100], color="grey", lw=0.8)
    ax.set_xlabel("actual core use (%)")
    ax.set_ylabel("twin's prediction (%)")
    ax.set_title(title)
    return _png(fig)


def plot_residuals(pred: pl.DataFrame, title: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist((pred["actual"] - pred["stack"]).to_numpy(), bins=60, color="tab:blue")
    ax.set_xlabel("residual: actual − twin (percentage points)")
    ax.set_ylabel("test rows")
    ax.set_title(title)
    return _png(fig)


def plot_r2_per_workload(summary: ProtocolSummary, title: str) -> str:
    """Bars of R² per workload and model; a bar below R2_FLOOR is cut there, hatched and
    labelled with its value; a missing R² (n/a) is labelled so."""
    wls = list(summary.per_workload)
    models = list(summary.r2)
    fig, ax = plt.subplots(figsize=(11, 4), layout="constrained")
    width = 0.8 / len(models)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for i, m in enumerate(models):
        colour = colours[i % len(colours)]
        raw = np.array([summary.per_workload[w].score("r2", m) for w in wls])
        x = np.arange(len(wls)) + i * width
        bars = ax.bar(x, np.where(np.isnan(raw), 0.0, np.maximum(raw, R2_FLOOR)), width,
                      color=colour)
        for bar, xi, value in zip(bars, x, raw, strict=True):
            if value < R2_FLOOR:
                bar.set_hatch("//")
                bar.set_edgecolor("white")
            if value < R2_FLOOR or np.isnan(value):
                ax.annotate("n/a" if np.isnan(value) else f"{value:.1f}",
                            (xi, 0.02 if np.isnan(value) else R2_FLOOR + 0.02),
                            ha="center", va="bottom", rotation=90, fontsize=6)
        handles.append(Patch(facecolor=colour, label=m))
    handles.append(Patch(facecolor="grey", hatch="//", edgecolor="white",
                         label=f"below {R2_FLOOR:g}: cut, value written"))
    ax.set_xticks(np.arange(len(wls)) + 0.4 - width / 2, wls, rotation=20, fontsize=8)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_ylim(R2_FLOOR - 0.05, 1.05)
    ax.set_ylabel("R² (no unit; 1 is perfect)")
    ax.set_title(title)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def result_line(summary: ProtocolSummary, model: str = "stack") -> str:
    """The headline in plain words: the model's scores on the test rows, nothing more."""
    s = summary.headline(model)
    return (f"{model}: R² {s.r2:.4f}, MAE {s.mae:.3f} and RMSE {s.rmse:.3f} percentage "
            f"points, over {summary.rows.test} test rows ({summary.protocol} protocol).")


def spread(r2: float, rmse: float) -> float:
    """The target's standard deviation over the scored rows, from R² = 1 − MSE / variance."""
    return rmse / math.sqrt(1 - r2) if r2 < 1 else float("nan")


def na_note(name: str, rows: int, mae: float) -> str:
    """Why an R² is n/a: the core never moved over the scored rows (or they are too few)."""
    if rows < 2:
        return f"{name}: R² n/a: fewer than 2 test rows."
    return (f"{name}: R² n/a: the core held one value over its {rows} test rows (R² is "
            f"undefined when nothing varies); MAE {mae:.3f} points says how close the twin "
            "stayed.")


def baseline_note(name: str, summary: ProtocolSummary) -> str | None:
    """A line when the stack barely beats each workload's mean: its twin then explains
    little of the core, and its detector is as wide as the core's own swings."""
    stack, base = summary.r2["stack"], summary.r2.get("workload_mean", math.nan)
    if math.isnan(stack) or math.isnan(base) or stack - base >= BASELINE_MARGIN:
        return None
    return (f"{name}: the stack's R² {stack:.2f} is {'below' if stack < base else 'barely above'} "
            f"the workload_mean baseline's {base:.2f}: the other cores tell little about this "
            "one here, so its twin and detector add little; record longer, with more load "
            "shared between cores, or with the workload's own CPU use (--bases detect_wcpu)")


def workload_notes(summary: ProtocolSummary, model: str = "stack") -> list[str]:
    """Why a workload's R² is low or missing, in this data's own figures."""
    overall = spread(summary.r2[model], summary.rmse[model])
    notes = []
    for name, entry in summary.per_workload.items():
        r2, rmse = entry.score("r2", model), entry.score("rmse", model)
        if math.isnan(r2):
            notes.append(na_note(name, entry.rows, entry.score("mae", model)))
        elif r2 < LOW_R2:
            sd = spread(r2, rmse)
            why = (f"the core varies little within it (sd {sd:.2f} points, against "
                   f"{overall:.2f} over all test rows), so an error of RMSE {rmse:.2f} points "
                   "is a large share of that variation" if sd < overall / 2 else
                   f"the twin misses much of its variation (RMSE {rmse:.2f} points against "
                   f"an sd of {sd:.2f})")
            notes.append(f"{name}: R² {r2:.2f} is low: {why}.")
    return notes


def metrics_table(summary: ProtocolSummary) -> str:
    rows = "".join(
        f"<tr><td>{m}</td><td>{summary.r2[m]:.4f}</td><td>{summary.mae[m]:.3f}</td>"
        f"<td>{summary.rmse[m]:.3f}</td></tr>"
        for m in summary.r2
    )
    meta = summary.meta
    weights = ", ".join(f"{k} {v:.4f}" for k, v in meta.weights.items())
    return (
        f"<p>protocol <b>{summary.protocol}</b>, target <code>{summary.target}</code>, "
        f"mode <b>{summary.mode}</b>, meta-model {meta.kind}, "
        f"rows train {summary.rows.train}, test {summary.rows.test}</p>"
        "<table><tr><th>model</th><th>R²</th><th>MAE</th><th>RMSE</th></tr>"
        f"{rows}</table><p>meta weights: {weights}; intercept "
        f"{meta.intercept:.4f}</p><p>{html.escape(result_line(summary))}</p>"
        + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in workload_notes(summary))
    )


def section(ev: Evaluation) -> str:
    s = ev.summary
    name = f"{s.protocol} · {s.target}"
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
    s, h = seed.summary.r2, honest.summary.r2
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
        honest_comparison(s, h, honest.summary.bases),
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


def provenance(data: Any) -> str:
    """What the page was made from and how: data, version, date, command."""
    paths = data if isinstance(data, list | tuple) else [data]
    shown = ", ".join(str(p) for p in paths) if data is not None else "not given"
    program = Path(sys.argv[0]).name
    command = shlex.join(["cputwin" if program in ("cputwin", "__main__.py") else program,
                          *sys.argv[1:]])
    return (f"<p class='provenance'>data: <code>{html.escape(shown)}</code><br>"
            f"cputwin {html.escape(__version__)}, "
            f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}<br>"
            f"command: <code>{html.escape(command)}</code></p>")


def write_report(out_dir: Path, evaluations: list[Evaluation], title: str,
                 data: Any = None) -> Path:
    """Write `report.html` into `out_dir` and return its path; `data` (the paths read)
    is named on the page with the version, date and command."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_name = {e.summary.protocol: e for e in evaluations}
    body = "".join(section(e) for e in evaluations)
    if "seed" in by_name and "honest" in by_name:
        body = explain_difference(by_name["seed"], by_name["honest"]) + body
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}img{max-width:100%;display:block;margin:1em 0}"
        ".note{color:#555}.provenance{color:#555;font-size:90%}"
        f"</style></head><body><h1>{html.escape(title)}</h1>{provenance(data)}{body}"
        "</body></html>"
    )
    return write_atomic(out_dir / "report.html",
                        lambda tmp: tmp.write_text(page, encoding="utf-8"))
