"""Merge LoRA-XS into plain kernels for deployment (W' = W + (α/r)·A·R·B), and back."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp

from loraxs_jax.transform import ROLES, adapted_kernels, adapter_key, flatten, path_str, unflatten


def delta_weight(a: jax.Array, r: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """ΔW = (α/r)·A·R·B in float32, shaped like the kernel: A (*stack, *in, r), R (*stack, r, r),
    B (*stack, r, *out) → (*stack, *in, *out)."""
    n_stack = r.ndim - 2
    stack, rank = r.shape[:n_stack], r.shape[-1]
    in_dims, out_dims = a.shape[n_stack:-1], b.shape[n_stack + 1:]
    a2 = a.astype(jnp.float32).reshape(stack + (-1, rank))
    b2 = b.astype(jnp.float32).reshape(stack + (rank, -1))
    rs = r.astype(jnp.float32) * scale.astype(jnp.float32)[..., None, None]
    return (a2 @ rs @ b2).reshape(stack + in_dims + out_dims)


def merged_kernel(w, a, r, b, scale):
    """W + ΔW computed in float32 and cast back to W's dtype."""
    return (w.astype(jnp.float32) + delta_weight(a, r, b, scale)).astype(w.dtype)


def _unmerged_kernel(w, a, r, b, scale):
    return (w.astype(jnp.float32) - delta_weight(a, r, b, scale)).astype(w.dtype)


def _merge_flat(keyed: dict) -> dict:
    flat = _unkeyed(keyed)
    out = dict(flat)
    for base_path, d in adapted_kernels(unflatten(flat, {})).items():
        if "kernel" not in d:
            raise ValueError(f"{path_str(base_path)}: LoRA-XS leaves without their kernel")
        out[base_path] = merged_kernel(d["kernel"], d["A"], d["R"], d["B"], d["scale"])
        for role in ROLES:
            del out[(*base_path[:-1], adapter_key(str(base_path[-1]), role))]
    return _keyed(out)


@partial(jax.jit, donate_argnums=0)
def _merge_donated(flat):
    return _merge_flat(flat)


_merge_kept = jax.jit(_merge_flat)


def _keyed(flat: dict) -> dict:
    # jit needs string-keyed pytrees with a stable order; paths become '\x1f'-joined strings.
    return {"\x1f".join(map(str, p)): v for p, v in flat.items()}


def _unkeyed(d: dict) -> dict:
    return {tuple(k.split("\x1f")): v for k, v in d.items()}


def merge(params: Mapping, donate: bool = False) -> Mapping:
    """A plain param tree, structured like the tree given to ``apply``, with each adapted kernel
    replaced by W + (α/r)·A·R·B (float32 accumulation, cast to W's dtype) and the LoRA-XS leaves
    removed. The merged model runs with zero extra latency.

    Jitted as one program over the whole tree; shardings of the inputs carry over to the merged
    kernels. ``donate=True`` donates the input buffers so kernels are updated in place (the input
    tree must not be used afterwards): use it when memory is tight, e.g. merging a 7B model.
    """
    if not adapted_kernels(params):
        raise ValueError("no LoRA-XS leaves (*_loraxs_R) in these params: nothing to merge")
    fn = _merge_donated if donate else _merge_kept
    return unflatten(_unkeyed(fn(_keyed(flatten(params)))), params)


@jax.jit
def _unmerge_flat(merged: dict, adapters: dict) -> dict:
    out = dict(merged)
    for k, v in adapters.items():
        out[k] = v
    for base_path, d in adapted_kernels(unflatten(_unkeyed(adapters), {})).items():
        key = "\x1f".join(map(str, base_path))
        out[key] = _unmerged_kernel(merged[key], d["A"], d["R"], d["B"], d["scale"])
    return out


def unmerge(merged: Mapping, adapters: Mapping) -> Mapping:
    """Undo ``merge``: W = W' − (α/r)·A·R·B, and the LoRA-XS leaves of ``adapters`` (an adapted
    tree, or any tree holding its ``*_loraxs_*`` leaves) put back. Exact to float32 round-off for
    float32 kernels (a bf16 kernel loses what bf16 cannot hold)."""
    flat_a = {p: v for p, v in flatten(adapters).items() if p[-1].find("_loraxs_") > 0}
    if not flat_a:
        raise ValueError("`adapters` holds no LoRA-XS leaves")
    missing = [path_str(p) for p in adapted_kernels(unflatten(flat_a, {}))
               if p not in flatten(merged)]
    if missing:
        raise ValueError(f"merged params lack the adapted kernels {missing[:5]}")
    return unflatten(_unkeyed(_unmerge_flat(_keyed(flatten(merged)), _keyed(flat_a))), merged)
