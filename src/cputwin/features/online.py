"""The online path: the same compiled ops as `engine.py`, one sample at a time.

Each run keeps a ring buffer holding the last `history + 1` values of every source column
the ops read (raw, or derived by the same `derive` function the batch path uses). A new
sample costs O(ops), independent of how long the run has been going. A feature vector
exists once the run has `history` samples behind the current one, exactly where the
batch path marks rows valid.

One `OnlineFeatures` serves one spec for one or several target cores at once (a machine
twin watches every core): the ring holds each target's sources side by side, and every
op is one NumPy operation over all targets, so a tick's cost grows far slower than the
core count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cputwin.features.engine import WINDOW_DECIMALS, CompiledSpec, derive
from cputwin.telemetry.schema import OVERALL, WORKLOAD_CPU


def others_index(cores: Sequence[str], targets: Sequence[str]) -> np.ndarray:
    """(targets, cores - 1): for each target, the positions of the other cores, in order."""
    return np.array([[i for i, c in enumerate(cores) if c != t] for t in targets],
                    dtype=int).reshape(len(targets), len(cores) - 1)


class OnlineFeatures:
    """Incremental features of one spec for one run, for one target or several.

    compiled: the spec compiled for one target (`update` returns a vector), or a list of
    it compiled for each of several targets (`update` returns one row per target)."""

    def __init__(self, compiled: CompiledSpec | Sequence[CompiledSpec]) -> None:
        self.single = isinstance(compiled, CompiledSpec)
        per_target = [compiled] if self.single else list(compiled)
        first = per_target[0]
        if any(c.spec != first.spec or c.cores != first.cores for c in per_target):
            raise ValueError("OnlineFeatures needs one spec on one machine for every target")
        self.compiled = first
        self.history = first.history
        self.length = self.history + 1
        self.targets = [c.target for c in per_target]
        self.n_targets = n_targets = len(per_target)
        self.n_cores = len(first.cores)
        self.others = others_index(first.cores, self.targets)
        self.derived = list(first.derived)
        self.reads_workload_cpu = first.spec.reads_workload_cpu
        ops = first.ops
        n_sources = len(first.sources)
        self.n_sources = n_sources
        self.ring = np.zeros((self.length, n_targets * n_sources))
        self.count = 0
        # a target's sample values are [cores..., overall, workload cpu, derived...]; its
        # sources index into that, and all targets' rows lie flat one after another
        columns = [*first.cores, OVERALL, WORKLOAD_CPU, *self.derived]
        self.width = len(columns)
        self.source_flat = np.concatenate([
            t * self.width + np.array([columns.index(s) for s in c.sources], dtype=int)
            for t, c in enumerate(per_target)])
        # the ring's flat position of (target t, source s) in row `head` is
        # head * T * S + t * S + s
        target_offset = (np.arange(n_targets) * n_sources)[:, None]
        index = {s: i for i, s in enumerate(first.sources)}  # same slots for every target
        self.n_features = len(ops)
        # "now" and "lag" read one cell each: gather them in one indexing operation
        cell = [i for i, op in enumerate(ops) if op.kind in ("now", "lag")]
        self.cell_out = np.array(cell, dtype=int)
        cell_src = np.array([index[ops[i].source] for i in cell], dtype=int)
        cell_lag = np.array([ops[i].param for i in cell], dtype=int)
        row_size = n_targets * n_sources
        self.cell_flat = [((head - cell_lag) % self.length)[None, :] * row_size
                          + target_offset + cell_src[None, :]
                          for head in range(self.length)]
        # windows: the last `longest` rows of every source a window reads, newest first,
        # are gathered once per tick (one take through a flat index per ring head); a window
        # of length w is the first w of them, the same rows in the same order
        windowed = [op for op in ops if op.kind in ("mean", "std")]
        window_sources = sorted({index[op.source] for op in windowed})
        longest = max((op.param for op in windowed), default=0)
        back = np.arange(longest)
        self.recent_flat = [((head - back) % self.length)[:, None, None] * row_size
                            + target_offset[None, :, :]
                            + np.array(window_sources, dtype=int)[None, None, :]
                            for head in range(self.length)]
        # per length: its outputs, its columns of the gathered block (None: all, in order)
        # and which are deviations (None: means only, which skip the deviations)
        self.windows: list[tuple[int, np.ndarray, np.ndarray | None, np.ndarray | None]] = []
        for w in sorted({op.param for op in windowed}):
            members = [i for i, op in enumerate(ops) if op.kind in ("mean", "std") and op.param == w]
            cols = [window_sources.index(index[ops[i].source]) for i in members]
            is_std = np.array([ops[i].kind == "std" for i in members])
            self.windows.append((
                w,
                np.array(members, dtype=int),
                None if cols == list(range(len(window_sources))) else np.array(cols),
                is_std if is_std.any() else None,
            ))
        self.onehot = [(i, op.source) for i, op in enumerate(ops) if op.kind == "onehot"]
        self.host_onehot = [(i, op.source) for i, op in enumerate(ops) if op.kind == "host"]
        self._values = np.zeros((n_targets, self.width))

    def reset(self) -> None:
        self.count = 0

    def _row(self, cores: np.ndarray, overall: float, workload_cpu: float,
             derived: dict[str, np.ndarray] | None) -> np.ndarray:
        """Every target's source values for one sample, flat in ring order."""
        values = self._values
        values[:, :self.n_cores] = cores
        values[:, self.n_cores] = overall
        values[:, self.n_cores + 1] = workload_cpu
        if self.derived:
            if derived is None:
                derived = derive_sample(cores, overall, self.others,
                                        workload_cpu if self.reads_workload_cpu else None)
            for k, name in enumerate(self.derived):
                values[:, self.n_cores + 2 + k] = derived[name]
        return values.ravel().take(self.source_flat)

    def update(self, cores: np.ndarray, overall: float, workload: str, host: str = "",
               derived: dict[str, np.ndarray] | None = None,
               workload_cpu: float = float("nan")) -> np.ndarray | None:
        """Push one sample; return its features (a vector for one target, a row per target
        for several), or None while history is short.

        derived: `derive_sample` of this sample for these targets, when the caller feeds
        several specs and computes it once for all of them.
        workload_cpu: the workload's own CPU use (NaN where unknown), for specs that read it."""
        head = self.count % self.length
        self.ring[head] = self._row(cores, overall, workload_cpu, derived)
        self.count += 1
        if self.count <= self.history:
            return None
        x = np.empty((self.n_targets, self.n_features))
        flat = self.ring.ravel()
        x[:, self.cell_out] = flat.take(self.cell_flat[head])
        recent = flat.take(self.recent_flat[head]) if self.windows else None
        for w, out, columns, is_std in self.windows:
            # mean and sample std by the same NumPy reductions np.mean / np.std use
            block = recent[:w] if columns is None else recent[:w, :, columns]
            mean = np.add.reduce(block, axis=0) / w
            if is_std is None:  # means only
                x[:, out] = np.round(mean, WINDOW_DECIMALS)
                continue
            dev = block - mean
            std = np.sqrt(np.add.reduce(dev * dev, axis=0) / (w - 1))
            x[:, out] = np.round(np.where(is_std, std, mean), WINDOW_DECIMALS)
        for i, category in self.onehot:
            x[:, i] = 1.0 if workload == category else 0.0
        for i, category in self.host_onehot:
            x[:, i] = 1.0 if host == category else 0.0
        return x[0] if self.single else x


def derive_sample(cores: np.ndarray, overall: float, others: np.ndarray,
                  workload_cpu: float | None = None) -> dict[str, np.ndarray]:
    """`derive` of one sample, one row per target (the batch path's function).

    others: `others_index` of the targets; workload_cpu: None when no spec of the caller
    reads it (its column is then not derived)."""
    rows = others.shape[0]
    own = None if workload_cpu is None else np.full(rows, workload_cpu, dtype=float)
    return derive(np.full(rows, overall, dtype=float), cores[others], cores.size, own)
