"""apply: insert frozen A, B, a trainable R and the scale α/r beside every targeted kernel.

The transform is functional: it reads a param tree and returns a new tree in which each
targeted leaf ``.../<name>`` keeps its (unchanged, uncopied) array and gains four siblings

    <name>_loraxs_A      (*stack, *in_dims, r)   frozen, U_r Σ_r (or the init variant's basis)
    <name>_loraxs_B      (*stack, r, *out_dims)  frozen, V_rᵀ
    <name>_loraxs_R      (*stack, r, r)          trainable, N(0, r_std²)
    <name>_loraxs_scale  (*stack,)               frozen, α / r

``stack`` are leading axes that index independent matrices (``stacked_axes``, e.g. layers
stacked by ``nn.scan``); ``in_dims``/``out_dims`` split the remaining axes (a 2-D kernel is
(in, out); kernels with more axes need ``in_axes``). Models pick the leaves up through
``loraxs_jax.wrap`` (linen) or ``loraxs_jax.nnx.apply`` (NNX).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax.core import meta

from loraxs_jax.bases import Target, as_key, compute_bases, find_targets, path_key
from loraxs_jax.config import LoraXSConfig
from loraxs_jax.parallel.mesh import derived_spec
from loraxs_jax.tree import adapter_key, flatten, leaf_role, path_str, shape_of, unbox, unflatten


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
    n_stack, n_in = len(t.stack), len(t.in_dims)
    if isinstance(kernel, meta.Partitioned):
        names = derived_spec(kernel.names, len(t.shape), n_stack, n_in, role)
        return kernel.replace_boxed(value).replace(names=names)
    if isinstance(kernel, jax.core.Tracer) or isinstance(value, jax.core.Tracer):
        return value          # under jit/eval_shape: shardings come from the jit boundary
    sharding = getattr(kernel, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = derived_spec(tuple(sharding.spec), len(t.shape), n_stack, n_in, role)
        return jax.device_put(value, jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(*spec)))
    return value


def apply(params: Mapping, cfg: LoraXSConfig, rng: Any = 0, *,
          bases: Mapping[str, tuple[jax.Array, jax.Array]] | None = None) -> Mapping:
    """Insert LoRA-XS leaves beside every kernel that ``cfg.targets`` selects.

    Args:
      params: a nested dict of params (linen ``params``, a FrozenDict, or boxed
        ``nn.Partitioned`` leaves, whose axis names the new leaves inherit). An NNX module goes
        through ``loraxs_jax.nnx.apply``.
      cfg: the LoraXSConfig.
      rng: a PRNG key (or int seed) for R ~ N(0, cfg.r_std²). The bases do not depend on it.
      bases: precomputed {kernel path: (A, B)} (from ``bases.compute_bases`` or a bases cache).

    Returns:
      A new tree; base kernels are the very same arrays (never copied or mutated). Works under
      ``jax.eval_shape`` (count and plan a 7B model without weights) and ``jax.jit``.
    """
    targets = find_targets(params, cfg)
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
        a, b = bases[t.name]
        dtype = jnp.dtype(cfg.bases_dtype) if cfg.bases_dtype else unbox(kernel).dtype
        r = t.rank
        r_mat = cfg.r_std * jax.random.normal(path_key(r_key, t.name), t.stack + (r, r), r_dtype)
        scale = jnp.full(t.stack, cfg.alpha / r, jnp.float32)
        *parent, leaf = t.path
        for role, value in (("A", a.astype(dtype)), ("B", b.astype(dtype)),
                            ("R", r_mat), ("scale", scale)):
            new[(*parent, adapter_key(str(leaf), role))] = _place_like(kernel, value, t, role)
    return unflatten(new, params)


def count(params: Mapping, cfg: LoraXSConfig | None = None) -> dict[str, int]:
    """Parameter counts of an adapted tree (concrete or abstract, e.g. from jax.eval_shape).

    Returns: {'R': trainable LoRA-XS parameters (r² per adapted matrix, the paper's count),
    'extra': params trainable through ``cfg.trainable`` (the paper does not count the task head),
    'bases': frozen A and B entries, 'base': every other (frozen) param, 'adapted_matrices',
    'adapter_bytes': bytes of R on disk (r² × matrices × itemsize, without the file header)}.
    """
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
