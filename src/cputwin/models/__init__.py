"""Models: LightGBM base models (one per feature set) and the time-ordered stack."""

from cputwin.models.base import SEED_PARAMS, BaseModel
from cputwin.models.stack import TwinStack

__all__ = ["SEED_PARAMS", "BaseModel", "TwinStack"]
