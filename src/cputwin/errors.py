"""The one exception hierarchy of cputwin.

    CputwinError                 base: the CLI catches it once, prints one line, exits 2
    ├── DataError                telemetry that cannot be used (file, column, value problems)
    │   └── ContractError        input a twin cannot take (contract.py checks it)
    ├── FeatureError             a feature spec that cannot be built for the given data
    ├── ModelError               a model used before fit, or fed a frame it was not trained for
    │   └── NotFittedError       used before fit (also scikit-learn's NotFittedError)
    ├── ArtifactError            a twin file that is truncated, edited or not a twin at all
    ├── OutputError              an output that cannot be written (missing, read-only, full)
    └── WorkloadError            a workload that died while telemetry was being collected

Every message is a single line that names what was wrong and where.
"""

from sklearn.exceptions import NotFittedError as _SklearnNotFittedError


class CputwinError(Exception):
    """Base class for every error cputwin raises on purpose."""

    exit_code = 2


class DataError(CputwinError):
    """Telemetry that cannot be used as it is."""


class ContractError(DataError):
    """Input the twin cannot take: other cores, a missing or impossible value, a core that
    is not in the data, a reading the twin needs that the data lacks."""


class FeatureError(CputwinError):
    """A feature spec that does not fit the data."""


class ModelError(CputwinError):
    """A model misused: not fitted, or fed columns it does not know."""


class NotFittedError(ModelError, _SklearnNotFittedError):
    """A twin used before `fit` (scikit-learn's `check_is_fitted` contract)."""


class ArtifactError(CputwinError):
    """A twin file that cannot be trusted."""


class OutputError(CputwinError):
    """An output path that cannot be written: checked before the work, or failed during it."""


class WorkloadError(CputwinError):
    """A labelled workload that died during collection: its samples are not a normal run."""

    exit_code = 1
