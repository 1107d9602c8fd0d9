"""A LightGBM model's trees scored for one row by a compiled kernel (QuickScorer).

A live tick predicts one row at a time. Walking 2,000 trees node by node is a chain of
dependent loads and comparisons the CPU guesses wrong half the time. QuickScorer
(Lucchese et al., SIGIR 2015) turns the forest inside out: every split of every tree is
listed by feature, sorted by threshold, with a bit mask over its tree's leaves (in left
to right order). For a row, the splits a feature's value goes right at are a prefix of
that feature's list (`threshold < x`, found by binary search); each such split rules out
the leaves of its left subtree, and the leftmost leaf still alive in a tree is where the
row lands. Symmetrically the splits going left (the suffix) rule out right subtrees, and
the rightmost leaf alive is the exit; a row takes whichever side holds fewer splits. The
work is a sequential scan and an AND per split, with no data-dependent branch.

Same trees, same comparisons (`x > threshold` goes right), same leaf values added in
LightGBM's tree order: the score is LightGBM's to the bit. Only what this fast path can
state exactly is compiled: numerical splits, trees of at most 64 leaves (one uint64
mask), an identity output (regression objectives), no linear trees. A row holding NaN,
or a model that treats zeros as missing seeing a zero, goes through LightGBM itself.
"""

from __future__ import annotations

import math

import lightgbm as lgb
import numba
import numpy as np

# count trailing / leading zero bits (tzcnt, lzcnt); an alive mask is never zero
from numba.cpython.unsafe.numbers import leading_zeros, trailing_zeros

MAX_LEAVES = 64  # a tree's leaves as the bits of one uint64
IDENTITY_OBJECTIVES = ("regression", "regression_l1", "huber", "fair", "quantile", "mape")
_ZERO_MISSING = 1  # LightGBM's missing type "Zero", bits 2-3 of decision_type
_CATEGORICAL = 1
_ZERO = 1e-35  # LightGBM's kZeroThreshold

# right / left: the bits of the tree's leaves still possible once x goes right / left here
SPLIT = np.dtype([("threshold", np.float64), ("tree", np.int64),
                  ("right", np.uint64), ("left", np.uint64)])
TREE = np.dtype([("leaf_start", np.int64), ("all_leaves", np.uint64)])


@numba.njit(cache=True, nogil=True)
def _score(x: np.ndarray, feature_start: np.ndarray, splits: np.ndarray, trees: np.ndarray,
           leaf_values: np.ndarray, zero_missing: bool) -> float:
    """Sum of the leaf values `x` reaches; NaN where the fast path cannot answer for `x`."""
    for v in x:  # LightGBM reads |v| <= 1e-35 as 0 and may route 0 or NaN apart
        if math.isnan(v) or (v != 0.0 and abs(v) <= _ZERO) or (zero_missing and v == 0.0):
            return math.nan
    n_features = feature_start.shape[0] - 1
    cut = np.empty(n_features, np.int64)  # feature f's splits going right: start[f]:cut[f]
    going_right = 0
    for f in range(n_features):
        lo, hi, v = feature_start[f], feature_start[f + 1], x[f]
        while lo < hi:  # the first split whose threshold is not below v
            mid = (lo + hi) >> 1
            if splits[mid].threshold < v:
                lo = mid + 1
            else:
                hi = mid
        cut[f] = lo
        going_right += lo - feature_start[f]
    alive = np.empty(trees.shape[0], np.uint64)
    for t in range(trees.shape[0]):
        alive[t] = trees[t].all_leaves
    total = 0.0
    if 2 * going_right <= splits.shape[0]:
        for f in range(n_features):
            for i in range(feature_start[f], cut[f]):
                alive[splits[i].tree] &= splits[i].right
        for t in range(trees.shape[0]):
            total += leaf_values[trees[t].leaf_start + np.int64(trailing_zeros(alive[t]))]
    else:
        for f in range(n_features):
            for i in range(cut[f], feature_start[f + 1]):
                alive[splits[i].tree] &= splits[i].left
        for t in range(trees.shape[0]):
            total += leaf_values[trees[t].leaf_start + 63 - np.int64(leading_zeros(alive[t]))]
    return total


@numba.njit(cache=True, nogil=True)
def _score_rows(X: np.ndarray, feature_start: np.ndarray, splits: np.ndarray,
                trees: np.ndarray, leaf_values: np.ndarray, zero_missing: bool) -> np.ndarray:
    """`_score` of every row of `X` in one call (a machine twin's cores of one tick)."""
    out = np.empty(X.shape[0])
    for r in range(X.shape[0]):
        out[r] = _score(X[r], feature_start, splits, trees, leaf_values, zero_missing)
    return out


class CompiledForest:
    """One booster's splits (`SPLIT` records, by feature and threshold; feature f's are
    `splits[feature_start[f]:feature_start[f + 1]]`), its trees (`TREE`) and their leaf
    values, left to right, ready for `_score`; `from_booster` says None where it cannot
    state the model exactly."""

    def __init__(self, feature_start: np.ndarray, splits: np.ndarray, trees: np.ndarray,
                 leaf_values: np.ndarray, zero_missing: bool) -> None:
        self.feature_start, self.splits, self.trees = feature_start, splits, trees
        self.leaf_values, self.zero_missing = leaf_values, zero_missing

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
               or int(t["num_leaves"]) > MAX_LEAVES
               or any(int(d) & _CATEGORICAL for d in t.get("decision_type", "").split())
               for t in trees):
            return None
        if int(header.get("num_tree_per_iteration", "1")) != 1:
            return None
        return cls._layout(trees, int(header.get("max_feature_idx", "0")) + 1)

    @classmethod
    def _layout(cls, trees: list[dict[str, str]], n_features: int) -> CompiledForest:
        splits: list[tuple[int, float, int, int, int]] = []  # feature, threshold, tree, masks
        leaf_values: list[float] = []
        tree_rows = np.empty(len(trees), TREE)
        zero_missing = False
        for index, tree in enumerate(trees):
            leaves = [float(v) for v in tree["leaf_value"].split()]
            tree_rows[index] = (len(leaf_values), (1 << len(leaves)) - 1)
            if len(leaves) == 1:
                leaf_values.append(leaves[0])
                continue
            split = {key: [float(v) for v in tree[key].split()] for key in
                     ("split_feature", "threshold", "decision_type", "left_child", "right_child")}
            zero_missing |= any((int(d) >> 2) & 3 == _ZERO_MISSING for d in split["decision_type"])
            in_order = _leaves_in_order(split, index, splits)
            leaf_values.extend(leaves[leaf] for leaf in in_order)
        splits.sort(key=lambda s: (s[0], s[1]))
        features = np.array([s[0] for s in splits], dtype=np.int64)
        return cls(
            feature_start=np.searchsorted(features, np.arange(n_features + 1)).astype(np.int64),
            splits=np.array([s[1:] for s in splits], dtype=SPLIT),
            trees=tree_rows,
            leaf_values=np.array(leaf_values, dtype=np.float64),
            zero_missing=zero_missing,
        )

    def __call__(self, x: np.ndarray) -> float:
        """The raw score for one row, or NaN where LightGBM must answer (see module doc)."""
        return _score(x, self.feature_start, self.splits, self.trees, self.leaf_values,
                      self.zero_missing)

    def rows(self, X: np.ndarray) -> np.ndarray:
        """The raw score of each row of a C-contiguous float64 matrix (NaN as in `__call__`)."""
        return _score_rows(X, self.feature_start, self.splits, self.trees, self.leaf_values,
                           self.zero_missing)


def _leaves_in_order(split: dict[str, list[float]], tree: int,
                     splits: list[tuple[int, float, int, int, int]]) -> list[int]:
    """Append the tree's splits with their masks; return its leaves (LightGBM's numbers)
    from left to right. A split going right rules out its left subtree's leaves (bits
    lo:mid), going left its right subtree's (mid:hi)."""
    in_order: list[int] = []
    full = (1 << MAX_LEAVES) - 1
    spans: dict[int, tuple[int, int]] = {}  # LightGBM child id -> its leaves' bits [lo, hi)
    stack = [(0, False)]  # (child id, its subtrees done); children before their parent
    while stack:
        child, done = stack.pop()
        if child < 0:
            spans[child] = (len(in_order), len(in_order) + 1)
            in_order.append(~child)
        elif not done:
            stack.append((child, True))
            stack.append((int(split["right_child"][child]), False))
            stack.append((int(split["left_child"][child]), False))
        else:
            lo, mid = spans[int(split["left_child"][child])]
            hi = spans[int(split["right_child"][child])][1]
            spans[child] = (lo, hi)
            left_bits = ((1 << (mid - lo)) - 1) << lo
            right_bits = ((1 << (hi - mid)) - 1) << mid
            splits.append((int(split["split_feature"][child]), split["threshold"][child], tree,
                           full & ~left_bits, full & ~right_bits))
    return in_order


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
