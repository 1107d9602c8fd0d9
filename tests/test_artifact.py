from __future__ import annotations

import gzip
import hashlib
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


def _rehashed(path, tmp_path, edit):
    """An edit whose author recomputed the checksum: what a deliberate editor does."""
    from cputwin.artifact import _canonical

    doc = json.loads(gzip.decompress(path.read_bytes()))
    edit(doc["payload"])
    doc["payload_sha256"] = hashlib.sha256(_canonical(doc["payload"])).hexdigest()
    out = tmp_path / "rehashed.cputwin"
    out.write_bytes(gzip.compress(json.dumps(doc).encode()))
    return out


def test_a_key_signs_and_verifies_the_twin(twin_file, tmp_path):
    stack, _ = twin_file
    signed = save_twin(stack, tmp_path / "s.cputwin", training={}, metrics={}, sign_key="k1")
    load_twin(signed, key="k1")
    load_twin(signed, key=b"k1")
    load_twin(signed)  # without a key the signature is not checked
    with pytest.raises(ArtifactError, match="signature mismatch"):
        load_twin(signed, key="k2")
    with pytest.raises(ArtifactError, match="is not signed"):
        load_twin(twin_file[1], key="k1")
    with pytest.raises(ArtifactError, match="signing key is empty"):
        load_twin(signed, key="")


def test_a_recomputed_checksum_passes_without_a_key_and_fails_with_one(twin_file, tmp_path):
    stack, _ = twin_file
    signed = save_twin(stack, tmp_path / "s.cputwin", training={}, metrics={}, sign_key="k1")

    def plus_42(payload):
        payload["stack"]["meta"]["intercepts"]["*"] += 42.0

    edited = _rehashed(signed, tmp_path, plus_42)
    loaded, _ = load_twin(edited)  # the checksum cannot tell: it guards against damage only
    assert loaded.meta_intercept_ == pytest.approx(stack.meta_intercept_ + 42.0)
    with pytest.raises(ArtifactError, match="signature mismatch"):
        load_twin(edited, key="k1")


def test_save_leaves_no_temporary_file(twin_file, tmp_path):
    stack, _ = twin_file
    save_twin(stack, tmp_path / "t.cputwin", training={}, metrics={})
    assert [p.name for p in tmp_path.iterdir()] == ["t.cputwin"]


def test_deep_nesting_is_refused_not_a_recursion_error(tmp_path):
    path = tmp_path / "deep.cputwin"
    path.write_bytes(gzip.compress(b"[" * 100_000 + b"]" * 100_000))
    with pytest.raises(ArtifactError, match="nested too deeply"):
        read_payload(path)


@pytest.mark.parametrize("detector", [
    "3.0", {"threshold": 3.0}, {"centre": {"*": 0.0}, "scale": {"io": 1.0}, "threshold": 3.0},
    {"centre": {"*": float("nan")}, "scale": {"*": 1.0}, "threshold": 3.0},
    {"centre": {"*": 0.0}, "scale": {"*": -1.0}, "threshold": 3.0},
    {"centre": {"*": 0.0}, "scale": {"*": 1.0}, "threshold": 3.0, "alpha": 2.0},
    {"centre": {"*": 0.0}, "scale": {"*": 1.0}, "threshold": 3.0, "oops": 1},
    {"centre": {"*": 0.0}, "scale": {"*": 1.0}, "threshold": 3.0, "settings": "median"},
    {"centre": {"*": 0.0}, "scale": {"*": 1.0}, "threshold": 3.0,
     "settings": {"smoother": "mean"}},
    {"centre": {"*": 0.0}, "scale": {"*": 1.0}, "threshold": 3.0, "settings": {"oops": 1}},
    {"centre": {"*": 0.0}, "scale": {"*": 1.0}, "threshold": 3.0, "window_ticks": 0},
    {"cpu_util_core_0": {"centre": {"*": 0.0}, "scale": {"*": 1.0}, "threshold": 3.0},
     "cpu_util_core_1": {"threshold": 3.0}},
])
def test_a_malformed_detector_block_is_refused(twin_file, tmp_path, detector):
    stack, _ = twin_file
    path = save_twin(stack, tmp_path / "d.cputwin", training={}, metrics={}, detector=detector)
    with pytest.raises(ArtifactError, match="anomaly detector block is malformed"):
        load_twin(path)


def test_a_detector_per_core_is_accepted(twin_file, tmp_path):
    stack, _ = twin_file
    one = {"centre": {"*": 0.0}, "scale": {"*": 1.0}, "threshold": float("inf")}
    path = save_twin(stack, tmp_path / "d.cputwin", training={}, metrics={},
                     detector={"cpu_util_core_0": one, "cpu_util_core_1": one})
    load_twin(path)


def test_a_version_1_file_with_settings_beside_the_fitted_state_still_loads(twin_file,
                                                                           tmp_path):
    from cputwin.live.detector import Detector
    from cputwin.live.twin import open_twin

    stack, _ = twin_file
    det = Detector(threshold=3.0, centre={"*": 0.0}, scale={"*": 2.0}, raise_ticks=5)
    path = save_twin(stack, tmp_path / "v2.cputwin", training={}, metrics={},
                     detector=det.to_dict())

    def as_version_1(payload):
        block = payload["detector"]
        block.update(block.pop("settings"))
        del block["smoother"]  # version-1 files scored with an EWMA

    old = _rehashed(path, tmp_path, as_version_1)
    doc = json.loads(gzip.decompress(old.read_bytes()))
    doc["format_version"] = 1
    old.write_bytes(gzip.compress(json.dumps(doc).encode()))
    loaded = open_twin(old).detector
    assert loaded.settings.smoother == "ewma" and loaded.raise_ticks == 5
    assert loaded.threshold == 3.0 and loaded.scale == {"*": 2.0}
