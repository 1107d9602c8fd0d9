"""A saved twin opened for use: its stack, its anomaly detector(s) and its payload.

This is what every live consumer (`watch`, `serve`, `predict`) opens; it sits beside
them, above the artifact layer, so nothing live reaches up into the pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cputwin.artifact import load_twin
from cputwin.live.detector import Detector
from cputwin.models import TwinStack


@dataclass(frozen=True)
class Twin:
    """stack: the fitted `TwinStack`; detector: its calibrated `Detector` (a machine twin:
    one per core, by core column; None when not calibrated); payload: the file's payload
    (metrics, training fingerprint, versions). Unpacks as (stack, detector, payload)."""

    stack: TwinStack
    detector: Detector | dict[str, Detector] | None
    payload: dict[str, Any]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.stack, self.detector, self.payload))

    @property
    def detectors(self) -> dict[str, Detector]:
        """Every watched core's detector, by core column (empty when not calibrated)."""
        if self.detector is None:
            return {}
        if isinstance(self.detector, Detector):
            return {self.stack.target: self.detector}
        return dict(self.detector)


def open_twin(path: Path, key: str | bytes | None = None) -> Twin:
    """A saved twin, checked (`load_twin`), with its detector(s) rebuilt.

    key: the signing key the twin must be signed with."""
    stack, payload = load_twin(Path(path), key)
    if payload.get("detectors"):
        detector: Detector | dict[str, Detector] | None = {
            core: Detector.from_dict(d) for core, d in payload["detectors"].items()}
    else:
        detector = Detector.from_dict(payload["detector"]) if payload.get("detector") else None
    return Twin(stack, detector, payload)
