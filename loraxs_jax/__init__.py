"""loraxs-jax: LoRA-XS (Bałazy, Banaei, Aberer, Tabor) for JAX/Flax.

Each adapted kernel W (in, out) keeps its frozen truncated-SVD bases A = U_r Σ_r (in, r) and
B = V_rᵀ (r, out) and trains only R (r, r): y = x·W + (α/r)·((x·A)·R)·B.

The verbs::

    params = loraxs_jax.apply(params, cfg, rng)          # insert A, B, R beside each target
    out = loraxs_jax.wrap(model.apply)({"params": params}, x)   # the unmodified model, adapted
    trainable, frozen = loraxs_jax.split(params, cfg)    # differentiate `trainable` only
    merged = loraxs_jax.merge(params)                    # plain tree, zero extra latency
    loraxs_jax.save_adapter(path, params, cfg)           # R alone: r² × matrices × bytes
    params = loraxs_jax.load_adapter(path, base_params)
"""

__version__ = "0.1.0"

from loraxs_jax.adapters import (
    adapter_info,
    cached_bases,
    fingerprint,
    load_adapter,
    save_adapter,
)
from loraxs_jax.config import INITS, LoraXSConfig
from loraxs_jax.layers import (
    LoraXSBasis,
    LoraXSLinear,
    LoraXSR,
    loraxs_delta,
    nnx_apply,
    nnx_load_adapter,
    nnx_merge,
    nnx_params,
    wrap,
)
from loraxs_jax.merge import delta_weight, merge, unmerge
from loraxs_jax.optim import combine, masked, split, trainable_mask
from loraxs_jax.svd import truncated_svd
from loraxs_jax.transform import adapted_kernels, apply, compute_bases, count, derived_spec

__all__ = [
    "INITS", "LoraXSBasis", "LoraXSConfig", "LoraXSLinear", "LoraXSR", "adapted_kernels",
    "adapter_info", "apply", "cached_bases", "combine", "compute_bases", "count", "delta_weight",
    "derived_spec", "fingerprint", "load_adapter", "loraxs_delta", "masked", "merge", "nnx_apply",
    "nnx_load_adapter", "nnx_merge", "nnx_params", "save_adapter", "split", "trainable_mask",
    "truncated_svd", "unmerge", "wrap",
]
