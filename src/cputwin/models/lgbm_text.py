"""A strict check of a LightGBM model text before LightGBM parses it.

LightGBM parses the trees of a model text in parallel (OpenMP); a malformed tree there
(a leaf value too many, a garbled number, a line without `=`) raises inside the parallel
region, which C++ cannot unwind: the process aborts (SIGABRT) or reads past the text.
So a twin's model texts are checked here first, against the shape `model_to_string`
writes for cputwin's regression boosters: the header's counts, the tree sizes that
locate each tree, every array's length against `num_leaves`, every number finite, every
split on a known feature, and the children forming one tree. Anything else is refused.
"""

from __future__ import annotations

import math
import re

from cputwin.errors import ModelError

_TEXT = re.compile(r"[\x20-\x7e\n]*")
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_INT = re.compile(r"-?\d+")
# after "end of trees": importances, then the parameters LightGBM parses again on load
_TAIL = re.compile(r"\n\nfeature_importances:\n(?:[^\n=]+=\d+\n)*\nparameters:\n"
                   r"(?:\[[a-z0-9_]+: [^\n]*\]\n)*\nend of parameters\n\n"
                   r"pandas_categorical:[^\n]*\n?")
_HEADER = ("version", "num_class", "num_tree_per_iteration", "label_index", "max_feature_idx",
           "objective", "feature_names", "feature_infos", "tree_sizes")
INT32 = 2**31 - 1
# per tree: key -> (numbers are ints?, length: "leaves" or "nodes" (leaves - 1))
_ARRAYS = {
    "split_feature": (True, "nodes"), "split_gain": (False, "nodes"),
    "threshold": (False, "nodes"), "decision_type": (True, "nodes"),
    "left_child": (True, "nodes"), "right_child": (True, "nodes"),
    "internal_value": (False, "nodes"), "internal_weight": (False, "nodes"),
    "internal_count": (True, "nodes"), "leaf_value": (False, "leaves"),
    "leaf_weight": (False, "leaves"), "leaf_count": (True, "leaves"),
}
_REQUIRED = ("num_leaves", "num_cat", "leaf_value", "split_feature", "threshold",
             "decision_type", "left_child", "right_child")
_SCALARS = ("num_leaves", "num_cat", "is_linear", "shrinkage")


class _Bad(Exception):
    """A problem found in the text (becomes one ModelError line)."""


def check_model_text(text: object) -> None:
    """Raise ModelError unless `text` is a model text LightGBM can parse safely."""
    try:
        _check(text)
    except _Bad as exc:
        raise ModelError(f"a LightGBM model text is malformed ({exc}); refusing to load it") from None


def _check(text: object) -> None:
    if not isinstance(text, str) or not _TEXT.fullmatch(text):
        raise _Bad("it holds characters a model text never does")
    head, _, rest = text.partition("\n\n")
    lines = head.split("\n")
    if lines[0] != "tree":
        raise _Bad("it does not start with 'tree'")
    header = _pairs(lines[1:], "header")
    missing = [k for k in _HEADER if k not in header]
    if missing:
        raise _Bad(f"the header has no {missing[0]}")
    if header["version"] not in ("v3", "v4"):
        raise _Bad(f"version {header['version'][:20]!r}")
    for key in ("num_class", "num_tree_per_iteration"):
        if _int(header[key], key) != 1:
            raise _Bad(f"{key} is not 1 (a regression model has one)")
    if _int(header["label_index"], "label_index") < 0:
        raise _Bad("label_index is negative")
    n_features = _int(header["max_feature_idx"], "max_feature_idx") + 1
    if n_features < 1:
        raise _Bad("max_feature_idx is negative")
    for key in ("feature_names", "feature_infos"):
        if len(header[key].split(" ")) != n_features:
            raise _Bad(f"{key} does not list max_feature_idx + 1 features")
    sizes = [_int(v, "tree_sizes") for v in _split(header["tree_sizes"])]
    trees, found, tail = rest.partition("end of trees")
    if not found:
        raise _Bad("it has no 'end of trees'")
    if not _TAIL.fullmatch(tail):
        raise _Bad("what follows the trees (importances, parameters) is not in LightGBM's shape")
    if any(s < 1 for s in sizes) or sum(sizes) != len(trees):
        raise _Bad("tree_sizes do not match the trees' text")
    start = 0
    for i, size in enumerate(sizes):
        _check_tree(i, trees[start:start + size], n_features)
        start += size


def _check_tree(i: int, block: str, n_features: int) -> None:
    lines = block.split("\n")
    if lines[0] != f"Tree={i}" or not block.endswith("\n\n"):
        raise _Bad(f"tree {i} does not start where tree_sizes put it")
    fields = _pairs([line for line in lines[1:] if line], f"tree {i}")
    unknown = set(fields) - set(_ARRAYS) - set(_SCALARS)
    if unknown:
        raise _Bad(f"tree {i} has an unknown field {sorted(unknown)[0][:30]!r}")
    if "num_leaves" not in fields:
        raise _Bad(f"tree {i} has no num_leaves")
    leaves = _int(fields["num_leaves"], "num_leaves")
    if leaves < 1:
        raise _Bad(f"tree {i} has num_leaves {leaves}")
    missing = [k for k in (_REQUIRED if leaves > 1 else _REQUIRED[:3]) if k not in fields]
    if missing:
        raise _Bad(f"tree {i} has no {missing[0]}")
    if _int(fields["num_cat"], "num_cat") != 0 or fields.get("is_linear", "0") != "0":
        raise _Bad(f"tree {i} has categorical splits or linear leaves (cputwin writes neither)")
    if "shrinkage" in fields:
        _number(fields["shrinkage"], "shrinkage")
    read = _ARRAYS if leaves > 1 else ("leaf_value",)  # LightGBM reads no more of a stump
    arrays = {key: _array(fields[key], key, *_ARRAYS[key], leaves, i)
              for key in read if key in fields}
    if leaves > 1:
        _check_splits(i, arrays, leaves, n_features)


def _check_splits(i: int, arrays: dict[str, list], leaves: int, n_features: int) -> None:
    if not all(0 <= f < n_features for f in arrays["split_feature"]):
        raise _Bad(f"tree {i} splits on a feature the model does not have")
    for d in arrays["decision_type"]:
        if not 0 <= d <= 127 or d & 1 or (d >> 2) & 3 == 3:
            raise _Bad(f"tree {i} has decision_type {d} (categorical or unknown)")
    seen = [0] * (leaves - 1), [0] * leaves  # times each node, each leaf is a child
    for child in arrays["left_child"] + arrays["right_child"]:
        if not -leaves <= child < leaves - 1:
            raise _Bad(f"tree {i} has a child index out of range ({child})")
        if child >= 0:
            seen[0][child] += 1
        else:
            seen[1][~child] += 1
    if seen[0][0] or any(n != 1 for n in seen[0][1:]) or any(n != 1 for n in seen[1]):
        raise _Bad(f"tree {i} is not a tree (a node has no parent, or two)")
    reached, todo = {0}, [0]  # and no cycle cut off from the root
    while todo:
        node = todo.pop()
        for child in (arrays["left_child"][node], arrays["right_child"][node]):
            if child >= 0 and child not in reached:
                reached.add(child)
                todo.append(child)
    if len(reached) != leaves - 1:
        raise _Bad(f"tree {i} is not a tree (nodes out of the root's reach)")


def _pairs(lines: list[str], where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        key, eq, value = line.partition("=")
        if not eq or not key or key in out:
            raise _Bad(f"{where} has a line that is not a new key=value ({line[:30]!r})")
        out[key] = value
    return out


def _split(value: str) -> list[str]:
    return value.split(" ") if value else []


def _int(token: str, key: str) -> int:
    if not _INT.fullmatch(token) or abs(int(token)) > INT32:
        raise _Bad(f"{key} holds {token[:20]!r}, not an integer")
    return int(token)


def _number(token: str, key: str) -> float:
    if not _NUMBER.fullmatch(token) or not math.isfinite(float(token)):
        raise _Bad(f"{key} holds {token[:20]!r}, not a finite number")
    return float(token)


def _array(value: str, key: str, ints: bool, length: str, leaves: int, tree: int) -> list:
    tokens = _split(value)
    expected = leaves if length == "leaves" else leaves - 1
    if len(tokens) != expected:
        raise _Bad(f"tree {tree}: {key} has {len(tokens)} values for {expected} {length}")
    return [_int(t, key) if ints else _number(t, key) for t in tokens]
