"""cputwin: a digital twin of a machine's CPU cores, learned from per-core telemetry."""

from cputwin.errors import CputwinError
from cputwin.features import FeatureSpec, build_features, get_spec
from cputwin.models import TwinStack
from cputwin.telemetry import load_runs

__version__ = "0.1.0"

__all__ = ["CputwinError", "FeatureSpec", "TwinStack", "__version__", "build_features",
           "get_spec", "load_runs"]
