"""Merge LoRA-XS into plain kernels for deployment (W' = W + (α/r)·A·R·B), and back."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from loraxs_jax.geometry import Geometry
from loraxs_jax.parallel.jit import hashable
from loraxs_jax.tree import SUFFIX, adapted_kernels, flatten, leaf_role, path_str, unflatten


def delta_weight(w_shape: tuple[int, ...], a: jax.Array, r: jax.Array, b: jax.Array,
                 scale: jax.Array) -> jax.Array:
    """ΔW = (α/r)·A·R·B in float32, in the shape and axis order of a kernel of ``w_shape``, from
    its stored LoRA-XS leaves (their shapes carry the geometry, ``geometry.py``)."""
    return Geometry.from_leaves(w_shape, a.shape, b.shape, r.shape).delta(a, r, b, scale)


def merged_kernel(w: jax.Array, a: jax.Array, r: jax.Array, b: jax.Array, scale: jax.Array,
                  sign: float = 1.0) -> jax.Array:
    """W ± ΔW computed in float32 and cast back to W's dtype (``sign=-1`` unmerges)."""
    d = delta_weight(tuple(w.shape), a, r, b, scale)
    return (w.astype(jnp.float32) + sign * d).astype(w.dtype)


def _merged_kernels(kernels: dict, adapters: dict) -> dict:
    return {k: merged_kernel(w, *(adapters[k][r] for r in ("A", "R", "B", "scale")))
            for k, w in kernels.items()}


def _keyed(flat: dict) -> dict:
    # jit needs string-keyed pytrees with a stable order; paths become '\x1f'-joined strings.
    return {"\x1f".join(map(str, p)): v for p, v in flat.items()}


def _unkeyed(d: dict) -> dict:
    return {tuple(k.split("\x1f")): v for k, v in d.items()}


def _named(x) -> NamedSharding | None:
    s = getattr(x, "sharding", None)
    return s if isinstance(s, NamedSharding) else None


@functools.lru_cache(maxsize=16)
def _merge_program(donate: bool, in_key: tuple | None, out_key: tuple | None):
    """The jitted merge for one (donation, input shardings, output shardings); without
    shardings jit places the outputs itself (single device, or host arrays)."""
    kwargs = {}
    if in_key is not None:
        kwargs = {"in_shardings": jax.tree.unflatten(in_key[0], in_key[1]),
                  "out_shardings": jax.tree.unflatten(out_key[0], out_key[1])}
    return jax.jit(_merged_kernels, donate_argnums=(0,) if donate else (), **kwargs)


def merge(params: Mapping, donate: bool = False, out_shardings: Mapping | None = None
          ) -> Mapping:
    """A plain param tree, structured like the tree given to ``apply``, with each adapted kernel
    replaced by W + (α/r)·A·R·B (float32 accumulation, cast to W's dtype) and the LoRA-XS leaves
    removed. The merged model runs with zero extra latency. An adapted NNX module gives a plain
    module of its original class (``loraxs_jax.nnx.merge``).

    Jitted as one program over all adapted kernels. When the inputs are placed with
    ``NamedSharding``s (e.g. ``sharding.shard_params`` with ``sharding.adapted_shardings``) the
    program has explicit ``in_shardings`` (each input's own) and ``out_shardings``: by default
    every merged kernel keeps its W's sharding, so merging a 7B model on a mesh never gathers a
    kernel onto one device.

    Args:
      params: a tree from ``apply`` or ``load_adapter``.
      donate: donate the kernels' buffers so they are updated in place (the input tree must not
        be used afterwards): use it when memory is tight, e.g. a 7B model.
      out_shardings: optional tree like the merged (plain) tree, a ``NamedSharding`` per leaf
        (e.g. ``sharding.param_shardings`` for a serving mesh of another shape): each kernel is
        merged in its W's layout and then moved into this one, one array at a time.
    """
    from flax import nnx as flax_nnx

    if isinstance(params, flax_nnx.Module):
        from loraxs_jax import nnx

        return nnx.merge(params)
    found = adapted_kernels(params)
    if not found:
        raise ValueError("no LoRA-XS leaves (*_loraxs_R) in these params: nothing to merge")
    missing = [path_str(p) for p, d in found.items() if "kernel" not in d]
    if missing:
        raise ValueError(f"LoRA-XS leaves without their kernel: {missing[:5]}")
    kernels = _keyed({p: d.pop("kernel") for p, d in found.items()})
    adapters = _keyed(found)
    rest = {p: v for p, v in flatten(params).items() if not leaf_role(p[-1])}
    in_sh = (jax.tree.map(_named, kernels), jax.tree.map(_named, adapters))
    sharded = all(s is not None for s in jax.tree.leaves(in_sh, is_leaf=lambda x: x is None))
    out_sh = in_sh[0] if sharded else None
    if out_shardings is not None:
        want = flatten(out_shardings)
        lacking = [path_str(p) for p in rest if p not in want]
        if lacking:
            raise ValueError(f"out_shardings has no entry for {lacking[:5]}"
                             f"{' ...' if len(lacking) > 5 else ''}")
    fn = _merge_program(donate, hashable(in_sh) if sharded else None,
                        hashable(out_sh) if sharded else None)
    merged = _unkeyed(fn(kernels, adapters))
    if out_shardings is not None:
        # Merged in W's layout, then moved kernel by kernel: a layout change inside the merge
        # program would let XLA hold every kernel's gathered copy at once.
        rest = {p: jax.device_put(v, want[p]) for p, v in rest.items() if p not in merged}
        merged = {p: jax.device_put(v, want[p], donate=True) for p, v in merged.items()}
    rest.update(merged)
    return unflatten(rest, params)


@jax.jit
def _unmerge_flat(merged: dict, adapters: dict) -> dict:
    out = dict(merged)
    for k, v in adapters.items():
        out[k] = v
    for base_path, d in adapted_kernels(unflatten(_unkeyed(adapters), {})).items():
        key = "\x1f".join(map(str, base_path))
        out[key] = merged_kernel(merged[key], d["A"], d["R"], d["B"], d["scale"], sign=-1.0)
    return out


def unmerge(merged: Mapping, adapters: Mapping) -> Mapping:
    """Undo ``merge``: W = W' − (α/r)·A·R·B, and the LoRA-XS leaves of ``adapters`` (an adapted
    tree, or any tree holding its ``*_loraxs_*`` leaves) put back. Exact to float32 round-off for
    float32 kernels (a bf16 kernel loses what bf16 cannot hold)."""
    flat_a = {p: v for p, v in flatten(adapters).items() if p[-1].find(SUFFIX) > 0}
    if not flat_a:
        raise ValueError("`adapters` holds no LoRA-XS leaves")
    missing = [path_str(p) for p in adapted_kernels(unflatten(flat_a, {}))
               if p not in flatten(merged)]
    if missing:
        raise ValueError(f"merged params lack the adapted kernels {missing[:5]}")
    return unflatten(_unkeyed(_unmerge_flat(_keyed(flatten(merged)), _keyed(flat_a))), merged)
