"""loraxs-jax: LoRA-XS (Bałazy, Banaei, Aberer, Tabor) for JAX/Flax.

Each adapted kernel W (in, out) keeps its frozen truncated-SVD bases A = U_r Σ_r (in, r) and
B = V_rᵀ (r, out) and trains only R (r, r): y = x·W + (α/r)·((x·A)·R)·B.

The verbs::

    cfg = loraxs_jax.LoraXSConfig(rank=16, targets=(r"(q|v)_proj/kernel$",))
    params = loraxs_jax.apply(params, cfg, rng)          # insert A, B, R beside each target
    out = loraxs_jax.wrap(model.apply)({"params": params}, x)   # the unmodified model, adapted
    trainable, frozen = loraxs_jax.split(params, cfg)    # differentiate `trainable` only
    params = loraxs_jax.combine(trainable, frozen)
    tx = loraxs_jax.masked(optax.adamw(1e-3), cfg)       # or: an optimizer for R alone
    merged = loraxs_jax.merge(params)                    # plain tree, zero extra latency
    params = loraxs_jax.unmerge(merged, params)
    loraxs_jax.save_adapter(path, params, cfg)           # R alone: r² × matrices × bytes
    params = loraxs_jax.load_adapter(path, base_params)
    loraxs_jax.count(params)                             # {'R': r² × matrices, ...}

Namespaces: ``loraxs_jax.nnx`` (the same verbs for flax NNX models), ``loraxs_jax.parallel``
(meshes, shardings, jitted programs, multi-host), ``loraxs_jax.io`` (adapter files, base
fingerprints, the bases cache), ``loraxs_jax.bases``/``loraxs_jax.svd`` (how A and B are made).
"""

__version__ = "0.1.0"

from loraxs_jax import nnx, parallel  # noqa: F401  (namespaces: loraxs_jax.nnx.apply, ...)
from loraxs_jax.apply import apply, count
from loraxs_jax.config import LoraXSConfig
from loraxs_jax.intercept import wrap
from loraxs_jax.io import load_adapter, save_adapter
from loraxs_jax.merge import merge, unmerge
from loraxs_jax.partition import combine, masked, split

__all__ = [
    "LoraXSConfig", "apply", "combine", "count", "load_adapter", "masked", "merge",
    "save_adapter", "split", "unmerge", "wrap",
]
