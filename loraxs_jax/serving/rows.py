"""Per-row adapters in our models' forward passes and in KV-cache generation.

Each row b of a batch runs with the bank slot ``adapter_ids[b]`` (slot 0: the base model),
through the same interception as single-adapter use: ``intercept.replay(model.apply, ...,
rows=adapter_ids)`` adds (x·A)·R[ids[b]]·B at every adapted contraction, x·A and ·B shared
matmuls over the whole batch, the r×r step per row. ``arrays`` is ``AdapterBank.arrays()``
({'base', 'shared', 'state'}); pass it into jitted code as an argument.

* ``decoder_logits``: (B, T, vocab) of ``models.decoder`` with per-row adapters.
* ``encoder_logits``: (B, labels) of ``models.encoder``: the body with per-row R's, then each
  row's own head (the bank's extras, e.g. ``classifier/*``) by ``jax.vmap`` over ``classify``.
* ``generate``: ``models.generate.generate`` (prefill + ``lax.while_loop`` over a KV cache,
  greedy or sampled, left padding, EOS) with the replay inside the loop.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from loraxs_jax import intercept
from loraxs_jax.models.generate import generate as generate_tokens
from loraxs_jax.serving.bank import per_row_adapters
from loraxs_jax.tree import flatten, unflatten

HEAD_GROUPS = ("classifier", "pooler")   # top-level param groups only ``Encoder.classify`` reads


def _replay(model, arrays: Mapping[str, Any], rows: jax.Array, args: Sequence, kwargs: Mapping):
    return intercept.replay(model.apply, {"params": arrays["base"]},
                            per_row_adapters(arrays["shared"], arrays["state"]), tuple(args),
                            dict(kwargs), rows=rows)


def _no_extras(arrays: Mapping[str, Any], what: str) -> None:
    extra = sorted(set(arrays["state"]) - {k for k in arrays["state"] if k.endswith("_loraxs_R")})
    if extra:
        raise ValueError(f"{what}: the bank holds per-adapter extras {extra[:4]}, which this "
                         "model's per-row forward has no place for; build the bank with "
                         "trainable=() (adapters saved without a head)")


def decoder_logits(model, arrays: Mapping[str, Any], adapter_ids: jax.Array,
                   input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Logits (B, T, vocab) of a ``DecoderForCausalLM``; row b adapted by slot
    ``adapter_ids[b]`` (B,) int32. ``input_ids``, ``attention_mask`` (B, T)."""
    _no_extras(arrays, "decoder_logits")
    return _replay(model, arrays, adapter_ids, (input_ids,), {"attention_mask": attention_mask})


def encoder_logits(model, arrays: Mapping[str, Any], adapter_ids: jax.Array,
                   input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """float32 logits (B, labels) of an ``Encoder``; row b runs the body with slot
    ``adapter_ids[b]``'s R's and that slot's head (or the base's head when the bank holds no
    extras). ``input_ids``, ``attention_mask`` (B, T)."""
    state = arrays["state"]
    extras = sorted(k for k in state if not k.endswith("_loraxs_R"))
    outside = [p for p in extras if p.split("/")[0] not in HEAD_GROUPS]
    if outside:
        raise ValueError(f"encoder_logits: per-adapter extras {outside[:4]} lie outside the "
                         f"head {HEAD_GROUPS}; only a per-row head is supported")
    hidden = _replay(model, arrays, adapter_ids, (input_ids, attention_mask), {"method": "encode"})
    if not extras:
        return model.apply({"params": arrays["base"]}, hidden, attention_mask,
                           method="classify")
    base = {p: v for p, v in flatten(arrays["base"]).items()
            if "/".join(p) not in extras}
    heads = {p: state[p][adapter_ids] for p in extras}

    def one(head, h, m):
        params = unflatten({**base, **{tuple(p.split("/")): v for p, v in head.items()}})
        return model.apply({"params": params}, h[None], m[None], method="classify")[0]

    return jax.vmap(one)(heads, hidden, attention_mask)


@functools.lru_cache(maxsize=16)
def row_apply(model):
    """A ``model.apply``-like function for ``models.generate``: its ``params`` are
    ``{'arrays': bank.arrays(), 'rows': adapter_ids}``. One object per model, so the compiled
    generation program is cached across calls."""

    def apply_fn(variables, input_ids, attention_mask=None, cache=None,
                 last_logits_only=False):
        p = variables["params"]
        _no_extras(p["arrays"], "generate")
        return _replay(model, p["arrays"], p["rows"], (input_ids,),
                       {"attention_mask": attention_mask, "cache": cache,
                        "last_logits_only": last_logits_only})

    return apply_fn


def generate(model, arrays: Mapping[str, Any], adapter_ids: jax.Array, input_ids: jax.Array,
             attention_mask: jax.Array | None = None, max_new_tokens: int = 32,
             **kwargs: Any) -> jax.Array:
    """(B, max_new_tokens) int32 continuations of left-padded prompts (B, P), row b generated
    with slot ``adapter_ids[b]``; ``kwargs`` as ``models.generate.generate`` (temperature,
    top_k, top_p, rng, eos_token_id, pad_token_id)."""
    params = {"arrays": arrays, "rows": jnp.asarray(adapter_ids, jnp.int32)}
    return generate_tokens(row_apply(model), params, model.config, input_ids, attention_mask,
                        max_new_tokens, **kwargs)
