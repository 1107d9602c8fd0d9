"""The input contract: one place that says what a twin may be given."""

from __future__ import annotations

import numpy as np
import pytest

from cputwin import TwinStack
from cputwin.contract import ContractError, InputContract
from cputwin.errors import DataError
from cputwin.features import build_features, get_spec


def contract(**changes) -> InputContract:
    base = dict(n_cores=2, targets=("cpu_util_core_0",), mode="independent",
                workloads=("idle",), hosts=(), reads_workload_cpu=True, portable=False,
                step_s=0.1)
    return InputContract(**{**base, **changes})


def test_core_count_is_checked_unless_the_twin_is_portable():
    with pytest.raises(ContractError, match="trained on 2 cores, this machine has 4"):
        contract().check_core_count(4, "this machine")
    contract(portable=True).check_core_count(4)
    assert issubclass(ContractError, DataError)  # one line and exit 2 at the CLI


def test_a_sample_gives_every_core_as_a_utilisation():
    c = contract()
    np.testing.assert_array_equal(
        c.sample_cores({"cpu_util_core_0": 1, "cpu_util_core_1": 99.5}, 0), [1.0, 99.5])
    for values, message in (({"cpu_util_core_0": 1}, "missing column 'cpu_util_core_1'"),
                            ({"cpu_util_core_0": 1, "cpu_util_core_1": 2,
                              "cpu_util_core_2": 3}, "core count does not match"),
                            ({"cpu_util_core_0": 101, "cpu_util_core_1": 2}, "outside"),
                            ({"cpu_util_core_0": True, "cpu_util_core_1": 2}, "a number"),
                            ({"cpu_util_core_0": float("nan"), "cpu_util_core_1": 2},
                             "a number")):
        with pytest.raises(ContractError, match=message):
            c.sample_cores(values, 0)


def test_a_twin_that_reads_the_workloads_cpu_use_gets_it():
    c = contract()
    c.check_sample_workload_cpu(None, True, 0)  # measured as missing: allowed
    with pytest.raises(ContractError, match="missing 'workload_cpu_percent'"):
        c.check_sample_workload_cpu(None, False, 0)
    with pytest.raises(ContractError, match="above 200"):
        c.check_sample_workload_cpu(250.0, True, 0)
    contract(reads_workload_cpu=False).check_sample_workload_cpu(None, False, 0)
    with pytest.raises(ContractError, match="reads the workload's own CPU use"):
        c.check_workload_cpu_source(False, "give the process id of the workload")


def test_a_fitted_twin_states_its_contract(sample_frame):
    twin = TwinStack(bases=["physics_linear"], mode="independent").fit(sample_frame)
    stated = twin.to_dict()["contract"]
    assert stated["n_cores"] == 2 and stated["targets"] == ["cpu_util_core_0"]
    assert stated["mode"] == "independent" and stated["reads_workload_cpu"] is False
    assert stated["step_s"] == pytest.approx(0.1, rel=0.05)


def fit_other_core(frame):
    return TwinStack(target="cpu_util_core_7", bases=["physics_linear"]).fit(frame)


def features_without_workload_cpu(frame):
    return build_features(frame.drop("workload_cpu_percent", strict=False),
                          get_spec("pooled_wcpu"), "cpu_util_core_0", ["idle"])


@pytest.mark.parametrize(("fit", "fragment"), [
    (fit_other_core, "target 'cpu_util_core_7' is not a core of this data"),
    (features_without_workload_cpu, "reads 'workload_cpu_percent'.*which this data does not have"),
])
def test_fit_time_checks_raise_the_contracts_error(sample_frame, fit, fragment):
    """Before a contract exists, the data is checked against the same rules, with the
    same exception (a DataError: one line and exit 2 at the CLI), naming no CLI flag."""
    with pytest.raises(ContractError, match=fragment) as raised:
        fit(sample_frame)
    assert "--" not in str(raised.value)


def test_a_target_that_is_not_a_core_is_one_line_at_the_cli(sample_data, tmp_path):
    from typer.testing import CliRunner

    from cputwin.cli import app

    result = CliRunner().invoke(app, ["train", str(sample_data), "-o", str(tmp_path / "t.cputwin"),
                                      "--target", "cpu_util_core_9"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: target 'cpu_util_core_9' is not a core of this data: expected one of "
        "cpu_util_core_0 … cpu_util_core_1"]
