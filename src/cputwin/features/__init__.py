"""Features: declarative specs (lags, windows, columns) compiled to Polars, computed per run."""

from cputwin.features.engine import FeatureMatrix, build_features, compile_spec
from cputwin.features.spec import BUILTIN_SPECS, FeatureSpec, get_spec

__all__ = ["BUILTIN_SPECS", "FeatureMatrix", "FeatureSpec", "build_features", "compile_spec", "get_spec"]
