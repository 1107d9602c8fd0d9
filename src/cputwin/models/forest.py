"""A LightGBM model's trees as flat arrays, walked for one row by a compiled kernel.

A live tick predicts one row at a time, where LightGBM walks its trees one after another:
each step waits on the load of the next node, and every comparison is a branch the CPU
guesses wrong half the time. Here the trees are laid out depth-first (a left child is the
next node; a node is a threshold, or a leaf's value, in one array and an int32 code,
feature | left step << 16 | right step << 17, in another), grouped into blocks of trees
of similar depth, and a block's trees are walked side by side, branch-free (a leaf steps
onto itself), for as many steps as most rows need; the few trees still inside after that
finish one by one. A tree's deepest leaf is often twice as deep as the path a row
typically takes, so walking every tree to its deepest leaf did twice the work; the
typical depth comes from the training rows each leaf holds (LightGBM's leaf_count).
Same trees, same comparisons (`x > threshold` goes right), same leaf values: only the
order in which the leaf values are added differs (about 1e-13).

Only what this fast path can state exactly is compiled: numerical splits, an identity
output (regression objectives), no linear trees. A row holding NaN, or a model that
treats zeros as missing seeing a zero, goes through LightGBM itself.
"""

from __future__ import annotations

import math

import lightgbm as lgb
import numba
import numpy as np

BLOCK = 16  # trees walked side by side
COVER = 0.8  # walk branch-free as deep as this share of a tree's training rows goes
IDENTITY_OBJECTIVES = ("regression", "regression_l1", "huber", "fair", "quantile", "mape")
_FEATURE_BITS = 16  # a node's code: feature | left step << 16 | right step << 17
_ZERO_MISSING = 1  # LightGBM's missing type "Zero", bits 2-3 of decision_type
_CATEGORICAL = 1
_ZERO = 1e-35  # LightGBM's kZeroThreshold


@numba.njit(cache=True, nogil=True)
def _walk(x: np.ndarray, values: np.ndarray, codes: np.ndarray, roots: np.ndarray,
          steps: np.ndarray, zero_missing: bool) -> float:
    """Sum of the leaf values `x` reaches; NaN where the fast path cannot answer for `x`."""
    for v in x:  # LightGBM reads |v| <= 1e-35 as 0 and may route 0 or NaN apart
        if math.isnan(v) or (v != 0.0 and abs(v) <= _ZERO) or (zero_missing and v == 0.0):
            return math.nan
    total = 0.0
    at = np.empty(BLOCK, np.int64)
    n_trees = roots.shape[0]
    for block in range(steps.shape[0]):
        first = block * BLOCK
        width = min(first + BLOCK, n_trees) - first
        for k in range(width):
            at[k] = roots[first + k]
        for _ in range(steps[block]):
            for k in range(width):
                n = at[k]
                code = codes[n]
                right = x[code & 0xFFFF] > values[n]
                at[k] = n + ((code >> 17) if right else ((code >> 16) & 1))
        for k in range(width):
            n = at[k]
            code = codes[n]
            while code != 0:  # not at a leaf yet (a split's code holds bit 16): rare
                n += (code >> 17) if x[code & 0xFFFF] > values[n] else ((code >> 16) & 1)
                code = codes[n]
            total += values[n]
    return total


class CompiledForest:
    """One booster's trees, ready for `_walk`; `from_booster` says None where it cannot."""

    def __init__(self, values: np.ndarray, codes: np.ndarray, roots: np.ndarray,
                 steps: np.ndarray, zero_missing: bool) -> None:
        self.values, self.codes, self.roots, self.steps = values, codes, roots, steps
        self.zero_missing = zero_missing

    @classmethod
    def from_booster(cls, booster: lgb.Booster) -> CompiledForest | None:
        return cls.from_model_string(booster.model_to_string())

    @classmethod
    def from_model_string(cls, text: str) -> CompiledForest | None:
        header, trees = _parse(text)
        objective = header.get("objective", "").split(" ")[0]
        if objective not in IDENTITY_OBJECTIVES or "average_output" in header:
            return None
        if any(int(t.get("num_cat", "0")) or int(t.get("is_linear", "0"))
               or any(int(d) & _CATEGORICAL for d in t.get("decision_type", "").split())
               for t in trees):
            return None
        if (int(header.get("num_tree_per_iteration", "1")) != 1
                or int(header.get("max_feature_idx", "0")) >= 1 << _FEATURE_BITS):
            return None
        return cls._layout(trees)

    @classmethod
    def _layout(cls, trees: list[dict[str, str]]) -> CompiledForest | None:
        values: list[float] = []  # a split's threshold or a leaf's value
        codes: list[int] = []
        roots, depths = [], []
        zero_missing = False
        for tree in trees:
            roots.append(len(values))
            leaves = [float(v) for v in tree["leaf_value"].split()]
            if int(tree["num_leaves"]) == 1:
                values.append(leaves[0])
                codes.append(0)
                depths.append(0)
                continue
            split = {key: [float(v) for v in tree[key].split()] for key in
                     ("split_feature", "threshold", "decision_type", "left_child", "right_child")}
            zero_missing |= any((int(d) >> 2) & 3 == _ZERO_MISSING for d in split["decision_type"])
            leaf_depths = _place(split, leaves, values, codes)
            counts = [float(c) for c in tree.get("leaf_count", "").split()]
            depths.append(_typical_depth(leaf_depths, counts))
        order = np.argsort(depths, kind="stable")  # similar depths share a block
        depth = np.asarray(depths, dtype=np.int64)[order]
        steps = np.array([depth[i:i + BLOCK].max() for i in range(0, depth.size, BLOCK)],
                         dtype=np.int64)
        if max(codes) >= 1 << 31:  # a tree too large for int32 steps
            return None
        return cls(np.asarray(values, dtype=np.float64), np.asarray(codes, dtype=np.int32),
                   np.asarray(roots, dtype=np.int64)[order], steps, zero_missing)

    def __call__(self, x: np.ndarray) -> float:
        """The raw score for one row, or NaN where LightGBM must answer (see module doc)."""
        return _walk(x, self.values, self.codes, self.roots, self.steps, self.zero_missing)


def _typical_depth(leaf_depths: list[int], counts: list[float]) -> int:
    """The depth that COVER of the tree's training rows stop at or above (the deepest
    leaf's where the model holds no leaf counts)."""
    rows = sum(counts)
    if len(counts) != len(leaf_depths) or rows <= 0:
        return max(leaf_depths)
    held = 0.0
    for depth, count in sorted(zip(leaf_depths, counts, strict=True)):
        held += count
        if held >= COVER * rows:
            return depth
    return max(leaf_depths)


def _place(split: dict[str, list[float]], leaves: list[float], values: list[float],
           codes: list[int]) -> list[int]:
    """Append one tree depth-first; return each leaf's depth (steps from the root), in
    LightGBM's leaf order."""
    leaf_depths = [0] * len(leaves)
    stack = [(0, 0, -1)]  # (LightGBM child id, depth, parent position to patch or -1)
    while stack:
        child, depth, parent = stack.pop()
        position = len(values)
        if parent >= 0:  # the right child of `parent` lands here
            codes[parent] |= (position - parent) << 17
        if child < 0:
            values.append(leaves[~child])
            codes.append(0)
            leaf_depths[~child] = depth
            continue
        values.append(split["threshold"][child])
        codes.append(int(split["split_feature"][child]) | 1 << _FEATURE_BITS)
        stack.append((int(split["right_child"][child]), depth + 1, position))
        stack.append((int(split["left_child"][child]), depth + 1, -1))
    return leaf_depths


def _parse(text: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """LightGBM's text model: the header's key=value lines and each tree's."""
    header: dict[str, str] = {}
    trees: list[dict[str, str]] = []
    current = header
    for line in text.splitlines():
        if line.startswith("Tree="):
            current = {}
            trees.append(current)
        elif line.startswith("end of trees"):
            break
        elif line:
            key, _, value = line.partition("=")  # a bare flag ("average_output") has no value
            current[key] = value
    return header, trees
