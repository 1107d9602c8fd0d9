"""The twin file: gzip-compressed JSON, checked before anything in it is used.

Layout: {"format": "cputwin-twin", "format_version": 1, "payload_sha256": ...,
"payload": {...}}. The payload holds LightGBM text models, the linear meta-model's
weights, the anomaly detector's calibration, feature specs, workload categories, the
schema, a fingerprint of the training files, metrics and package versions. Nothing is unpickled or executed: a
truncated file fails gzip's CRC or JSON parsing, an edited one fails the checksum.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from importlib.metadata import version
from pathlib import Path
from typing import Any

from cputwin.errors import ArtifactError
from cputwin.models import TwinStack

FORMAT = "cputwin-twin"
FORMAT_VERSION = 1
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


def save_twin(
    stack: TwinStack, path: Path, *, training: dict[str, Any], metrics: dict[str, Any],
    detector: dict[str, Any] | None = None,
) -> Path:
    payload = {
        "stack": stack.to_dict(),
        "detector": detector,
        "training": training,
        "metrics": metrics,
        "versions": {p: version(p) for p in PACKAGES},
    }
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "payload_sha256": hashlib.sha256(_canonical(payload)).hexdigest(),
        "payload": payload,
    }
    data = gzip.compress(json.dumps(doc).encode(), compresslevel=6, mtime=0)
    tmp = Path(f"{path}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # never leave a half-written twin under the real name
    return path


def read_payload(path: Path) -> dict[str, Any]:
    """The verified payload of a twin file; ArtifactError for anything untrustworthy."""
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
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a cputwin twin file")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: twin format version {doc.get('format_version')!r} is not supported "
            f"(this cputwin reads {FORMAT_VERSION})"
        )
    payload = doc.get("payload")
    if not isinstance(payload, dict) or (
        hashlib.sha256(_canonical(payload)).hexdigest() != doc.get("payload_sha256")
    ):
        raise ArtifactError(f"{path}: checksum mismatch: the file was edited or damaged")
    return payload


def load_twin(path: Path) -> tuple[TwinStack, dict[str, Any]]:
    """Load a twin: the fitted stack, and the payload's metadata."""
    payload = read_payload(path)
    try:
        stack = TwinStack.from_dict(payload["stack"])
    except Exception as exc:  # a well-formed but inconsistent payload
        raise ArtifactError(f"{path}: twin content is inconsistent ({type(exc).__name__})") from None
    return stack, payload
