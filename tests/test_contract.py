"""The input contract: one place that says what a twin may be given."""

from __future__ import annotations

import numpy as np
import pytest

from cputwin.errors import DataError
from cputwin.models.contract import ContractError, InputContract


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
    from cputwin import TwinStack

    twin = TwinStack(bases=["physics_linear"], mode="independent").fit(sample_frame)
    stated = twin.to_dict()["contract"]
    assert stated["n_cores"] == 2 and stated["targets"] == ["cpu_util_core_0"]
    assert stated["mode"] == "independent" and stated["reads_workload_cpu"] is False
    assert stated["step_s"] == pytest.approx(0.1, rel=0.05)
