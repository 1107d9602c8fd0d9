"""The online path: the same compiled ops as `engine.py`, one sample at a time.

Each run keeps a ring buffer holding the last `history + 1` values of every source column
the ops read (raw, or derived by the same `derive` function the batch path uses). A new
sample costs O(ops), independent of how long the run has been going. A feature vector
exists once the run has `history` samples behind the current one, exactly where the
batch path marks rows valid.
"""

from __future__ import annotations

import numpy as np

from cputwin.features.engine import WINDOW_DECIMALS, CompiledSpec, derive
from cputwin.telemetry.schema import OVERALL, WORKLOAD_CPU


class OnlineFeatures:
    """Incremental features of one compiled spec for one run."""

    def __init__(self, compiled: CompiledSpec) -> None:
        self.compiled = compiled
        self.history = compiled.history
        self.length = self.history + 1
        sources = compiled.sources
        index = {s: i for i, s in enumerate(sources)}
        self.sources = sources
        self.ring = np.zeros((self.length, len(sources)))
        self.count = 0
        self.target_index = compiled.cores.index(compiled.target)
        self.n_cores = len(compiled.cores)
        self.derived = list(compiled.derived)
        # a sample's values as [cores..., overall, workload cpu, derived...]; sources index
        # into that
        columns = [*compiled.cores, OVERALL, WORKLOAD_CPU, *self.derived]
        self.source_index = np.array([columns.index(s) for s in sources], dtype=int)
        ops = compiled.ops
        n = len(ops)
        self.n_features = n
        # "now" and "lag" read one cell each: gather them in one indexing operation
        cell = [i for i, op in enumerate(ops) if op.kind in ("now", "lag")]
        self.cell_out = np.array(cell, dtype=int)
        cell_src = np.array([index[ops[i].source] for i in cell], dtype=int)
        cell_lag = np.array([ops[i].param for i in cell], dtype=int)
        # where each cell sits in the flattened ring, for each position of the ring's head
        self.cell_flat = [((head - cell_lag) % self.length) * len(sources) + cell_src
                          for head in range(self.length)]
        # windows: the last `longest` rows of every source a window reads, newest first,
        # are gathered once per tick (one take through a flat index per ring head); a window
        # of length w is the first w of them, the same rows in the same order
        windowed = [op for op in ops if op.kind in ("mean", "std")]
        window_sources = sorted({index[op.source] for op in windowed})
        longest = max((op.param for op in windowed), default=0)
        back = np.arange(longest)
        self.recent_flat = [((head - back) % self.length)[:, None] * len(sources)
                            + np.array(window_sources, dtype=int)[None, :]
                            for head in range(self.length)]
        # per length: its outputs, its columns of the gathered block (None: all, in order)
        # and which are deviations (None: means only, which skip the deviations)
        self.windows: list[tuple[int, np.ndarray, np.ndarray | None, np.ndarray | None]] = []
        for w in sorted({op.param for op in windowed}):
            members = [i for i, op in enumerate(ops) if op.kind in ("mean", "std") and op.param == w]
            columns = [window_sources.index(index[ops[i].source]) for i in members]
            is_std = np.array([ops[i].kind == "std" for i in members])
            self.windows.append((
                w,
                np.array(members, dtype=int),
                None if columns == list(range(len(window_sources))) else np.array(columns),
                is_std if is_std.any() else None,
            ))
        self.onehot = [(i, op.source) for i, op in enumerate(ops) if op.kind == "onehot"]
        self.host_onehot = [(i, op.source) for i, op in enumerate(ops) if op.kind == "host"]
        # [cores..., overall, workload cpu] of the latest sample
        self._values = np.zeros(self.n_cores + 2)

    def reset(self) -> None:
        self.count = 0

    def _row(self, cores: np.ndarray, overall: float, workload_cpu: float,
             derived: dict[str, np.ndarray] | None) -> np.ndarray:
        """The source columns' values for one sample, in `sources` order."""
        if not self.derived:
            self._values[:-2] = cores
            self._values[-2] = overall
            self._values[-1] = workload_cpu
            return self._values.take(self.source_index)
        if derived is None:
            derived = derive_sample(cores, overall, self.target_index, self.n_cores,
                                    workload_cpu if self.compiled.spec.reads_workload_cpu
                                    else None)
        values = np.concatenate((cores, (overall, workload_cpu),
                                 [derived[s][0] for s in self.derived]))
        return values[self.source_index]

    def update(self, cores: np.ndarray, overall: float, workload: str, host: str = "",
               derived: dict[str, np.ndarray] | None = None,
               workload_cpu: float = float("nan")) -> np.ndarray | None:
        """Push one sample; return its feature vector, or None while history is short.

        derived: `derive_sample` of this sample, when the caller feeds several specs of
        one target (a stack's bases) and computes it once for all of them.
        workload_cpu: the workload's own CPU use (NaN where unknown), for specs that read it."""
        head = self.count % self.length
        self.ring[head] = self._row(cores, overall, workload_cpu, derived)
        self.count += 1
        if self.count <= self.history:
            return None
        x = np.empty(self.n_features)
        x[self.cell_out] = self.ring.ravel().take(self.cell_flat[head])
        recent = self.ring.ravel().take(self.recent_flat[head]) if self.windows else None
        for w, out, columns, is_std in self.windows:
            # mean and sample std by the same NumPy reductions np.mean / np.std use
            block = recent[:w] if columns is None else recent[:w, columns]
            mean = np.add.reduce(block, axis=0) / w
            if is_std is None:  # means only
                x[out] = np.round(mean, WINDOW_DECIMALS)
                continue
            dev = block - mean
            std = np.sqrt(np.add.reduce(dev * dev, axis=0) / (w - 1))
            x[out] = np.round(np.where(is_std, std, mean), WINDOW_DECIMALS)
        for i, category in self.onehot:
            x[i] = 1.0 if workload == category else 0.0
        for i, category in self.host_onehot:
            x[i] = 1.0 if host == category else 0.0
        return x


def derive_sample(cores: np.ndarray, overall: float, target_index: int, n_cores: int,
                  workload_cpu: float | None = None) -> dict[str, np.ndarray]:
    """`derive` of one sample (the batch path's function, on a one-row batch).

    workload_cpu: None when no spec of the caller reads it (its column is then not derived)."""
    own = None if workload_cpu is None else np.array([workload_cpu], dtype=float)
    others = np.concatenate((cores[:target_index], cores[target_index + 1:]))[None, :]
    return derive(np.array([overall]), others, n_cores, own)
