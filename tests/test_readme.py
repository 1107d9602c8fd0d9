"""Every `cputwin` command in the README's shell blocks runs and exits 0.

A renamed option, a changed default or a command that needs a new argument would
otherwise break the documented path silently. The commands run through the real CLI in a
temporary folder, with small inputs where the README's would take minutes: `telemetry/`
is the embedded sample, `collect` records half a second per workload into its own
folder, training is capped at 20 boosting rounds, `watch` stops after 2 s, and `serve`
runs on a free port until it has answered the README's curl example.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FAST_ROUNDS = "20"


def shell_blocks(text: str) -> list[str]:
    """The ```sh fenced blocks of a Markdown text, with line continuations joined."""
    blocks = re.findall(r"^```(?:sh|bash|console)\n(.*?)^```", text, flags=re.M | re.S)
    return [block.replace("\\\n", " ") for block in blocks]


def readme_commands(text: str) -> list[list[str]]:
    """Each `cputwin ...` line of the shell blocks, split as the shell would, comments off."""
    commands = []
    for block in shell_blocks(text):
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("cputwin "):
                commands.append(shlex.split(line, comments=True)[1:])
    return commands


def curl_body(text: str) -> tuple[str, dict]:
    """The path and JSON body of the README's curl example."""
    for block in shell_blocks(text):
        words = shlex.split(block, comments=True)
        if words[:1] == ["curl"]:
            url = next(w for w in words if w.startswith("localhost:"))
            return url.split("/", 1)[1], json.loads(words[words.index("-d") + 1])
    raise AssertionError("README has no curl example")


def option(args: list[str], *names: str) -> str | None:
    for i, a in enumerate(args[:-1]):
        if a in names:
            return args[i + 1]
    return None


def replace_option(args: list[str], names: tuple[str, ...], value: str) -> list[str]:
    """args with the option's value set to `value` (appended where it is absent)."""
    out = list(args)
    for i, a in enumerate(out[:-1]):
        if a in names:
            out[i + 1] = value
            return out
    return [*out, names[0], value]


def small(args: list[str]) -> list[str]:
    """The command with inputs small enough for a test."""
    command = args[0]
    if command == "collect":
        args = replace_option(args, ("--seconds",), "0.5")
        return replace_option(args, ("-o", "--output", "--out"), "collected")
    if command in ("train", "evaluate") and "--max-rounds" not in args:
        return [*args, "--max-rounds", FAST_ROUNDS]
    if command == "watch":
        return replace_option(args, ("--seconds",), "2")
    return args


COMMANDS = readme_commands(README.read_text())
PRODUCERS = {option(a, "-o", "--output"): a for a in COMMANDS if a[0] == "train"}


def cli(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cputwin", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=180, **kw)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, sample_data) -> Path:
    """A folder where `telemetry/` holds the embedded sample's runs."""
    here = tmp_path_factory.mktemp("readme")
    shutil.copytree(sample_data, here / "telemetry")
    return here


def ensure_inputs(args: list[str], cwd: Path) -> None:
    """Train the twins a command reads, by the README's own train command, if not yet there."""
    for arg in args[1:]:
        if arg in PRODUCERS and not (cwd / arg).exists() and PRODUCERS[arg] is not args:
            done = cli(small(PRODUCERS[arg]), cwd)
            assert done.returncode == 0, done.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_post(args: list[str], cwd: Path) -> int:
    """Run `serve` on a free port, post the README's curl example, stop it with SIGTERM."""
    port = free_port()
    args = replace_option(args, ("--port",), str(port))
    proc = subprocess.Popen([sys.executable, "-m", "cputwin", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path, body = curl_body(README.read_text())
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "serve did not answer /healthz within 60 s"
                time.sleep(0.2)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/{path}",
                                         data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
            assert "results" in json.loads(answer.read())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return proc.returncode


def test_the_readme_documents_the_main_commands():
    documented = {a[0] for a in COMMANDS}
    assert {"collect", "train", "evaluate", "watch", "serve"} <= documented, documented


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a) for a in COMMANDS])
def test_a_readme_command_runs(args, workdir):
    ensure_inputs(args, workdir)
    if args[0] == "serve":
        # stopped by SIGTERM, serve exits as Ctrl-C does (130); a crash is anything else
        assert serve_and_post(args, workdir) in (0, 130)
        return
    done = cli(small(args), workdir)
    assert done.returncode == 0, f"cputwin {' '.join(small(args))}\n{done.stderr}"
    if args[0] == "collect":
        assert list((workdir / "collected").glob("*.parquet")), done.stderr
