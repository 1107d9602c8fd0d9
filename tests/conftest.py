from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED_DATA = ROOT.parent / "shared" / "seed-data" / "telemetry_v2"

# Small LightGBM settings so tests that fit many stacks stay quick.
FAST = {"v2.0": {"n_estimators": 40}, "v2.3": {"n_estimators": 40}}


@pytest.fixture(scope="session")
def seed_data() -> Path:
    if not SEED_DATA.is_dir():
        pytest.skip(f"seed telemetry not present at {SEED_DATA} (reference data lives in ../shared)")
    return SEED_DATA


@pytest.fixture(scope="session")
def sample_data() -> Path:
    from cputwin.pipeline import sample_path

    return sample_path()


@pytest.fixture(scope="session")
def sample_frame(sample_data):
    from cputwin import load_runs

    return load_runs(sample_data)
