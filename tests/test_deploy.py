"""The Prometheus rules and the Grafana dashboard in deploy/, checked by promtool and
against the metric names the service really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed "
                                    "(Debian package 'prometheus'; .ci/run installs it)")


def _promtool(*args: str, cwd: Path | None = None) -> None:
    r = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_rules_pass_promtool_check():
    _promtool("check", "rules", str(DEPLOY / "prometheus" / "cputwin-rules.yml"))


@needs_promtool
def test_rules_pass_their_unit_tests():
    _promtool("test", "rules", "cputwin-rules.test.yml", cwd=DEPLOY / "prometheus")


def _dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "cputwin.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    exprs = _dashboard_exprs()
    assert exprs
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:q{i}", "expr": e.replace("$stream", ".*").replace("$core", ".*")}
        for i, e in enumerate(exprs)]}]}
    (tmp_path / "q.yml").write_text(json.dumps(rules))  # JSON is YAML
    _promtool("check", "rules", str(tmp_path / "q.yml"))


def test_rules_and_dashboard_name_only_metrics_the_service_exports(roomy_metrics):
    exported = set(re.findall(r"^# TYPE (\w+) (\w+)", roomy_metrics, re.M))
    names = {n for n, _ in exported}
    names |= {f"{n}_total" for n, kind in exported if kind == "counter"}
    names |= {f"{n}_{s}" for n, kind in exported if kind == "histogram"
              for s in ("bucket", "sum", "count")}
    text = (DEPLOY / "prometheus" / "cputwin-rules.yml").read_text() + "\n".join(_dashboard_exprs())
    used = set(re.findall(r"\b(cputwin_\w+)", text))
    assert used and used <= names, used - names


@pytest.fixture(scope="module")
def roomy_metrics(sample_data, tmp_path_factory):
    """The /metrics text of a real server that has seen one stream."""
    from cputwin.pipeline import train
    from test_serve import _sample, serving

    twin = tmp_path_factory.mktemp("deploy") / "t.cputwin"
    train(sample_data, twin, bases="seed", mode="independent")
    with serving(twin, alert_webhook="http://127.0.0.1:9/unused") as client:
        for i in range(30):
            client.post("/v1/streams/s/samples", json={"samples": [_sample(1 + i * 0.1)]})
        return client.get("/metrics").text
