"""TwinStack under scikit-learn's estimator contract, where it claims it."""

from __future__ import annotations

import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError as SklearnNotFittedError
from sklearn.linear_model import Ridge
from sklearn.utils import estimator_checks as checks
from sklearn.utils.validation import check_is_fitted

from cputwin import TwinStack
from cputwin.errors import ModelError, NotFittedError
from cputwin.models import BUILTIN_BASES

FAST = {name: {"n_estimators": 20} for name in BUILTIN_BASES}

# the checks that apply to an estimator fed a telemetry frame instead of an array
APPLICABLE = [checks.check_no_attributes_set_in_init, checks.check_parameters_default_constructible,
              checks.check_get_params_invariance, checks.check_set_params,
              checks.check_estimator_repr, checks.check_estimator_cloneable,
              checks.check_do_not_raise_errors_in_init_or_set_params,
              checks.check_estimator_tags_renamed]


@pytest.mark.parametrize("check", APPLICABLE, ids=lambda c: c.__name__)
def test_scikit_learn_checks_that_apply(check):
    check("TwinStack", TwinStack())


def test_an_unfitted_twin_says_so_as_scikit_learn_expects(sample_frame):
    twin = TwinStack()
    with pytest.raises(NotFittedError, match="not fitted"):
        twin.predict(sample_frame)
    with pytest.raises(SklearnNotFittedError):
        check_is_fitted(twin)
    assert issubclass(NotFittedError, ModelError)  # the CLI's one-line error path


def test_the_tags_say_a_frame_goes_in_and_no_y():
    tags = TwinStack().__sklearn_tags__()
    assert not tags.input_tags.two_d_array and tags.input_tags.string
    assert not tags.target_tags.required


@pytest.mark.parametrize("meta", ["auto", "ridge", Ridge(alpha=3.0)], ids=str)
def test_a_reloaded_twin_keeps_its_parameters_and_refits(sample_frame, meta):
    twin = TwinStack(bases=["physics_linear", "gbm_l2"], meta_model=meta,
                     base_params=FAST).fit(sample_frame)
    check_is_fitted(twin)
    again = TwinStack.from_dict(twin.to_dict())
    before, after = twin.get_params(), again.get_params()
    if isinstance(meta, Ridge):
        assert type(after["meta_model"]) is Ridge
        assert after["meta_model"].get_params() == meta.get_params()
        before.pop("meta_model"), after.pop("meta_model")
    assert after == before
    refit = clone(again).fit(sample_frame)  # the parameters are valid ones
    assert refit.predict(sample_frame).shape == (sample_frame.height,)


def test_the_library_and_cli_run_without_pandas(sample_data, tmp_path):
    """pandas is a test dependency only (the feature reference): train, evaluate and
    predict work with it unimportable."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "import importlib.abc, importlib.machinery\n"
        "class NoPandas(importlib.abc.MetaPathFinder, importlib.abc.Loader):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'pandas':\n"
        "            return importlib.machinery.ModuleSpec(name, self)\n"
        "    def create_module(self, spec):\n"
        "        raise ImportError('pandas is not installed')\n"
        "    def exec_module(self, module):\n"
        "        raise ImportError('pandas is not installed')\n"
        "sys.meta_path.insert(0, NoPandas())\n"
        "from cputwin.cli import main\n"
        "sys.argv = ['cputwin', *sys.argv[1:]]\n"
        "main()\n")
    twin = tmp_path / "t.cputwin"
    for args in (["evaluate", str(sample_data), "--bases", "physics_linear", "--json"],
                 ["train", str(sample_data), "--bases", "physics_linear", "-o", str(twin)],
                 ["predict", str(twin), str(sample_data), "-o", str(tmp_path / "p.parquet")]):
        done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
