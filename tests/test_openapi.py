"""schemathesis against the served OpenAPI document, on a real server on loopback:
no 5xx and every answer as the document says (30 examples per operation)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402


@pytest.fixture(scope="module")
def api(sample_data, tmp_path_factory):
    from cputwin.pipeline import train
    from test_serve import serving

    twin = tmp_path_factory.mktemp("openapi") / "t.cputwin"
    train(sample_data, twin, bases="seed", mode="independent")
    with serving(twin, max_streams=50, stream_ttl_s=5) as client:
        yield schemathesis.openapi.from_url(f"{client.base_url}/openapi.json")


def test_no_server_error_and_answers_match_the_document(api):
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 4
    for operation in operations:
        @given(operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def check(case) -> None:
            case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])

        check()
