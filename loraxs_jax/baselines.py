"""Baselines on the same machinery, for side-by-side comparisons (``method=lora``).

LoRA (Hu et al. 2021) is LoRA-XS with the roles swapped: ΔW = (α/r)·A·B with A (in, r)
Kaiming-uniform and B (r, out) zeros, both trained, and no r×r matrix. We store it in the very
same leaves (``*_loraxs_A``, ``*_loraxs_B``, with R fixed to the identity), so ``wrap``,
``merge``, sharding and counting apply unchanged; only what is trained differs
(``LORA_TRAINABLE`` instead of R). The identity R costs one r×r matmul per layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from loraxs_jax.config import LoraXSConfig
from loraxs_jax.transform import _as_key, apply, find_targets, flatten, leaf_role, path_key, unflatten

LORA_TRAINABLE = (r"_loraxs_(A|B)$",)


def lora_apply(params: Mapping, cfg: LoraXSConfig, rng: Any = 0) -> Mapping:
    """Insert LoRA factors for ``cfg``'s targets and ranks: A ~ U(±1/√in) (PEFT's default),
    B = 0 (so the model starts as the base), R = I; A and B in float32 (they are trained)."""
    targets = find_targets(params, cfg)
    key = _as_key(rng)
    bases = {}
    for t in targets:
        lim = 1.0 / math.sqrt(t.m)
        a = jax.random.uniform(path_key(key, t.name), t.stack + t.in_dims + (t.rank,),
                               jnp.float32, -lim, lim)
        bases[t.name] = (a, jnp.zeros(t.stack + (t.rank,) + t.out_dims, jnp.float32))
    adapted = apply(params, dataclasses.replace(cfg, r_std=0.0, bases_dtype="float32"), rng,
                    bases=bases)
    flat = dict(flatten(adapted))
    for p, v in flat.items():
        role = leaf_role(p[-1])
        if role and role[1] == "R":
            flat[p] = jnp.broadcast_to(jnp.eye(v.shape[-1], dtype=v.dtype), v.shape)
    return unflatten(flat, adapted)
