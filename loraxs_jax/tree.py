"""Param-tree helpers shared by every module: paths, flattening, and the LoRA-XS leaf names.

A param tree is a nested mapping (dict or FrozenDict) whose leaves are arrays, shape structs or
flax ``AxisMetadata`` boxes (``nn.Partitioned``). Paths are tuples of keys; their '/'-joined form
(``path_str``) is what target regexes search. LoRA-XS stores its leaves beside the kernel they
adapt, as ``<kernel>_loraxs_{A,B,R,scale}``; ``leaf_role`` and ``adapter_key`` read and write
those names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util
from flax.core import FrozenDict, meta

SUFFIX = "_loraxs_"
ROLES = ("A", "B", "R", "scale")
_LEAF_RE = re.compile(rf"^(?P<base>.+){SUFFIX}(?P<role>{'|'.join(ROLES)})$")


def path_keys(path: tuple) -> tuple[str, ...]:
    """A path of keys or of jax key-path entries (DictKey, SequenceKey, GetAttrKey) → strings."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def path_str(path: tuple) -> str:
    """('encoder', 'layer', 0, 'kernel') or jax key paths → 'encoder/layer/0/kernel'."""
    return "/".join(path_keys(path))


def flatten(tree: Mapping) -> dict[tuple, Any]:
    """Nested mappings (dict, FrozenDict) → {path tuple: leaf}; boxed leaves stay boxed."""
    if not isinstance(tree, Mapping):
        raise TypeError(f"expected a nested dict of params, got {type(tree).__name__}")
    return traverse_util.flatten_dict(tree, keep_empty_nodes=False)


def unflatten(flat: Mapping[tuple, Any], like: Mapping | None = None) -> Mapping:
    """{path tuple: leaf} → nested dicts (a FrozenDict when ``like`` is one)."""
    out = traverse_util.unflatten_dict(dict(flat))
    return FrozenDict(out) if isinstance(like, FrozenDict) else out


def unbox(x: Any) -> Any:
    """The array inside a flax ``AxisMetadata`` box (``nn.Partitioned``), or ``x`` itself."""
    return x.unbox() if isinstance(x, meta.AxisMetadata) else x


def shape_of(x: Any) -> tuple[int, ...]:
    """The shape of an array, shape struct or boxed leaf."""
    x = unbox(x)
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def leaf_role(key: Any) -> tuple[str, str] | None:
    """'kernel_loraxs_R' → ('kernel', 'R'); anything else → None."""
    m = _LEAF_RE.match(str(key))
    return (m["base"], m["role"]) if m else None


def adapter_key(base_key: str, role: str) -> str:
    """('kernel', 'R') → 'kernel_loraxs_R'."""
    return f"{base_key}{SUFFIX}{role}"


def is_adapted(tree: Mapping) -> bool:
    """Whether ``tree`` holds any LoRA-XS leaf."""
    return any(leaf_role(p[-1]) for p in flatten(tree))


def adapted_kernels(params: Mapping) -> dict[tuple, dict[str, Any]]:
    """{kernel path: {'kernel': W, 'A': .., 'B': .., 'R': .., 'scale': ..}} of an adapted tree
    ('kernel' is absent when the tree holds the LoRA-XS leaves without their kernel)."""
    flat = flatten(params)
    out: dict[tuple, dict[str, Any]] = {}
    for path, leaf in flat.items():
        role = leaf_role(path[-1])
        if role:
            out.setdefault((*path[:-1], role[0]), {})[role[1]] = leaf
    for base_path, d in out.items():
        missing = [r for r in ROLES if r not in d]
        if missing:
            raise ValueError(f"{path_str(base_path)} has LoRA-XS leaves but lacks {missing}")
        if base_path in flat:
            d["kernel"] = flat[base_path]
    return out
