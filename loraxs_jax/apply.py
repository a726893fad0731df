"""apply: insert frozen A, B, a trainable R and the scale α/r beside every targeted kernel.

The transform is functional: it reads a param tree and returns a new tree in which each
targeted leaf ``.../<name>`` keeps its (unchanged, uncopied) array and gains four siblings

    <name>_loraxs_A      (*stack, *in_dims, r)   frozen, U_r Σ_r (or the init variant's basis)
    <name>_loraxs_B      (*stack, r, *out_dims)  frozen, V_rᵀ
    <name>_loraxs_R      (*stack, r, r)          trainable, N(0, r_std²)
    <name>_loraxs_scale  (*stack,)               frozen, α / r

``stack`` are axes that index independent matrices (e.g. layers stacked by ``nn.scan``);
``in_dims``/``out_dims`` are the axes the model contracts with its input and the rest. That split
(the kernel's geometry, ``geometry.py``) is read from the model itself with ``forward=`` (one
abstract trace), or else taken from the config (a 2-D kernel is (in, out); more axes need
``in_axes``). A kernel whose axes are not stack-then-inputs-then-outputs (a torch-layout (out, in)
kernel, gemma's (heads, d_model, head_dim) q_einsum) keeps its own axis order in A and B (see
``geometry.py``). Models pick the leaves up through ``loraxs_jax.wrap``; an NNX module is adapted
in place of its params (``loraxs_jax.nnx``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax.core import meta

from loraxs_jax.bases import (
    Target,
    as_key,
    compute_bases,
    find_targets,
    matching_kernels,
    path_key,
)
from loraxs_jax.config import LoraXSConfig
from loraxs_jax.geometry import Geometry
from loraxs_jax.intercept import discover
from loraxs_jax.parallel.mesh import derived_spec
from loraxs_jax.tree import (
    adapted_kernels,
    adapter_key,
    flatten,
    leaf_role,
    path_str,
    shape_of,
    unbox,
    unflatten,
)


def _check_finite(targets: list[Target], flat: Mapping) -> None:
    concrete = [t for t in targets if not isinstance(unbox(flat[t.path]), jax.core.Tracer)]
    if not concrete:
        return
    ok = jax.device_get([jnp.isfinite(jnp.asarray(unbox(flat[t.path]))).all() for t in concrete])
    bad = [t.name for t, good in zip(concrete, ok) if not good]
    if bad:
        raise ValueError(f"base kernel(s) contain NaN or Inf, cannot take their SVD: {bad[:5]}"
                         f"{' ...' if len(bad) > 5 else ''}")


def _place_like(kernel, value, t: Target, role: str):
    """Box with derived axis names, and/or put on the derived NamedSharding, like the kernel."""
    if isinstance(kernel, meta.Partitioned):
        names = derived_spec(kernel.names, t.geometry, role)
        return kernel.replace_boxed(value).replace(names=names)
    if isinstance(kernel, jax.core.Tracer) or isinstance(value, jax.core.Tracer):
        return value          # under jit/eval_shape: shardings come from the jit boundary
    sharding = getattr(kernel, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = derived_spec(tuple(sharding.spec), t.geometry, role)
        return jax.device_put(value, jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(*spec)))
    return value


def geometries(params: Mapping, cfg: LoraXSConfig, forward: Callable[[Any], Any]
               ) -> dict[str, Geometry]:
    """{kernel path: geometry} of every kernel ``cfg`` targets, read from the contractions that
    consume it in ``forward(params)`` (one abstract trace: ``intercept.discover``). The config's
    ``stacked_axes`` (leading) declare stack axes the contraction treats as free (e.g. k and v
    stacked in one einsum weight)."""
    params = meta.unbox(params)
    names = {path_str(p): shape for p, shape in matching_kernels(params, cfg).items()}
    hints = {n: range(cfg.stacked_axes_for(n)) for n in names if cfg.stacked_axes_for(n)}
    return discover(lambda p: forward(p), params, targets=names, stack_hints=hints)


def apply(params: Any, cfg: LoraXSConfig, rng: Any = 0, *,
          bases: Mapping[str, tuple[jax.Array, jax.Array]] | None = None,
          forward: Callable[[Any], Any] | None = None) -> Any:
    """Insert LoRA-XS leaves beside every kernel that ``cfg.targets`` selects.

    Args:
      params: a nested dict of params (linen ``params``, a FrozenDict, or boxed
        ``nn.Partitioned`` leaves, whose axis names the new leaves inherit), or an NNX module
        (then an adapted copy of the module is returned, see ``loraxs_jax.nnx``).
      cfg: the LoraXSConfig.
      rng: a PRNG key (or int seed) for R ~ N(0, cfg.r_std²). The bases do not depend on it.
      bases: precomputed {kernel path: (A, B)} in the canonical layout (from
        ``bases.compute_bases`` or a bases cache).
      forward: ``forward(params) -> anything`` that runs the model on example inputs, e.g.
        ``lambda p: model.apply({"params": p}, tokens)`` (for an NNX module: ``forward(module)``).
        It is traced once, abstractly, to read each kernel's geometry from the contraction that
        consumes it, so any kernel layout works (einsum weights, torch-layout x·Wᵀ, ...). Without
        it a 2-D kernel is (in, out) and more axes need ``cfg.in_axes``.

    Returns:
      A new tree; base kernels are the very same arrays (never copied or mutated). Works under
      ``jax.eval_shape`` (count and plan a 7B model without weights) and ``jax.jit``.
    """
    if _is_nnx(params):
        from loraxs_jax import nnx

        return nnx.apply(params, cfg, rng, bases=bases, forward=forward)
    found = geometries(params, cfg, forward) if forward is not None else None
    return insert(params, cfg, find_targets(params, cfg, found), rng, bases)


def insert(params: Mapping, cfg: LoraXSConfig, targets: list[Target], rng: Any = 0,
           bases: Mapping[str, tuple[jax.Array, jax.Array]] | None = None) -> Mapping:
    """``apply`` for known targets (``bases.find_targets``): the SVDs (unless ``bases`` are
    given, canonical) and the new leaves, stored in each target's geometry."""
    flat = flatten(params)
    _check_finite(targets, flat)
    if bases is None:
        bases = compute_bases(params, cfg, targets)
    r_key = as_key(rng)
    r_dtype = jnp.dtype(cfg.r_dtype)
    new = dict(flat)
    for t in targets:
        kernel = flat[t.path]
        if t.name not in bases:
            raise KeyError(f"no precomputed bases for {t.name}")
        a, b = t.geometry.store(*bases[t.name])
        dtype = jnp.dtype(cfg.bases_dtype) if cfg.bases_dtype else unbox(kernel).dtype
        r = t.rank
        r_mat = cfg.r_std * jax.random.normal(path_key(r_key, t.name), t.stack + (r, r), r_dtype)
        scale = jnp.full(t.stack, cfg.alpha / r, jnp.float32)
        *parent, leaf = t.path
        for role, value in (("A", a.astype(dtype)), ("B", b.astype(dtype)),
                            ("R", r_mat), ("scale", scale)):
            new[(*parent, adapter_key(str(leaf), role))] = _place_like(kernel, value, t, role)
    return unflatten(new, params)


def adapted_geometries(params: Mapping) -> dict[str, Geometry]:
    """{kernel path: geometry} of an adapted tree, read from its stored leaves' shapes."""
    out = {}
    for path, d in adapted_kernels(params).items():
        if "kernel" in d:
            out[path_str(path)] = Geometry.from_leaves(
                shape_of(d["kernel"]), shape_of(d["A"]), shape_of(d["B"]), shape_of(d["R"]))
    return out


def _is_nnx(x: Any) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Module)


def count(params: Any, cfg: LoraXSConfig | None = None) -> dict[str, int]:
    """Parameter counts of an adapted tree (concrete or abstract, e.g. from jax.eval_shape) or
    an adapted NNX module.

    Returns: {'R': trainable LoRA-XS parameters (r² per adapted matrix, the paper's count),
    'extra': params trainable through ``cfg.trainable`` (the paper does not count the task head),
    'bases': frozen A and B entries, 'base': every other (frozen) param, 'adapted_matrices',
    'adapter_bytes': bytes of R on disk (r² × matrices × itemsize, without the file header)}.
    """
    if _is_nnx(params):
        from loraxs_jax import nnx

        params = nnx.params(params)
    res = {"R": 0, "extra": 0, "bases": 0, "base": 0, "adapted_matrices": 0, "adapter_bytes": 0}
    for path, leaf in flatten(params).items():
        leaf = unbox(leaf)
        size = math.prod(shape_of(leaf))
        role = leaf_role(path[-1])
        if role and role[1] == "R":
            res["R"] += size
            res["adapted_matrices"] += math.prod(shape_of(leaf)[:-2])
            res["adapter_bytes"] += size * jnp.dtype(leaf.dtype).itemsize
        elif role and role[1] in ("A", "B"):
            res["bases"] += size
        elif role:
            continue
        elif cfg is not None and cfg.is_extra_trainable(path_str(path)):
            res["extra"] += size
        else:
            res["base"] += size
    return res
