from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from cputwin import TwinStack
from cputwin.artifact import load_twin, read_payload, save_twin
from cputwin.errors import ArtifactError
from cputwin.models import BUILTIN_BASES


@pytest.fixture(scope="module")
def twin_file(tmp_path_factory, sample_frame):
    fast = {name: {"n_estimators": 30} for name in BUILTIN_BASES}
    stack = TwinStack(bases="twin", base_params=fast, meta_model="auto").fit(sample_frame)
    path = tmp_path_factory.mktemp("twin") / "t.cputwin"
    save_twin(stack, path, training={"rows": sample_frame.height}, metrics={})
    return stack, path


def test_round_trip_gives_the_same_predictions(twin_file, sample_frame):
    stack, path = twin_file
    loaded, payload = load_twin(path)
    a, b = stack.predict(sample_frame), loaded.predict(sample_frame)
    ok = ~np.isnan(a)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a[ok], b[ok], rtol=0, atol=1e-9)
    assert loaded.meta_weights_ == stack.meta_weights_
    assert loaded.meta_.kind == stack.meta_.kind and loaded.mode == "sensor"
    assert payload["stack"]["n_cores"] == stack.schema_.n_cores
    assert set(payload["versions"]) >= {"cputwin", "lightgbm"}


def test_file_holds_text_models_and_json_not_pickles(twin_file):
    _, path = twin_file
    doc = json.loads(gzip.decompress(path.read_bytes()))
    models = [b["model"] for b in doc["payload"]["stack"]["bases"]]
    assert {m["learner"] for m in models} == {"lgbm", "linear"}
    assert all(m["lightgbm_model"].startswith("tree\n") for m in models if m["learner"] == "lgbm")
    assert b"pickle" not in path.read_bytes()


def _rewrite(path, tmp_path, edit):
    doc = json.loads(gzip.decompress(path.read_bytes()))
    edit(doc)
    out = tmp_path / "edited.cputwin"
    out.write_bytes(gzip.compress(json.dumps(doc).encode()))
    return out


def test_truncated_file(twin_file, tmp_path):
    _, path = twin_file
    cut = tmp_path / "cut.cputwin"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        load_twin(cut)


def test_edited_payload_fails_the_checksum(twin_file, tmp_path):
    _, path = twin_file

    def edit(doc):
        doc["payload"]["stack"]["meta"]["intercepts"]["*"] += 1.0

    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_twin(_rewrite(path, tmp_path, edit))


@pytest.mark.parametrize(("content", "fragment"), [
    (b"", "not a cputwin twin"),
    (b"\x80\x04\x95 a pickle stream", "not a cputwin twin"),
    (gzip.compress(b'{"format": "something-else"}'), "not a cputwin twin"),
    (gzip.compress(b"[1, 2, 3]"), "not a cputwin twin"),
    (gzip.compress(b"not json"), "not a cputwin twin"),
    (gzip.compress(b'{"format": "cputwin-twin", "format_version": 99}'), "version 99"),
])
def test_foreign_files_are_refused(tmp_path, content, fragment):
    path = tmp_path / "foreign.cputwin"
    path.write_bytes(content)
    with pytest.raises(ArtifactError, match=fragment):
        read_payload(path)


def test_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="cannot read"):
        load_twin(tmp_path / "nope.cputwin")
