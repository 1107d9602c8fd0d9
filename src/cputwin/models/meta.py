"""Meta-models: how the stack combines its bases' predictions.

All are linear in the base predictions, so they persist as numbers. `auto` chooses
among them by a forward-chaining score over the out-of-fold blocks (fit on earlier
blocks, score on the next), never by the test period.

    ridge         RidgeCV with intercept (the seed's meta-model)
    nnls          non-negative weights, free intercept
    best          the single base with the lowest out-of-fold error
    average       equal weights
    top_mean      equal weights on the k bases with the lowest error, k chosen on the fit rows
    per_workload  non-negative weights fitted per workload (global weights for others); a
                  workload's weights sum to 1 and it adds its own intercept, so the twin
                  still follows its bases there: were they free, a workload whose target
                  sat still through training (a single-threaded job the scheduler kept on
                  the target core) fits weights 0 and a constant, and the twin would go on
                  predicting that constant after the job moved to another core
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import nnls
from sklearn.base import clone
from sklearn.linear_model import RidgeCV

from cputwin.errors import ModelError
from cputwin.telemetry.schema import factorize

META_KINDS = ("auto", "ridge", "nnls", "best", "average", "top_mean", "per_workload")
AUTO_CANDIDATES = ("best", "top_mean", "average", "nnls", "ridge", "per_workload")  # simplest first
GLOBAL = "*"
MIN_ROWS_PER_WORKLOAD = 50


@dataclass
class LinearMeta:
    """weights[group] · predictions + intercepts[group]; group is a workload or '*'."""

    kind: str
    names: list[str]
    weights: dict[str, np.ndarray]
    intercepts: dict[str, float]

    def predict(self, P: np.ndarray, workloads: np.ndarray | None = None) -> np.ndarray:
        """The combined prediction, bounded to a utilisation's range [0, 100] (a linear
        combination extrapolates past it where a workload sits where training never saw
        it; NaN stays NaN)."""
        out = self.intercepts[GLOBAL] + P @ self.weights[GLOBAL]
        if workloads is not None and len(self.weights) > 1:
            for group, w in self.weights.items():
                rows = workloads == group
                if group != GLOBAL and rows.any():
                    out[rows] = self.intercepts[group] + P[rows] @ w
        return np.minimum(np.maximum(out, 0.0), 100.0)

    def __post_init__(self) -> None:
        # the weights as Python floats: for a tick, a NumPy dot product (and the array it
        # needs) costs twice this sum (1.7 against 0.8 µs)
        self._row_weights = {g: [float(v) for v in w] for g, w in self.weights.items()}

    def predict_one(self, p: Sequence[float], workload: str) -> float:
        """One row of base predictions (a live tick): `predict` without the batch set-up."""
        group = workload if workload in self._row_weights else GLOBAL
        total = 0.0
        for weight, value in zip(self._row_weights[group], p, strict=True):
            total += weight * value
        value = self.intercepts[group] + total
        return value if 0.0 <= value <= 100.0 else (0.0 if value < 0.0 else
                                                      100.0 if value > 100.0 else value)

    def predict_rows(self, P: np.ndarray, workload: str) -> np.ndarray:
        """Rows of base predictions that share one workload (a machine twin's tick)."""
        group = workload if workload in self.weights else GLOBAL
        return np.clip(self.intercepts[group] + P @ self.weights[group], 0.0, 100.0)

    @property
    def global_weights(self) -> dict[str, float]:
        return dict(zip(self.names, map(float, self.weights[GLOBAL]), strict=True))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "names": self.names,
                "weights": {g: w.tolist() for g, w in self.weights.items()},
                "intercepts": self.intercepts}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinearMeta:
        return cls(data["kind"], list(data["names"]),
                   {g: np.asarray(w, dtype=float) for g, w in data["weights"].items()},
                   {g: float(b) for g, b in data["intercepts"].items()})


def _nnls_with_intercept(P: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    A = np.column_stack([P, np.ones(len(P)), -np.ones(len(P))])
    w, _ = nnls(A, y)
    return w[:-2], float(w[-2] - w[-1])


def _convex_with_intercept(P: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Weights ≥ 0 summing to 1, and a free intercept: least squares on centred columns,
    the sum held by a heavily weighted extra row, then normalised exactly."""
    Pc, yc = P - P.mean(axis=0), y - y.mean()
    heavy = 1e3 * max(1.0, float(np.sqrt((Pc**2).sum())))
    A = np.vstack([Pc, np.full(P.shape[1], heavy)])
    w, _ = nnls(A, np.append(yc, heavy))
    w = w / w.sum() if w.sum() > 0 else np.full(P.shape[1], 1.0 / P.shape[1])
    return w, float(y.mean() - P.mean(axis=0) @ w)


def fit_meta(kind: str | Any, names: list[str], P: np.ndarray, y: np.ndarray,
             workloads: np.ndarray) -> LinearMeta:
    """Fit one kind of meta-model on out-of-fold predictions P (rows × bases)."""
    k = P.shape[1]
    if not isinstance(kind, str):  # a scikit-learn linear regressor
        model = clone(kind).fit(P, y)
        return LinearMeta("custom", names, {GLOBAL: np.ravel(model.coef_).astype(float)},
                          {GLOBAL: float(np.ravel(model.intercept_)[0])})
    if kind == "ridge":
        model = RidgeCV().fit(P, y)
        return LinearMeta(kind, names, {GLOBAL: model.coef_.astype(float)},
                          {GLOBAL: float(model.intercept_)})
    if kind == "nnls":
        w, b = _nnls_with_intercept(P, y)
        return LinearMeta(kind, names, {GLOBAL: w}, {GLOBAL: b})
    if kind == "best":
        sse = ((P - y[:, None]) ** 2).sum(axis=0)
        return LinearMeta(kind, names, {GLOBAL: np.eye(k)[int(np.argmin(sse))]}, {GLOBAL: 0.0})
    if kind == "top_mean":
        order = np.argsort(((P - y[:, None]) ** 2).sum(axis=0))
        sse = [((P[:, order[:n]].mean(axis=1) - y) ** 2).sum() for n in range(1, k + 1)]
        chosen = order[: int(np.argmin(sse)) + 1]
        w = np.zeros(k)
        w[chosen] = 1.0 / chosen.size
        return LinearMeta(kind, names, {GLOBAL: w}, {GLOBAL: 0.0})
    if kind == "average":
        return LinearMeta(kind, names, {GLOBAL: np.full(k, 1.0 / k)}, {GLOBAL: 0.0})
    if kind == "per_workload":
        w, b = _nnls_with_intercept(P, y)
        weights, intercepts = {GLOBAL: w}, {GLOBAL: b}
        labels, codes = factorize(workloads)
        for i in sorted(range(len(labels)), key=labels.__getitem__):
            rows = codes == i
            if rows.sum() >= MIN_ROWS_PER_WORKLOAD:
                weights[labels[i]], intercepts[labels[i]] = _convex_with_intercept(P[rows], y[rows])
        return LinearMeta(kind, names, weights, intercepts)
    raise ModelError(f"meta_model must be one of {', '.join(META_KINDS)} or a scikit-learn "
                     f"linear regressor, got {kind!r}")


def choose_meta(names: list[str], P: np.ndarray, y: np.ndarray, workloads: np.ndarray,
                blocks: np.ndarray, n_chunks: int = 20) -> tuple[LinearMeta, dict[str, float]]:
    """Pick a kind by forward-chaining error over the OOF blocks, with the one-standard-error
    rule: the simplest kind whose error is within one standard error of the lowest.

    Fold models train on less data than the final refit, so out-of-fold predictions flatter
    learners that need little data; preferring the simpler meta-model unless a richer one
    is clearly better keeps that bias from buying weights the test period does not repay.
    The standard error comes from the spread of the error difference over `n_chunks`
    consecutive chunks of scored rows (rows 100 ms apart are not independent).
    """
    order = np.unique(blocks)
    errors: dict[str, np.ndarray] = {}
    for kind in AUTO_CANDIDATES:
        err = np.zeros(0)
        for later in order[1:]:
            fit_rows, score_rows = blocks < later, blocks == later
            meta = fit_meta(kind, names, P[fit_rows], y[fit_rows], workloads[fit_rows])
            pred = meta.predict(P[score_rows], workloads[score_rows])
            err = np.concatenate([err, (pred - y[score_rows]) ** 2])
        errors[kind] = err
    scores = {k: float(e.sum()) for k, e in errors.items()}
    lowest = min(AUTO_CANDIDATES, key=lambda c: scores[c])
    chosen = lowest
    for kind in AUTO_CANDIDATES:  # simplest first
        diff = np.array([c.sum() for c in np.array_split(errors[kind] - errors[lowest], n_chunks)])
        if diff.sum() <= diff.std(ddof=1) * np.sqrt(n_chunks):
            chosen = kind
            break
    meta = fit_meta(chosen, names, P, y, workloads)
    meta.kind = f"auto:{chosen}"
    return meta, scores
