"""The `cputwin` command: parse options, call the library, render results.

No logic lives here. Every `CputwinError` is caught once, at the edge, and printed as
one line on stderr with exit code 2 (a dead workload: 1); warnings print as one line.
SIGTERM is Ctrl-C.
Progress goes to stderr, so `--json` leaves exactly one JSON object on stdout.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal, get_args

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from typer._click.exceptions import UsageError  # typer's own click (typer is pinned)
from typer.core import TyperArgument, TyperCommand, TyperGroup

from cputwin import __version__
from cputwin.errors import CputwinError
from cputwin.evaluation.summary import (
    ComparisonSummary,
    DetectorSummary,
    PerHost,
    ProtocolSummary,
    TargetsSummary,
    TrainResult,
)

out = Console()
err = Console(stderr=True)

# The choices the parser checks. The library's own tuples (protocols, modes, meta-model
# kinds, workloads) load heavy modules; tests/test_cli_conventions.py keeps these equal.
ProtocolName = Literal["honest", "seed", "both"]
ModeName = Literal["sensor", "independent"]
MetaName = Literal["auto", "ridge", "nnls", "best", "average", "top_mean", "per_workload"]
WorkloadName = Literal["all", "cpu_bound", "io_bound", "memory_bound", "mixed_workload",
                       "network_bound", "idle"]

# Old spellings of renamed options: still accepted (documented commands keep working).
HIDDEN_ALIASES = {
    "collect": {"--out": "--output"},
    "demo": {"--out": "--output"},
    "evaluate": {"--report": "--output"},
    "watch": {"--record": "--output"},
}
TYPE_METAVARS = {str: "TEXT", int: "INTEGER", float: "FLOAT", Path: "PATH"}
MAX_CHOICES_WIDTH = 22  # longer choice lists go into the help text, which wraps at words


def metavar(param) -> str:
    """The usual metavar: DATA... for arguments, [a|b] for choices, TEXT/INTEGER/FLOAT/PATH
    for values, nothing for flags."""
    if isinstance(param, TyperArgument):
        return param.name.upper() + ("..." if param.nargs != 1 else "")
    if param.is_flag:
        return ""
    kind = param.type_descriptor
    if kind.is_choice:
        choices = [str(getattr(c, "value", c)) for c in kind.choices]
        if len("|".join(choices)) <= MAX_CHOICES_WIDTH:
            return "[" + "|".join(choices) + "]"
        param.help = f"{param.help or ''} One of: {', '.join(choices)}.".strip()
        return param.name.upper()
    annotation = kind.annotation
    if get_args(annotation):  # list[str]: a repeatable option
        annotation = get_args(annotation)[0]
    return TYPE_METAVARS.get(annotation, "VALUE")


class UsualHelp:
    """Help with the usual metavars (`metavar`), and a docstring's paragraphs rewrapped."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.help:  # a docstring's line breaks are not the help's: rich wraps paragraphs
            self.help = re.sub(r"(?<!\n)\n(?!\n)", " ", inspect.cleandoc(self.help))

    def get_params(self, ctx) -> list:
        params = super().get_params(ctx)  # with --help and the completion options
        for param in params:
            _usual_metavar(param)
        return params


def _usual_metavar(param) -> None:
    if param.metavar is None:
        param.metavar = metavar(param)
    if isinstance(param, TyperArgument):  # the name column already says DATA...
        param.display_type_rich = lambda ctx: None


class Command(UsualHelp, TyperCommand):
    """A command with the usual help and a plain usage line, which still accepts the old
    spelling of a renamed option (HIDDEN_ALIASES)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [p.metavar if p.required else f"[{p.metavar}]"
                         for p in self.get_params(ctx) if isinstance(p, TyperArgument)]

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        aliases = HIDDEN_ALIASES.get(self.name or "", {})
        return super().parse_args(ctx, [_unalias(a, aliases) for a in args])


def _unalias(arg: str, aliases: dict[str, str]) -> str:
    name, eq, value = arg.partition("=")
    return aliases[name] + eq + value if name in aliases else arg


class Group(UsualHelp, TyperGroup):
    """The command group: a usage mistake (a bad choice, a missing argument, an unknown
    option) is one line on stderr and exit code 2, as every other bad input."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # the help is already shown
                sys.exit(exc.exit_code)
            where = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
            problem = exc.format_message().replace("Value error, ", "")
            complain(f"error: {where}{problem[:1].lower()}{problem[1:]}")
            sys.exit(2)
        except typer.Abort:
            complain("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def say(text: str) -> None:
    """Prose on stdout, wrapped at words to the terminal's width (80 when piped)."""
    out.print(text, markup=False, highlight=False)


def complain(text: str) -> None:
    """An error or warning on stderr: wrapped at words on a terminal; one line when piped,
    so scripts (and tests) read one problem per line."""
    err.print(text, markup=False, highlight=False, soft_wrap=not err.is_terminal)


app = typer.Typer(
    help="A digital twin of a machine's CPU cores, learned from per-core telemetry.",
    cls=Group,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

DataArg = Annotated[list[str], typer.Argument(
    help="Telemetry runs (.parquet, .csv, Telegraf .lp/.influx): files, folders or globs.")]
ColumnsOpt = Annotated[str | None, typer.Option(
    "--columns", metavar="OLD=NEW,...",
    help="Rename DATA's columns to cputwin's, e.g. ts=timestamp,core0=cpu_util_core_0; "
         "{n} stands for any core number: cpu{n}=cpu_util_core_{n}.")]
FromOpt = Annotated[str | None, typer.Option(
    "--from", metavar="URL",
    help="Read a remote host through its node_exporter (http://HOST:9100/metrics) instead "
         "of this machine.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object, nothing else.")]
TargetOpt = Annotated[str, typer.Option(
    metavar="CORE", help="The core to twin: its number (3), its column (cpu_util_core_3), or all (the "
         "machine twin: every core).")]
MaxRoundsOpt = Annotated[int | None, typer.Option(
    "--max-rounds", min=1, help="Cap every LightGBM base's boosting rounds (large data).")]
Float32Opt = Annotated[bool, typer.Option(
    "--float32", help="Build feature matrices in float32: half the memory (large data).")]
DaskOpt = Annotated[str | None, typer.Option(
    "--dask", metavar="ADDRESS",
    help="Fit on a Dask cluster: a scheduler address, or local:N for N local workers.")]
PerHostOpt = Annotated[bool, typer.Option(
    "--per-host", help="Each host on its own; exit code 1 if any host failed (the others "
                       "still run).")]
JobsOpt = Annotated[int, typer.Option(
    "--jobs", "-j", min=1, help="With --per-host: hosts in N local processes at once.")]
AlertWebhookOpt = Annotated[str | None, typer.Option(
    "--alert-webhook", metavar="URL",
    help="POST each alarm raise/clear to URL as Alertmanager JSON (e.g. "
         "http://alertmanager:9093/api/v2/alerts).")]
HostCategoryOpt = Annotated[bool, typer.Option(
    "--host-category", help="One twin over all hosts, each host a one-hot category.")]
BasesOpt = Annotated[str, typer.Option(
    help="Base models: a preset (twin, seed, portable, detect, detect_wcpu) or a "
         "comma-separated list of bases.")]
ModeOpt = Annotated[ModeName, typer.Option(
    help="sensor: may read all but the target core; independent: nothing containing it.")]
SignKeyOpt = Annotated[str | None, typer.Option(
    "--sign-key", envvar="CPUTWIN_SIGN_KEY", show_envvar=True, show_default=False,
    help="Signing key: train signs the twin (HMAC-SHA256); predict, watch and serve "
         "refuse a twin not signed with it (docs/bad-input.md).")]
MetaOpt = Annotated[MetaName | None, typer.Option(
    help="Meta-model (default: ridge for the seed preset, auto otherwise).",
    show_default=False)]


def positive(name: str, value: float | None, most: float = math.inf) -> float | None:
    """A number of seconds or samples per second: finite, above 0, at most `most`."""
    if value is not None and not (math.isfinite(value) and 0 < value <= most):
        raise CputwinError(f"{name} must be a finite number above 0"
                           + (f" and at most {most:g}" if math.isfinite(most) else "")
                           + f", got {value}")
    return value


def _columns(value: str | None) -> dict[str, str] | None:
    from cputwin.telemetry.ingest import parse_column_map

    return parse_column_map(value) if value else None


def _bases(value: str) -> str | list[str]:
    """A preset name as is; anything else is a comma-separated list of base names."""
    from cputwin.models import PRESETS

    return value if value in PRESETS else [b.strip() for b in value.split(",") if b.strip()]


def _target(value: str) -> str:
    """A core number (3) names its column (cpu_util_core_3); a column or `all` stays."""
    from cputwin.telemetry.schema import core_column

    return core_column(int(value)) if value.isdecimal() else value


def _stack_options(bases: str, mode: str, meta: str | None, host_category: bool,
                   max_rounds: int | None, float32: bool) -> dict:
    """The options `pipeline.make_stack` takes, from the flags evaluate and train share."""
    return {"bases": _bases(bases), "mode": mode, "meta": meta, "host_category": host_category,
            "max_rounds": max_rounds, "float32": float32}


@contextmanager
def cli_errors(writes: Path | None = None, hint: str = "") -> Iterator[None]:
    """One line per warning; one line and an exit code per cputwin error, and per write
    the system refused (a full disk) under `writes`, the command's output."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            yield
        except CputwinError as exc:
            _show_warnings(caught)
            complain(f"error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            from cputwin.output import reason

            _show_warnings(caught)
            where = writes if writes is not None else exc.filename or "output"
            complain(f"error: {where}: {reason(exc)}{hint}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted", highlight=False)
            raise typer.Exit(130) from None
        _show_warnings(caught)


def _show_warnings(caught) -> None:
    seen = set()
    for w in caught:
        msg = str(w.message)
        if msg not in seen and not issubclass(w.category, DeprecationWarning):
            seen.add(msg)
            complain(f"warning: {msg}")


@contextmanager
def spinner() -> Iterator:
    """A progress bar on stderr; yields the (message, fraction) callback the library calls."""
    if not err.is_terminal:
        yield lambda _msg, _frac: None
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description:<28}"), BarColumn(),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task("starting", total=1.0)
        yield lambda msg, frac: bar.update(task, description=msg, completed=frac)


def _json(obj) -> None:
    sys.stdout.write(json.dumps(_finite(obj), indent=2, default=str, allow_nan=False) + "\n")


def _finite(x):
    """`x` as strict JSON data: a typed result rendered (`to_dict`), NaN (an undefined
    score) as null."""
    if hasattr(x, "to_dict"):
        return _finite(x.to_dict())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def _fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def render_summary(summary: ProtocolSummary) -> None:
    table = Table(title=f"{summary.protocol} protocol · {summary.target} · {summary.mode} mode",
                  caption=f"rows: train {summary.rows.train}, test {summary.rows.test}")
    table.add_column("model")
    for col in ("R²", "MAE", "RMSE"):
        table.add_column(col, justify="right")
    for m in summary.r2:
        table.add_row(m, _fmt(summary.r2[m]), _fmt(summary.mae[m]), _fmt(summary.rmse[m]))
    out.print(table)
    from cputwin.evaluation.report import baseline_note, result_line, workload_notes

    models = list(summary.r2)
    for part in group_tables("workload", {w: g.r2 for w, g in summary.per_workload.items()},
                             models):
        out.print(part)
    if summary.per_host is not None and len(summary.per_host) > 1:
        for part in group_tables("host", {h: g.r2 for h, g in summary.per_host.items()}, models):
            out.print(part)
    meta = summary.meta
    weights = " / ".join(f"{k} {v:.4f}" for k, v in meta.weights.items())
    say(f"meta-model {meta.kind}: weights {weights}; intercept {meta.intercept:.4f}")
    if summary.timing is not None:
        say(timing_line(summary.timing))
    say(result_line(summary))
    for note in [baseline_note(summary.target, summary), *workload_notes(summary)]:
        if note:
            say(note)


def timing_line(timing: dict) -> str:
    """What the twin's history covers: samples, and seconds at its data's rate."""
    def span(key: str) -> str:
        n, sec = timing[key]["samples"], timing[key]["seconds"]
        return f"{n} samples" + ("" if sec is None else f" = {sec:g} s")

    rate = "rate unknown" if timing["rate_hz"] is None else (
        f"one sample every {timing['step_s']:.3g} s ({timing['rate_hz']:.3g} Hz)")
    return (f"history {span('history')} (longest lag {span('longest_lag')}, longest window "
            f"{span('longest_window')}): {rate}")


def group_tables(group: str, entries: dict[str, dict[str, float]], models: list[str]) -> list[Table]:
    """R² of every model (`entries`: each group value's R² per model; a model with no rows
    in a group is absent) for each value of a group (workload, host, core), split into as
    many tables as it takes for each to fit the terminal's width."""
    first = max(len(group), *(len(name) for name in entries)) + 3  # text and its borders
    parts, width = [[]], first + 1
    for m in models:
        need = max(len(m), 7) + 3
        if parts[-1] and width + need > out.width:
            parts.append([])
            width = first + 1
        parts[-1].append(m)
        width += need
    tables = []
    for i, chunk in enumerate(parts):
        more = f" ({i + 1} of {len(parts)})" if len(parts) > 1 else ""
        table = Table(title=f"R² per {group}{more}")
        table.add_column(group, no_wrap=True)
        for m in chunk:
            table.add_column(m, justify="right", no_wrap=True)
        for name, r2 in entries.items():
            table.add_row(name, *[_fmt(r2.get(m)) for m in chunk])
        tables.append(table)
    return tables


@app.command(cls=Command)
def evaluate(
    data: DataArg,
    protocol: Annotated[ProtocolName, typer.Option(
        help="honest (each run's past trains, its future tests), seed (the notebook's "
             "random split), or both side by side.")] = "honest",
    target: TargetOpt = "cpu_util_core_0",
    mode: ModeOpt = "sensor",
    bases: BasesOpt = "twin",
    meta: MetaOpt = None,
    train_fraction: Annotated[float, typer.Option(help="Share of each run that trains.")] = 0.8,
    test: Annotated[list[str] | None, typer.Option(
        help="Score on these runs (another machine) after training on all of DATA.")] = None,
    report: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write an HTML report (report.html) into this folder.")] = None,
    host_category: HostCategoryOpt = False,
    max_rounds: MaxRoundsOpt = None,
    float32: Float32Opt = False,
    dask: DaskOpt = None,
    per_host: PerHostOpt = False,
    jobs: JobsOpt = 1,
    columns: ColumnsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train and score the twin on DATA under an evaluation protocol.

    With --per-host each host is evaluated on its own (with --dask, one task per host on
    the cluster), then the fleet's R² spread is shown; exit code 1 if any host failed.
    """
    with cli_errors(), spinner() as progress:
        from cputwin import pipeline

        target = _target(target)
        summary, _ = pipeline.evaluate(
            data, protocol, target, train_fraction, report, progress, test_data=test or None,
            dask=dask, per_host=per_host, jobs=jobs, columns=_columns(columns),
            **_stack_options(bases, mode, meta, host_category, max_rounds, float32))
    failed = isinstance(summary, PerHost) and bool(summary.failed)
    if as_json:
        _json(summary)
        raise typer.Exit(1 if failed else 0)
    if isinstance(summary, PerHost):
        render_fleet(summary)
        raise typer.Exit(1 if failed else 0)
    if isinstance(summary, TargetsSummary):
        render_targets(summary)
    elif isinstance(summary, ComparisonSummary):
        render_summary(summary.seed)
        render_summary(summary.honest)
        out.print(f"compared: {summary.compares}", highlight=False)
        out.print("leakage audit of the seed protocol (measured):")
        for k, v in summary.audit.items():
            out.print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    else:
        render_summary(summary)
    if report:
        out.print(f"report: {report / 'report.html'}", soft_wrap=True, highlight=False)


def render_fleet(result: PerHost) -> None:
    """Per host: the stack's scores; then the fleet's R² spread and the failed hosts."""
    fleet = result.fleet
    assert fleet is not None, "evaluate --per-host always measures the fleet"
    table = Table(title=f"stack per host · {fleet.hosts} evaluated, {fleet.failed} failed")
    for col in ("host", "R²", "MAE", "RMSE"):
        table.add_column(col, justify="left" if col == "host" else "right")
    for host, s in fleet.per_host.items():
        table.add_row(host, _fmt(s.r2), _fmt(s.mae), _fmt(s.rmse))
    out.print(table)
    r2 = fleet.r2
    worst = ", ".join(f"{w.host} {_fmt(w.r2)}" for w in fleet.worst)
    out.print(f"fleet R²: median {_fmt(r2.median)}, mean {_fmt(r2.mean)}, "
              f"range {_fmt(r2.min)} to {_fmt(r2.max)}; worst: {worst or 'none'}")
    render_failed(result.failed)


def render_failed(failed: dict) -> None:
    for host, reason in failed.items():
        out.print(f"host {host} failed: {reason}", highlight=False)


def render_targets(summary: TargetsSummary) -> None:
    first = next(iter(summary.targets.values()))
    say(f"{first.protocol} protocol, mode {first.mode}, every core:")
    for table in group_tables("target", {t: s.r2 for t, s in summary.targets.items()},
                              list(first.r2)):
        out.print(table)
    from cputwin.evaluation.report import baseline_note, na_note

    for name, s in summary.targets.items():
        if math.isnan(s.r2["stack"]):
            say(na_note(name, s.rows.test, s.mae["stack"]))
        elif note := baseline_note(name, s):
            say(note)
    m = summary.mean
    out.print(f"mean over {len(summary.targets)} cores (stack): R² {_fmt(m.r2)}, "
              f"MAE {m.mae:.3f}, RMSE {m.rmse:.3f}")


@app.command(cls=Command)
def train(
    data: DataArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Twin file to write.")],
    target: TargetOpt = "cpu_util_core_0",
    mode: ModeOpt = "sensor",
    bases: BasesOpt = "twin",
    meta: MetaOpt = None,
    per_host: PerHostOpt = False,
    jobs: JobsOpt = 1,
    host_category: HostCategoryOpt = False,
    max_rounds: MaxRoundsOpt = None,
    float32: Float32Opt = False,
    dask: DaskOpt = None,
    sign_key: SignKeyOpt = None,
    columns: ColumnsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fit a twin on all of DATA and save it as a pickle-free .cputwin file.

    With --per-host, one twin per host, written as OUTPUT/<host>.cputwin (with --dask, one
    task per host on the cluster); exit code 1 if any host failed, the others still train.
    """
    with cli_errors(), spinner() as progress:
        from cputwin import pipeline

        target = _target(target)
        result = pipeline.train(
            data, output, target, progress, per_host=per_host, dask=dask, jobs=jobs,
            sign_key=sign_key, columns=_columns(columns),
            **_stack_options(bases, mode, meta, host_category, max_rounds, float32))
    failed = isinstance(result, PerHost) and bool(result.failed)
    if as_json:
        _json(result)
        raise typer.Exit(1 if failed else 0)
    trained: dict[str | None, TrainResult] = (
        result.hosts if isinstance(result, PerHost) else {None: result})
    for host, one in trained.items():
        out.print(f"{'host ' + host + ': ' if host else ''}twin written to {one.twin} "
                  f"(target {target}, mode {mode}, {one.rows} rows, "
                  f"meta-model {one.meta.kind})")
        out.print("out-of-fold R²: " + ", ".join(f"{k} {_fmt(v.r2)}"
                                                  for k, v in one.out_of_fold.models.items()))
        for core, d in one.detector.items():
            out.print(detector_line(core, d), highlight=False)
        out.print(timing_line(one.timing), highlight=False)
    if isinstance(result, PerHost):
        out.print(f"{len(result.hosts)} hosts trained, {len(result.failed)} failed")
        render_failed(result.failed)
        raise typer.Exit(1 if failed else 0)


@app.command(cls=Command)
def predict(
    twin: Annotated[Path, typer.Argument(help="A .cputwin file.")],
    data: DataArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Parquet file to write.")],
    sign_key: SignKeyOpt = None,
    columns: ColumnsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Predict the twin's core for every row of DATA."""
    with cli_errors():
        from cputwin import pipeline

        result = pipeline.predict(twin, data, output, key=sign_key, columns=_columns(columns))
    if as_json:
        _json(result)
        return
    out.print(f"{result.predicted} of {result.rows} rows predicted → {output} "
              f"(target {result.target}, mode {result.mode})")
    for core, s in (result.scores or {}).items():
        out.print(f"{core + ': ' if result.cores else ''}against the measured core: "
                  f"R² {_fmt(s.r2)}, MAE {s.mae:.3f}")


def record_workloads(names: list[str], seconds: float, rate: float, out_dir: Path,
                     announce: bool = True) -> list:
    """Record each workload in turn, with a progress bar per run on stderr; the runs are
    listed on stdout once the bars are gone (a line written under a live bar is garbled),
    those finished before an error or Ctrl-C too."""
    from cputwin.telemetry.collector import Collector

    collector = Collector(rate=rate)
    results = []
    try:
        with Progress(TextColumn("{task.description:>15}"), BarColumn(), TimeRemainingColumn(),
                      console=err, disable=not err.is_terminal) as bar:
            for name in names:
                task = bar.add_task(name, total=1.0)
                results.append(collector.record(
                    name, seconds, out_dir, tick=lambda f, t=task: bar.update(t, completed=f)))
    finally:
        if announce:
            for run in results:
                announce_run(run)
    return results


def announce_run(run) -> None:
    out.print(f"{run.path} ({run.rows} samples, median step {run.median_step:.4f} s)",
              highlight=False)


def record_remote(url: str, seconds: float, rate: float, out_dir: Path, label: str | None):
    """One run of a remote host's node_exporter, with a progress bar on stderr."""
    from cputwin.telemetry.collector import Collector
    from cputwin.telemetry.prometheus import NodeExporterSampler

    sampler = NodeExporterSampler(url)
    with Progress(TextColumn("{task.description:>15}"), BarColumn(), TimeRemainingColumn(),
                  console=err, disable=not err.is_terminal) as bar:
        task = bar.add_task(sampler.host, total=1.0)
        return Collector(rate=rate).record_from(
            sampler, seconds, out_dir, label, tick=lambda f: bar.update(task, completed=f))


KEPT_AS_PARTS = " (the samples written so far stay in <run>.parts: `cputwin recover` them)"


@app.command(cls=Command)
def collect(
    workload: Annotated[WorkloadName | None, typer.Option(
        help="A built-in workload, or 'all' (the default without --from).",
        show_default=False)] = None,
    seconds: Annotated[float, typer.Option(help="Seconds per workload.")] = 30.0,
    rate: Annotated[float | None, typer.Option(
        help="Samples per second (default 10; with --from, 1).", show_default=False)] = None,
    out_dir: Annotated[Path, typer.Option("--output", "-o", help="Folder for the runs.")] = Path(
        "telemetry"),
    source: FromOpt = None,
    label: Annotated[str | None, typer.Option(
        help="With --from: the workload label of the rows (default: unlabelled).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Record labelled telemetry of this machine, one parquet file per workload; with
    --from, record a remote host through its node_exporter (no workload is started)."""
    from cputwin.output import check_folder
    from cputwin.telemetry.collector import expand_workloads

    with cli_errors(out_dir, KEPT_AS_PARTS):
        positive("--seconds", seconds)
        positive("--rate", rate, 100.0)
        if source is not None and workload is not None:
            raise CputwinError("--workload starts a workload on this machine; with --from "
                               "nothing is started (name what the host ran with --label)")
        names = expand_workloads(workload or "all") if source is None else []
        check_folder(out_dir)  # after the arguments: a typo creates no folder
        if source is not None:
            results = [record_remote(source, seconds, rate or 1.0, out_dir, label)]
            if not as_json:
                announce_run(results[0])
        elif label is not None:
            raise CputwinError("--label names what a remote host ran: it needs --from")
        else:
            results = record_workloads(names, seconds, rate or 10.0, out_dir,
                                       announce=not as_json)
    if as_json:
        _json({"runs": [{"path": str(r.path), "rows": r.rows, "median_step_s": r.median_step}
                        for r in results]})


import_app = typer.Typer(help="Import telemetry kept elsewhere as cputwin runs.", cls=Group,
                        no_args_is_help=True)
app.add_typer(import_app, name="import")


@import_app.command("prometheus", cls=Command)
def import_prometheus(
    url: Annotated[str, typer.Argument(help="The Prometheus server, e.g. http://prom:9090.")],
    instance: Annotated[str, typer.Option(help="The node_exporter's instance label "
                                               "(e.g. web1:9100); it becomes the host.")],
    start: Annotated[str, typer.Option(help="Start: epoch seconds, ISO 8601 (UTC unless it "
                                            "has an offset), or now-2h.")],
    end: Annotated[str, typer.Option(help="End, as --start (e.g. now).")] = "now",
    step: Annotated[float | None, typer.Option(
        help="Seconds between rows (a multiple of the scrape interval; default: every "
             "scrape).", show_default=False)] = None,
    out_dir: Annotated[Path, typer.Option("--output", "-o", help="Folder for the runs.")]
    = Path("telemetry"),
    as_json: JsonOpt = False,
) -> None:
    """Read node_exporter's CPU counters (node_cpu_seconds_total) for one instance from a
    Prometheus server and write them as runs (one per stretch without gaps or resets)."""
    with cli_errors(out_dir):
        from cputwin.output import check_folder
        from cputwin.telemetry.prometheus import import_prometheus as run_import
        from cputwin.telemetry.prometheus import parse_time

        positive("--step", step)
        check_folder(out_dir)
        frame, paths = run_import(url, instance, parse_time(start), parse_time(end), out_dir,
                                  step)
    rows = frame.group_by("run", maintain_order=True).len()["len"].to_list()
    if as_json:
        _json({"host": instance, "rows": frame.height,
               "runs": [{"path": str(p), "rows": n} for p, n in zip(paths, rows, strict=True)]})
        return
    for path, n in zip(paths, rows, strict=True):
        out.print(f"{path} ({n} rows)", highlight=False)
    out.print(f"{len(paths)} runs of {instance}, {frame.height} rows", highlight=False)


@app.command(cls=Command)
def recover(
    parts: Annotated[Path, typer.Argument(help="The <run>.parts folder a killed collect left.")],
    as_json: JsonOpt = False,
) -> None:
    """Turn what an interrupted `collect` saved (<run>.parts) into a run (<run>.parquet)."""
    with cli_errors(parts.with_suffix(".parquet")):
        from cputwin.telemetry.collector import recover_parts

        path, rows = recover_parts(parts)
    if as_json:
        _json({"path": str(path), "rows": rows})
        return
    out.print(f"{path} ({rows} samples, recovered)")


@app.command(cls=Command)
def demo(
    live: Annotated[bool, typer.Option(help="Record fresh telemetry of this machine first.")] = False,
    seconds: Annotated[float, typer.Option(
        help="With --live: seconds per workload (20 or more: the honest split needs history).")] = 30.0,
    out_dir: Annotated[Path, typer.Option(
        "--output", "-o", help="Folder for the report and the twin.")] = Path("cputwin-demo"),
    as_json: JsonOpt = False,
) -> None:
    """Evaluate honestly on the embedded sample (or, with --live, on this machine) and keep
    that one fit as the twin; says first about how long it takes."""
    from cputwin.telemetry.collector import expand_workloads

    with cli_errors(out_dir):
        positive("--seconds", seconds)
        from cputwin import pipeline
        from cputwin.output import check_folder

        check_folder(out_dir)  # a folder it cannot write fails before the announcement
        workloads = expand_workloads("all")
        plan = pipeline.demo_estimate(len(workloads) * seconds * DEMO_RATE if live else None)
        recording = (f"recording {len(workloads)} workloads × {seconds:g} s "
                     f"({len(workloads) * seconds / 60:.1f} min), then " if live else "")
        complain(f"demo: {recording}one fit of the twin on {plan['train_rows']} rows, about "
                 f"{_duration(plan['seconds'])} on {plan['cores']} idle cores")
        data = None
        if live:
            data = out_dir / "telemetry"
            record_workloads(workloads, seconds, DEMO_RATE, data, announce=not as_json)
        with spinner() as progress:
            result = pipeline.demo(out_dir, data, progress)
    if as_json:
        _json({**result.summary.to_dict(), "report": str(result.report),
               "twin": str(result.twin)})
        return
    out.print(f"data: {result.data}", soft_wrap=True, highlight=False)
    render_summary(result.summary)
    out.print(f"report: {result.report}", soft_wrap=True, highlight=False)
    out.print(f"twin:   {result.twin}", soft_wrap=True, highlight=False)
    say(f"(the twin the report scores: trained on each run's first "
        f"{pipeline.DEMO_TRAIN_FRACTION:.0%})")


DEMO_RATE = 10.0


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    return "".join(SPARK[min(int(v / 100 * len(SPARK)), len(SPARK) - 1)]
                   if not math.isnan(v) else " "
                   for v in values)


@app.command(cls=Command)
def watch(
    twin: Annotated[Path, typer.Argument(help="A .cputwin file trained on this kind of machine.")],
    workload: Annotated[str | None, typer.Option(
        help="Label of what this machine is running (default: none, the 'unlabelled' "
             "workload).", show_default=False)] = None,
    seconds: Annotated[float | None, typer.Option(help="Stop after this long (default: Ctrl-C).")]
    = None,
    rate: Annotated[float | None, typer.Option(
        help="Samples per second (default 10; with --from, 1).", show_default=False)] = None,
    record: Annotated[Path | None, typer.Option(
        "--output", "-o",
        help="Write telemetry, predictions, scores and alarms to parquet in this folder.")] = None,
    events: Annotated[Path | None, typer.Option(
        help="Append each alarm raise/clear to this file as a JSON line.")] = None,
    pid: Annotated[int | None, typer.Option(
        help="The workload's process (children included), for a twin that reads the "
             "workload's own CPU use (e.g. --bases detect_wcpu).", min=1)] = None,
    alert_webhook: AlertWebhookOpt = None,
    sign_key: SignKeyOpt = None,
    source: FromOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sample this machine (or, with --from, a remote host) live, predict the twin's core
    every tick, raise alarms."""
    from collections import deque

    from rich.live import Live
    from rich.panel import Panel

    with cli_errors():
        from cputwin import pipeline
        from cputwin.live.alerts import AlertSender
        from cputwin.live.twin import open_twin
        from cputwin.live.watch import watch as run_watch
        from cputwin.output import check_file, check_folder

        positive("--rate", rate, 100.0)
        positive("--seconds", seconds)
        url = _webhook(alert_webhook)
        rate = rate or (1.0 if source else 10.0)
        if record is not None:
            check_folder(record)
        if events is not None:
            check_file(events, append=True)
        stack, detector, _ = open_twin(twin, sign_key)
        workload = pipeline.live_workload(stack, workload)
        sampler = None
        if source is not None:
            from cputwin.telemetry.prometheus import NodeExporterSampler

            sampler = NodeExporterSampler(source)
        alerts = AlertSender(url) if url else None
        observed, predicted = deque(maxlen=60), deque(maxlen=60)
        live = Live(console=err, auto_refresh=False,
                    transient=False) if err.is_terminal and not as_json else None

        def show(row: dict, tick) -> None:
            first = stack.targets_[0] if stack.machine_ else stack.target
            observed.append(row[first])
            predicted.append(tick.prediction if tick.prediction is not None else float("nan"))
            if not live and not as_json:
                for core in tick.cores:
                    if core.event:
                        out.print(f"alarm {core.event} on {core.target} at "
                                  f"{row['timestamp']:.1f} (score {core.score:.2f})")
            if live and stack.machine_:
                live.update(Panel(machine_panel(row, tick, detector, stack.mode, workload),
                                  title="cputwin watch · every core · Ctrl-C to stop"),
                            refresh=True)
            elif live:
                state = watch_state(tick)
                twin_v = "…" if tick.prediction is None else f"{tick.prediction:6.1f}"
                resid = "" if tick.residual is None else f"{tick.residual:+6.1f}"
                score = "" if tick.score is None else f"{tick.score:5.2f}"
                body = (f"{stack.target} ({stack.mode} twin, workload {workload})\n"
                        f"observed {row[stack.target]:6.1f}   twin {twin_v}   residual {resid}   "
                        f"score {score} / {detector.threshold if detector else float('nan'):.2f}"
                        f"   {state}\n"
                        + (f"alarms within {detector.power_window_s:.3g} s on "
                           f"{_points(detector.power_for(workload))} "
                           "points of extra load\n" if detector else "")
                        + f"observed {sparkline(list(observed))}\n"
                        f"twin     {sparkline(list(predicted))}")
                live.update(Panel(body, title="cputwin watch · Ctrl-C to stop"), refresh=True)

        if live:
            live.start()
        try:
            summary = run_watch(stack, detector, show, workload, rate, seconds, record, events,
                                pid, alerts, sampler=sampler)
        finally:
            if live:
                live.stop()
    if as_json:
        _json(summary)
    else:
        out.print(f"{summary.ticks} ticks, {summary.alarms} alarms"
                  + (f", recorded to {summary.record}" if summary.record else ""))


def detector_line(core: str, summary: DetectorSummary) -> str:
    """What the core's detector can see: the smallest extra load that alarms within its
    window (2 s at 10 Hz)."""
    power = {w: p for w, p in summary.power.items() if w != "*"} or summary.power
    shown = ", ".join(f"{w} {_points(p)}" for w, p in sorted(power.items()))
    return (f"{core}: alarm threshold {summary.threshold:.2f}; extra load that alarms "
            f"within {summary.window_s:.3g} s (points): {shown}")


def _points(value: float) -> str:
    return "none" if not math.isfinite(value) else f"{value:.0f}"


def machine_panel(row: dict, tick, detectors: dict | None, mode: str, workload: str) -> str:
    """One line per core: observed, twin, residual, score against its threshold, state."""
    lines = [f"machine twin ({mode}, workload {workload})",
             f"{'core':<8}{'observed':>9}{'twin':>8}{'resid':>8}{'score':>8}{'thr':>7}"
             f"{'sees':>6}  state"]
    by_core = {c.target: c for c in tick.cores}
    for name in sorted((c for c in row if c.startswith("cpu_util_core_")),
                       key=lambda c: int(c.rsplit("_", 1)[1])):
        core = by_core.get(name)
        short = name.removeprefix("cpu_util_")
        if core is None:
            lines.append(f"{short:<8}{row[name]:9.1f}{'…':>8}")
            continue
        thr = detectors[name].threshold if detectors else float("nan")
        sees = _points(detectors[name].power_for(workload)) if detectors else "-"
        resid = "" if core.residual is None else f"{core.residual:+8.1f}"
        score = "" if core.score is None else f"{core.score:8.2f}"
        state = watch_state(core)
        lines.append(f"{short:<8}{row[name]:9.1f}{core.prediction:8.1f}{resid:>8}{score:>8}"
                     f"{thr:7.2f}{sees:>6}  {state}")
    from cputwin.live.detector import POWER_WINDOW_S

    window = next(iter(detectors.values())).power_window_s if detectors else POWER_WINDOW_S
    lines.append(f"sees: the smallest sustained extra load (points) that alarms within "
                 f"{window:.3g} s; blind: the twin expects the core too busy for that much more")
    return "\n".join(lines)


def watch_state(tick) -> str:
    """ALARM, blind (the core has no headroom for extra load to show) or ok."""
    if tick.alarm:
        return "[bold red]ALARM[/]"
    return "[yellow]blind[/]" if tick.blind else "[green]ok[/]"


@app.command(cls=Command)
def serve(
    twin: Annotated[Path, typer.Argument(help="A .cputwin file.")],
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port, 1..65535.")] = 8000,
    max_streams: Annotated[int, typer.Option(help="Live streams kept at most.")] = 1000,
    stream_ttl: Annotated[float, typer.Option(help="Seconds before an idle stream expires.")]
    = 300.0,
    max_body: Annotated[int, typer.Option(help="Largest request body, in bytes.")] = 1_000_000,
    token: Annotated[str | None, typer.Option(
        envvar="CPUTWIN_TOKEN", show_envvar=True,
        help="Require 'Authorization: Bearer TOKEN' on every route but /healthz.")] = None,
    alert_webhook: AlertWebhookOpt = None,
    sign_key: SignKeyOpt = None,
    allowed_host: Annotated[list[str] | None, typer.Option(
        metavar="NAME", help="A name clients may reach the server by (the Host header), "
        "repeatable; bound to loopback, localhost, 127.0.0.1 and ::1 are always allowed; "
        "bound elsewhere without it, any name is.")] = None,
) -> None:
    """Serve the twin over HTTP: /v1/predict, /v1/streams/{id}/samples, /healthz, /metrics
    (see docs/serve.md)."""
    import logging

    with cli_errors():
        from cputwin.live import serve as service
        from cputwin.live.twin import open_twin

        open_twin(twin, sign_key)  # a bad file fails here, in one line, before the server starts
        app_ = service.create_app(twin, max_streams, stream_ttl, max_body, token or None,
                                  _webhook(alert_webhook), sign_key,
                                  service.allowed_hosts(host, allowed_host or []))
        sock = service.bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    err.print(f"serving {twin} on http://{shown}:{port} (Ctrl-C to stop)", highlight=False,
              soft_wrap=True)  # one line: scripts read the address from it
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    try:
        service.run(app_, sock)  # warnings are logged per request, never kept
    except KeyboardInterrupt:
        err.print("stopped", highlight=False)
        raise typer.Exit(130) from None


def _webhook(url: str | None) -> str | None:
    if url is not None and not url.startswith(("http://", "https://")):
        raise CputwinError(f"--alert-webhook must be an http(s) URL, not {url!r}")
    return url


def _version(value: bool) -> None:
    if value:
        out.print(f"cputwin {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """cputwin: collect → features → stacked LightGBM twin → honest evaluation."""


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """The console script. SIGTERM (systemd, `docker stop`, `timeout`) stops a command as
    Ctrl-C does: watch flushes and closes its record, collect keeps its parts. `serve`'s
    uvicorn installs its own handlers while it runs."""
    signal.signal(signal.SIGTERM, _interrupt)
    app()
