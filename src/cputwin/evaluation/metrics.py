"""Scores shared by every protocol: R², MAE, RMSE overall and per workload, the verdict."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from cputwin.evaluation.summary import GroupScores, Scores, ScoreTable

METRICS = ("r2", "mae", "rmse")


def scores(y: np.ndarray, pred: np.ndarray) -> Scores:
    if y.size < 2:
        return Scores(r2=math.nan, mae=math.nan, rmse=math.nan, n=int(y.size))
    # R² is undefined on a flat target (a core pinned at 100%): report it as missing
    r2 = float(r2_score(y, pred)) if np.ptp(y) > 0 else math.nan
    return Scores(r2=r2, mae=float(mean_absolute_error(y, pred)),
                  rmse=float(np.sqrt(mean_squared_error(y, pred))), n=int(y.size))


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
    y: dict[str, np.ndarray], pred: dict[str, np.ndarray], group: dict[str, np.ndarray]
) -> ScoreTable:
    """r2/mae/rmse per model, overall and per value of `group` (the workload, the host);
    each model may be scored on its own rows."""
    table = ScoreTable(r2={}, mae={}, rmse={}, per_workload={})
    for name, p in pred.items():
        s = scores(y[name], p)
        for m in METRICS:
            getattr(table, m)[name] = getattr(s, m)
        for value in sorted(set(group[name].tolist())):
            mask = group[name] == value
            ws = scores(y[name][mask], p[mask])
            entry = table.per_workload.setdefault(value, GroupScores(r2={}, mae={}, rmse={}, rows=0))
            for m in METRICS:
                getattr(entry, m)[name] = getattr(ws, m)
            entry.rows = max(entry.rows, ws.n)
    return table
