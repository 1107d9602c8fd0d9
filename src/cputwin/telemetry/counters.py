"""Utilisation from cumulative CPU-time counters, as Linux keeps them in /proc/stat.

node_exporter (`node_cpu_seconds_total{cpu, mode}`), Prometheus and Telegraf's `time_*`
fields all carry the same counters: seconds each core spent in each mode. Over an
interval, a core's utilisation is 100 × (1 − Δidle / Δ(all modes)) and the machine's the
same over the sums of all cores. Guest time is already inside user and nice, so it is
never added. One interval is one row; an interval across which a counter went backwards
(a reboot, a core taken offline and back) or the set of cores changed is no row at all:
the run ends there.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# The modes that partition a core's time (guest and guest_nice are inside user and nice).
MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")

Counters = Mapping[int, Mapping[str, float]]  # core index -> mode -> seconds


class CounterBreak(Exception):  # noqa: N818 (a condition, not an error the user sees)
    """The interval between two readings is not one: a reset, other cores, no time passed."""


def interval_utilisation(prev: Counters, cur: Counters) -> tuple[float, list[float]]:
    """(overall, per-core list ordered by core index) over the interval prev → cur."""
    if set(prev) != set(cur):
        raise CounterBreak(f"the set of cores changed ({len(prev)} → {len(cur)} cores)")
    idle_sum = total_sum = 0.0
    cores = []
    for core in sorted(cur):
        before, after = prev[core], cur[core]
        modes = [m for m in MODES if m in before and m in after]
        if "idle" not in modes:
            raise CounterBreak(f"core {core} has no idle counter")
        deltas = [after[m] - before[m] for m in modes]  # a few numbers: plain floats
        if min(deltas) < 0:
            raise CounterBreak(f"a counter of core {core} went backwards (reset)")
        total, idle = sum(deltas), after["idle"] - before["idle"]
        if total <= 0:
            raise CounterBreak(f"no CPU time passed on core {core}")
        cores.append(_percent(idle, total))
        idle_sum += idle
        total_sum += total
    return _percent(idle_sum, total_sum), cores


def _percent(idle: float, total: float) -> float:
    return min(100.0, max(0.0, 100.0 * (1.0 - idle / total)))


def run_starts(timestamps: np.ndarray, step: float | None = None) -> np.ndarray:
    """True where a row starts a new run because the time since the previous row is a gap:
    more than 1.5 steps (the median step unless given)."""
    ts = np.asarray(timestamps, dtype=float)
    starts = np.zeros(ts.size, dtype=bool)
    if ts.size:
        starts[0] = True
    if ts.size > 1:
        dt = np.diff(ts)
        expected = step if step is not None else float(np.median(dt))
        starts[1:] = dt > 1.5 * expected
    return starts
