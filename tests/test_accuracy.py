"""The twin's accuracy on the seed data, honestly scored: a regression guard for issue 3.

Full-size models (a few seconds each on a 2-core machine); skipped where ../shared is absent.
"""

from __future__ import annotations

import warnings

import pytest

from cputwin.evaluation.protocols import evaluate_honest
from cputwin.pipeline import make_stack
from cputwin.telemetry.ingest import load_runs


@pytest.fixture(scope="module")
def seed_frame(seed_data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_runs(seed_data)


def test_sensor_twin_of_core_0_beats_every_base_and_reaches_0_935(seed_frame):
    evaluation, stack = evaluate_honest(seed_frame, make_stack("cpu_util_core_0", "twin", "sensor"))
    r2 = evaluation.summary.r2
    best_base = max(r2[b.name] for b in stack.base_specs_)
    assert r2["stack"] >= best_base - 0.002
    assert r2["stack"] >= 0.935
    assert stack.meta_.kind.startswith("auto:")


def test_independent_twin_of_core_0_reaches_0_73(seed_frame):
    evaluation, _ = evaluate_honest(seed_frame, make_stack("cpu_util_core_0", "twin", "independent"))
    assert evaluation.summary.r2["stack"] >= 0.73
