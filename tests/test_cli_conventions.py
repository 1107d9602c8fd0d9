"""The CLI's conventions: choices the parser checks, usual metavars, one spelling for
outputs (old ones still accepted), core numbers as targets, shell completion, output
readable at 80 columns, sober wording, and the Python API's defaults equal to the CLI's."""

from __future__ import annotations

import io
import json
import re
from typing import get_args

import pytest
from rich.console import Console
from typer.testing import CliRunner

from cputwin import cli
from cputwin.cli import app
from cputwin.evaluation.summary import (
    GroupScores,
    Headline,
    MetaSummary,
    ProtocolSummary,
    Rows,
    TargetsSummary,
)

runner = CliRunner()
COMMANDS = [["evaluate"], ["train"], ["predict"], ["collect"], ["recover"], ["demo"],
            ["watch"], ["serve"], ["import"], ["import", "prometheus"], []]
FAST = ["--bases", "physics_linear,gbm_l2", "--max-rounds", "10"]


def run(*args, columns: int = 80):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": str(columns)},
                         prog_name="cputwin")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "cputwin")
def test_help_uses_the_usual_metavars(command):
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert not re.search(r"<(str|bool|int|float|path|list\[str\])\b", text), text
    literal = text.replace("{id}", "").replace("{n}", "")  # a stream id; --columns' core number
    assert not re.search(r"\{[a-z_]+\}", literal), text  # {data}...
    assert all(len(line) <= 80 for line in text.splitlines()), text


def test_help_shows_arguments_and_choices_as_users_expect():
    evaluate = run("evaluate", "--help").stdout
    assert "Usage: cputwin evaluate [OPTIONS] DATA..." in evaluate
    assert "[honest|seed|both]" in evaluate and "[sensor|independent]" in evaluate
    assert "TEXT" in evaluate and "FLOAT" in evaluate and "PATH" in evaluate
    words = _words(evaluate)
    assert "top_mean" in words and "per_workload" in words  # --meta's choices, in its help
    assert "Usage: cputwin predict [OPTIONS] TWIN DATA..." in run("predict", "--help").stdout
    collect = _words(run("collect", "--help").stdout)
    assert "One of: all, cpu_bound, io_bound" in collect


def _words(text: str) -> str:
    """Help text without its box drawing, one space between words."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", text).split())


def test_the_parsers_choices_are_the_librarys():
    from cputwin.features.spec import MODES
    from cputwin.models.meta import META_KINDS
    from cputwin.pipeline import PROTOCOLS
    from cputwin.telemetry.workloads import WORKLOADS

    assert get_args(cli.ProtocolName) == PROTOCOLS
    assert get_args(cli.ModeName) == MODES
    assert get_args(cli.MetaName) == META_KINDS
    assert get_args(cli.WorkloadName) == ("all", *WORKLOADS)


@pytest.mark.parametrize(("args", "fragment"), [
    (["evaluate", "x.parquet", "--protocol", "magic"], "'magic' is not one of 'honest'"),
    (["evaluate", "x.parquet", "--mode", "psychic"], "'psychic' is not one of 'sensor'"),
    (["train", "x.parquet", "-o", "t.cputwin", "--meta", "median"], "'top_mean'"),
    (["collect", "--workload", "gpu"], "'gpu' is not one of 'all', 'cpu_bound'"),
    (["evaluate"], "missing argument 'DATA...'"),
    (["evaluate", "x.parquet", "--frobnicate"], "no such option: --frobnicate"),
])
def test_a_usage_mistake_is_one_line_and_exit_code_2(args, fragment):
    result = run(*args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cputwin "), result.stderr
    assert fragment in lines[0]
    assert result.stdout == ""


def test_the_old_output_spellings_still_work_but_are_not_shown(tmp_path):
    assert cli._unalias("--out", {"--out": "--output"}) == "--output"
    assert cli._unalias("--out=x", {"--out": "--output"}) == "--output=x"
    assert cli._unalias("--outside", {"--out": "--output"}) == "--outside"
    for command, old in [("collect", "--out"), ("demo", "--out"), ("evaluate", "--report"),
                         ("watch", "--record")]:
        text = run(command, "--help").stdout
        assert re.search(r"--output\s+-o\s", text), text
        assert not re.search(rf"{old}(?![-\w])", text), (command, old)
    # collect --out still names the folder (an idle run of a second, written there)
    result = run("collect", "--workload", "idle", "--seconds", "1", "--out", tmp_path / "a",
                 "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["runs"][0]["path"].startswith(str(tmp_path / "a"))


def test_target_takes_a_core_number_a_column_or_all():
    assert cli._target("3") == "cpu_util_core_3"
    assert cli._target("cpu_util_core_3") == "cpu_util_core_3"
    assert cli._target("all") == "all"


def test_a_core_number_target_trains_that_core(sample_data, tmp_path):
    result = run("train", sample_data, "-o", tmp_path / "t.cputwin", "--target", "1", *FAST,
                 "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["target"] == "cpu_util_core_1"
    missing = run("train", sample_data, "-o", tmp_path / "u.cputwin", "--target", "7")
    assert missing.exit_code == 2 and "cpu_util_core_7" in missing.stderr


def test_shell_completion_is_offered():
    root = run("--help").stdout
    assert "--install-completion" in root and "--show-completion" in root
    script = runner.invoke(app, ["--show-completion", "bash"], prog_name="cputwin")
    assert script.exit_code == 0 and "_CPUTWIN_COMPLETE" in script.stdout


@pytest.fixture(scope="module")
def evaluated(sample_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = run("evaluate", sample_data, *FAST, "-o", out)
    assert result.exit_code == 0, result.output
    return result.stdout, (out / "report.html").read_text()


def test_evaluate_reads_at_80_columns_and_soberly(evaluated):
    text, _ = evaluated
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert "MISSION ACCOMPLISHED" not in text and "BREAKTHROUGH" not in text
    assert "R² per workload" in text
    assert re.search(r"^stack: R² -?\d\.\d{4}, MAE", text, re.M)


def stack_summary(r2: float, mae: float, rmse: float = 1.0,
                  per_workload: dict[str, GroupScores] | None = None) -> ProtocolSummary:
    """A summary of the stack alone: what the renderers read."""
    return ProtocolSummary(
        protocol="honest", target="cpu_util_core_0", mode="sensor", bases=[],
        rows=Rows(train=80, test=20), r2={"stack": r2}, mae={"stack": mae},
        rmse={"stack": rmse}, per_workload=per_workload or {},
        meta=MetaSummary(kind="best", weights={}, intercept=0.0), verdict="")


def stack_group(r2: float, rmse: float, mae: float) -> GroupScores:
    return GroupScores(r2={"stack": r2}, mae={"stack": mae}, rmse={"stack": rmse}, rows=60)


def test_a_low_or_missing_workload_r2_is_explained():
    from cputwin.evaluation.report import workload_notes

    summary = stack_summary(0.96, 4.0, 5.0, per_workload={
        "idle": stack_group(0.19, 0.9, 0.5), "pinned": stack_group(float("nan"), 1.5, 1.2),
        "busy": stack_group(0.10, 19.0, 15.0), "fine": stack_group(0.90, 2.0, 1.0)})
    notes = workload_notes(summary)
    assert len(notes) == 3
    idle, pinned, busy = notes
    # sd = RMSE / sqrt(1 - R²): 0.9 / 0.9 = 1.00 points, against 5 / 0.2 = 25.00 overall
    assert idle.startswith("idle: R² 0.19 is low") and "sd 1.00 points" in idle
    assert "against 25.00" in idle and "varies little" in idle
    assert pinned.startswith("pinned: R² n/a") and "held one value" in pinned
    assert busy.startswith("busy: R² 0.10 is low") and "misses much of its variation" in busy


def test_a_core_that_never_moved_is_explained_in_the_every_core_table(monkeypatch):
    screen = Console(file=io.StringIO(), width=80, color_system=None)
    monkeypatch.setattr(cli, "out", screen)
    cli.render_targets(TargetsSummary(
        targets={"cpu_util_core_0": stack_summary(0.9, 2.0),
                 "cpu_util_core_1": stack_summary(float("nan"), 0.25)},
        mean=Headline(0.9, 1.1, 1.5)))
    text = " ".join(screen.file.getvalue().split())
    assert "cpu_util_core_1: R² n/a: the core held one value over its 20 test rows" in text
    assert "cpu_util_core_0: R² n/a" not in text


def test_the_report_page_says_what_it_was_made_from(evaluated):
    _, page = evaluated
    from cputwin import __version__

    assert f"cputwin {__version__}" in page
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", page)
    assert "data: <code>" in page and "sample" in page
    assert "command: <code>" in page
    assert "MISSION ACCOMPLISHED" not in page and "BREAKTHROUGH" not in page
    assert page.count("data:image/png;base64,") == 4


def test_report_plots_break_lines_at_gaps_and_mark_clipped_bars():
    import numpy as np

    from cputwin.evaluation import report

    t = np.array([0.0, 0.1, 0.2, 0.3, 5.0, 5.1])
    t2, y2 = report.with_gaps(t, np.arange(6.0))
    assert np.isnan(t2[4]) and np.isnan(y2[4]) and t2.size == 7
    assert np.array_equal(report.with_gaps(t[:4], np.arange(4.0))[0], t[:4])

    drawn = {}
    real_png = report._png

    def keep(fig):
        drawn["ax"] = fig.axes[0]
        return real_png(fig)

    summary = stack_summary(0.5, 1.0, per_workload={
        "a": stack_group(-3.5, 1.0, 1.0), "b": stack_group(float("nan"), 1.0, 1.0)})
    report._png = keep
    try:
        report.plot_r2_per_workload(summary, "t")
    finally:
        report._png = real_png
    ax = drawn["ax"]
    assert ax.patches[0].get_hatch() == "//" and ax.patches[0].get_height() == report.R2_FLOOR
    labels = [t.get_text() for t in ax.texts]
    assert "-3.5" in labels and "n/a" in labels
    assert any("cut" in t.get_text() for t in ax.get_legend().get_texts())


def test_errors_wrap_at_words_on_a_terminal_and_stay_one_line_when_piped(monkeypatch):
    text = ("error: " + "a problem described in many plain words " * 4).strip()
    terminal = Console(file=io.StringIO(), force_terminal=True, width=80, color_system=None)
    monkeypatch.setattr(cli, "err", terminal)
    cli.complain(text)
    lines = terminal.file.getvalue().splitlines()
    assert len(lines) > 1 and all(len(line) <= 80 for line in lines)
    assert " ".join(lines).split() == text.split()  # broken only between words
    piped = Console(file=io.StringIO(), width=80)
    monkeypatch.setattr(cli, "err", piped)
    cli.complain(text)
    assert piped.file.getvalue() == text + "\n"


def test_python_defaults_are_the_clis():
    from cputwin import TwinStack, load_twin
    from cputwin.artifact import load_twin as artifact_load_twin
    from cputwin.pipeline import make_stack

    assert load_twin is artifact_load_twin
    ours, theirs = TwinStack().get_params(), make_stack().get_params()
    assert ours == theirs
    assert ours["bases"] == "twin" and ours["meta_model"] == "auto"


def test_demo_fits_once_and_says_how_long_first(tmp_path, monkeypatch):
    from cputwin.models.stack import TwinStack

    fits = []
    real_fit = TwinStack.fit

    def counted(self, *args, **kwargs):
        fits.append(self.target)
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(TwinStack, "fit", counted)
    result = run("demo", "-o", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    assert fits == ["cpu_util_core_0"]
    first = result.stderr.splitlines()[0]
    assert re.match(r"demo: one fit of the twin on \d+ rows, about \d+ (s|min) on \d+ idle cores", first)
    assert (tmp_path / "demo" / "twin.cputwin").is_file()
    assert (tmp_path / "demo" / "report.html").is_file()
    prose = [line for line in result.stdout.splitlines()
             if not line.startswith(("data:", "report:", "twin:"))]  # paths are never broken
    assert all(len(line) <= 80 for line in prose), result.stdout
