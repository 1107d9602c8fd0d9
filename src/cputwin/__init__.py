"""cputwin: a digital twin of a machine's CPU cores, learned from per-core telemetry.

Heavy modules (LightGBM, scikit-learn, Polars) load on first use, so the collector and
`cputwin --help` start quickly.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CputwinError": "cputwin.errors",
    "FeatureSpec": "cputwin.features",
    "build_features": "cputwin.features",
    "get_spec": "cputwin.features",
    "TwinStack": "cputwin.models",
    "load_runs": "cputwin.telemetry.ingest",
    "load_twin": "cputwin.artifact",
    "open_twin": "cputwin.live.twin",
    "Twin": "cputwin.live.twin",
    "save_twin": "cputwin.artifact",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cputwin' has no attribute {name!r}")
