"""Models: LightGBM base models (one per feature set) and the time-ordered stack."""

from cputwin.models.base import BUILTIN_BASES, PRESETS, SEED_PARAMS, BaseSpec, LightGBMModel
from cputwin.models.stack import TwinStack

__all__ = ["BUILTIN_BASES", "PRESETS", "SEED_PARAMS", "BaseSpec", "LightGBMModel", "TwinStack"]
