"""The twin file: gzip-compressed JSON, checked before anything in it is used.

Layout: {"format": "cputwin-twin", "format_version": 2, "payload_sha256": ...,
"payload": {...}} and, when signed, "payload_hmac_sha256". The payload holds LightGBM
text models, the linear meta-model's weights, the anomaly detector's calibration, feature
specs, workload categories, the schema, a fingerprint of the training files, metrics and
package versions. Nothing is unpickled or executed: a truncated file fails gzip's CRC or
JSON parsing, a damaged one the checksum, and every block is checked before use (the
LightGBM texts before LightGBM parses them, `cputwin.models.lgbm_text`).

The sha256 checksum catches damage, not a deliberate edit: anyone can recompute it. A
twin saved with a key carries an HMAC-SHA256 of the payload, which only a holder of the
key can produce; `read_payload(path, key=...)` refuses a file without it or with a wrong one.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import math
import zlib
from importlib.metadata import version
from pathlib import Path
from typing import Any

from cputwin.errors import ArtifactError, CputwinError
from cputwin.models import TwinStack
from cputwin.output import write_atomic

FORMAT = "cputwin-twin"
FORMAT_VERSION = 2  # 2: a detector's settings in their own block
READS_VERSIONS = (1, 2)  # 1: settings beside the fitted state (Detector.from_dict reads both)
PACKAGES = ("cputwin", "lightgbm", "scikit-learn", "polars", "numpy")


def fingerprint(paths: list[Path]) -> dict[str, Any]:
    """sha256 of each training file and of them all (in order)."""
    files = {}
    total = hashlib.sha256()
    for p in paths:
        digest = hashlib.sha256(Path(p).read_bytes()).hexdigest()
        files[Path(p).name] = digest
        total.update(digest.encode())
    return {"sha256": total.hexdigest(), "files": files}


def _canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def _signature(payload_bytes: bytes, key: str | bytes) -> str:
    """HMAC-SHA256 of the canonical payload under `key` (a non-empty string or bytes)."""
    key = key.encode() if isinstance(key, str) else key
    if not key:
        raise ArtifactError("the signing key is empty")
    return hmac.new(key, payload_bytes, hashlib.sha256).hexdigest()


def save_twin(
    stack: TwinStack, path: Path, *, training: dict[str, Any], metrics: dict[str, Any],
    detector: dict[str, Any] | None = None, sign_key: str | bytes | None = None,
    detectors: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write the twin file, whole or not at all; with `sign_key`, signed (HMAC-SHA256).

    detector: a twin of one core's anomaly detector; detectors: a machine twin's, by core."""
    payload = {
        "stack": stack.to_dict(),
        "detector": detector,
        **({"detectors": detectors} if detectors is not None else {}),
        "training": training,
        "metrics": metrics,
        "versions": {p: version(p) for p in PACKAGES},
    }
    canonical = _canonical(payload)
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "payload_sha256": hashlib.sha256(canonical).hexdigest(),
        **({"payload_hmac_sha256": _signature(canonical, sign_key)} if sign_key is not None
           else {}),
        "payload": payload,
    }
    data = gzip.compress(json.dumps(doc).encode(), compresslevel=6, mtime=0)
    return write_atomic(Path(path), lambda tmp: tmp.write_bytes(data))


def read_payload(path: Path, key: str | bytes | None = None) -> dict[str, Any]:
    """The verified payload of a twin file; ArtifactError for anything untrustworthy.

    With `key`, the file must carry a signature made with that key; without one, a
    signature is not checked (the checksum still is)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read ({exc.strerror})") from None
    if raw[:2] != b"\x1f\x8b":
        raise ArtifactError(f"{path}: not a cputwin twin file")
    try:
        doc = json.loads(gzip.decompress(raw))
    except (EOFError, OSError, zlib.error):
        raise ArtifactError(f"{path}: file is truncated or corrupt") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{path}: not a cputwin twin file") from None
    except RecursionError:
        raise ArtifactError(f"{path}: not a cputwin twin file (nested too deeply)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a cputwin twin file")
    if doc.get("format_version") not in READS_VERSIONS:
        raise ArtifactError(
            f"{path}: twin format version {doc.get('format_version')!r} is not supported "
            f"(this cputwin reads {', '.join(map(str, READS_VERSIONS))})"
        )
    payload = doc.get("payload")
    canonical = _canonical(payload) if isinstance(payload, dict) else b""
    if not canonical or hashlib.sha256(canonical).hexdigest() != doc.get("payload_sha256"):
        raise ArtifactError(f"{path}: checksum mismatch: the file was edited or damaged")
    if key is not None:
        _verify(path, doc.get("payload_hmac_sha256"), _signature(canonical, key))
    return payload


def _verify(path: Path, signature: Any, expected: str) -> None:
    if signature is None:
        raise ArtifactError(f"{path}: the twin is not signed, and a signing key was given: "
                            "refusing it (train it with --sign-key)")
    if not isinstance(signature, str) or not hmac.compare_digest(signature, expected):
        raise ArtifactError(f"{path}: signature mismatch: the twin was edited after signing, "
                            "or signed with another key")


def load_twin(path: Path, key: str | bytes | None = None) -> tuple[TwinStack, dict[str, Any]]:
    """Load a twin: the fitted stack, and the payload's metadata (its detector block
    checked). `key`: the signing key the file must be signed with (`read_payload`)."""
    payload = read_payload(path, key)
    try:
        stack = TwinStack.from_dict(payload["stack"])
    except CputwinError as exc:  # a model text refused before LightGBM parsed it
        raise ArtifactError(f"{path}: {exc}") from None
    except Exception as exc:  # a well-formed but inconsistent payload
        raise ArtifactError(f"{path}: twin content is inconsistent ({type(exc).__name__})") from None
    blocks = {"": payload.get("detector")}
    per_core = payload.get("detectors")
    if per_core is not None:
        if not isinstance(per_core, dict) or set(per_core) != set(stack.targets_):
            raise ArtifactError(f"{path}: the anomaly detector block is malformed "
                                "(not one detector per core)")
        blocks.update({f" of {core}": block for core, block in per_core.items()})
    for where, block in blocks.items():
        problem = detector_problem(block)
        if problem:
            raise ArtifactError(f"{path}: the anomaly detector block{where} is malformed "
                                f"({problem})")
    return stack, payload


def _number(value: Any, *, positive: bool = False, infinite: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return False
    return (infinite or math.isfinite(value)) and (not positive or value > 0)


def detector_problem(block: Any) -> str | None:
    """What is wrong with a saved detector block (None: nothing; an absent block is fine).

    Checked at load, so a twin whose detector cannot work fails before `watch` samples or
    `serve` listens."""
    if block is None:
        return None
    from cputwin.live.detector import GLOBAL, SETTINGS, Detector

    if not isinstance(block, dict):
        return "not an object"
    if block and all(isinstance(v, dict) and "threshold" in v for v in block.values()):
        for core, one in block.items():  # a machine twin: one detector per core
            problem = detector_problem(one)
            if problem:
                return f"{core}: {problem}"
        return None
    settings = block.get("settings", {})
    if not isinstance(settings, dict):
        return "settings is not an object"
    block = {**settings, **{k: v for k, v in block.items() if k != "settings"}}
    unknown = set(block) - set(Detector.__dataclass_fields__) - SETTINGS
    if unknown:
        return f"unknown field {sorted(unknown)[0]!r}"
    checks = {
        "alpha": lambda v: _number(v, positive=True) and v <= 1,
        "raise_ticks": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "window_ticks": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "smoother": lambda v: v in ("median", "ewma"),
        "clear_ticks": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "false_alarms_per_hour": lambda v: _number(v, positive=True),
        "two_sided": lambda v: isinstance(v, bool),
        "clear_level": lambda v: _number(v, positive=True),
        "threshold": lambda v: _number(v, infinite=True),
        "centre": lambda v: _table(v, GLOBAL, positive=False),
        "scale": lambda v: _table(v, GLOBAL, positive=True),
        "calibration": lambda v: isinstance(v, dict),
    }
    for name in ("centre", "scale", "threshold"):
        if name not in block:
            return f"no {name}"
    for name, ok in checks.items():
        if name in block and not ok(block[name]):
            return f"{name} is {json.dumps(block[name])[:40]}"
    return None


def _table(value: Any, required: str, *, positive: bool) -> bool:
    """A {workload: finite number} map that has the `required` (global) entry."""
    return isinstance(value, dict) and required in value and all(
        _number(v, positive=positive) for v in value.values())
