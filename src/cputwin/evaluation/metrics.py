"""Scores shared by every protocol: R², MAE, RMSE overall and per workload, the verdict."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score


def scores(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    if y.size < 2:
        return {"r2": float("nan"), "mae": float("nan"), "rmse": float("nan"), "n": int(y.size)}
    # R² is undefined on a flat target (a core pinned at 100%): report it as missing
    r2 = float(r2_score(y, pred)) if np.ptp(y) > 0 else float("nan")
    return {
        "r2": r2,
        "mae": float(mean_absolute_error(y, pred)),
        "rmse": float(np.sqrt(mean_squared_error(y, pred))),
        "n": int(y.size),
    }


def verdict(r2: float) -> str:
    """The stack's R² against the seed notebook's two reference points: its best single
    model (0.71) and its goal (0.85), in plain words."""
    if not np.isfinite(r2):
        return "R² n/a: the target core never moved over the test rows"
    if r2 >= 0.85:
        return f"R² {r2:.4f}: above the seed notebook's goal of 0.85"
    if r2 > 0.71:
        return (f"R² {r2:.4f}: above the seed's best single model (0.71), below the "
                "notebook's goal of 0.85")
    return f"R² {r2:.4f}: not above the seed's best single model (0.71)"


def score_table(
    y: dict[str, np.ndarray], pred: dict[str, np.ndarray], workload: dict[str, np.ndarray]
) -> dict:
    """r2/mae/rmse per model and per workload; each model may be scored on its own rows."""
    out: dict = {"r2": {}, "mae": {}, "rmse": {}, "per_workload": {}}
    for name, p in pred.items():
        s = scores(y[name], p)
        for m in ("r2", "mae", "rmse"):
            out[m][name] = s[m]
        for wl in sorted(set(workload[name].tolist())):
            mask = workload[name] == wl
            ws = scores(y[name][mask], p[mask])
            entry = out["per_workload"].setdefault(wl, {"r2": {}, "mae": {}, "rmse": {}, "rows": 0})
            for m in ("r2", "mae", "rmse"):
                entry[m][name] = ws[m]
            entry["rows"] = max(entry["rows"], ws["n"])
    return out
