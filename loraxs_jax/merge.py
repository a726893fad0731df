"""Merge LoRA-XS into plain kernels for deployment (W' = W + (α/r)·A·R·B), and back."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from loraxs_jax.transform import adapted_kernels, flatten, leaf_role, path_str, unflatten


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


def _merged_kernels(kernels: dict, adapters: dict) -> dict:
    return {k: merged_kernel(w, *(adapters[k][r] for r in ("A", "R", "B", "scale")))
            for k, w in kernels.items()}


_merge_donated = jax.jit(_merged_kernels, donate_argnums=0)
_merge_kept = jax.jit(_merged_kernels)


def _keyed(flat: dict) -> dict:
    # jit needs string-keyed pytrees with a stable order; paths become '\x1f'-joined strings.
    return {"\x1f".join(map(str, p)): v for p, v in flat.items()}


def _unkeyed(d: dict) -> dict:
    return {tuple(k.split("\x1f")): v for k, v in d.items()}


def merge(params: Mapping, donate: bool = False) -> Mapping:
    """A plain param tree, structured like the tree given to ``apply``, with each adapted kernel
    replaced by W + (α/r)·A·R·B (float32 accumulation, cast to W's dtype) and the LoRA-XS leaves
    removed. The merged model runs with zero extra latency.

    Jitted as one program over all adapted kernels; shardings of the inputs carry over to the
    merged kernels. ``donate=True`` donates the kernels' buffers so they are updated in place
    (the input tree must not be used afterwards): use it when memory is tight, e.g. a 7B model.
    """
    found = adapted_kernels(params)
    if not found:
        raise ValueError("no LoRA-XS leaves (*_loraxs_R) in these params: nothing to merge")
    missing = [path_str(p) for p, d in found.items() if "kernel" not in d]
    if missing:
        raise ValueError(f"LoRA-XS leaves without their kernel: {missing[:5]}")
    kernels = _keyed({p: d.pop("kernel") for p, d in found.items()})
    adapters = _keyed(found)
    fn = _merge_donated if donate else _merge_kept
    out = {p: v for p, v in flatten(params).items() if not leaf_role(p[-1])}
    out.update(_unkeyed(fn(kernels, adapters)))
    return unflatten(out, params)


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
