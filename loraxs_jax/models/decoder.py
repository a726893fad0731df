"""One Flax linen decoder for the paper's causal LMs: Llama-2, Llama-3/3.1, Mistral, Qwen2, Gemma.

The families differ only in switches of :class:`DecoderConfig` (rope base and scaling, sliding
window, q/k/v bias, GeGLU + (1+w) RMSNorm + scaled embeddings for Gemma, grouped-query attention,
tied or separate LM head), so one module tree serves them all.

Param paths mirror Hugging Face names so LoRA-XS target regexes read the same as PEFT's::

    model/embed_tokens/embedding                      (vocab, hidden)
    model/layers_{i}/self_attn/{q,k,v,o}_proj/kernel  (in, out), plus bias where the family has one
    model/layers_{i}/mlp/{gate,up,down}_proj/kernel   (in, out)
    model/layers_{i}/{input,post_attention}_layernorm/weight
    model/norm/weight
    lm_head/kernel                                    (hidden, vocab); absent with tied embeddings

With ``scan_layers=True`` the layers are one ``nn.scan``: paths become ``model/layers/...`` and
every layer param gains a leading layer axis (logical name ``'layers'``). Every projection is a
plain ``nn.Dense`` with an (in, out) kernel; the model knows nothing of LoRA-XS.

Forward::

    logits = model.apply({"params": p}, input_ids, attention_mask=None, positions=None)
    logits, cache = model.apply({"params": p}, input_ids, attention_mask, cache=cache)

``input_ids`` (B, T) int; ``attention_mask`` (B, T), 1 for tokens and 0 for padding (left padding
is the supported layout); ``positions`` (B, T) defaults to the count of real tokens before each one
(cache included), so left-padded rows get rotary positions 0, 1, ... as if unpadded. ``cache`` is
:func:`init_cache`'s dict; the new tokens are written at ``cache["index"]`` and the updated cache is
returned. Logits are (B, T, vocab) in the compute dtype; ``last_logits_only=True`` computes only
the last position's (B, 1, vocab), which is what generation needs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from loraxs_jax.models.layers import embedding_lookup
from loraxs_jax.tree import path_keys

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma")
# The paper's math and commonsense targets: every projection of a layer (q, k, v, o, gate, up,
# down), as regexes searched in kernel paths (``LoraXSConfig(targets=PAPER_TARGETS)``).
PAPER_TARGETS = (r"self_attn/(q|k|v|o)_proj/kernel$", r"mlp/(gate|up|down)_proj/kernel$")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}
_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture (Hugging Face meaning and units) plus how to compute it."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # grouped-query attention: num_heads % num_kv_heads == 0
    head_dim: int  # may differ from hidden_size // num_heads (Gemma)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default", "linear" or "llama3"
    rope_factor: float = 1.0  # linear / llama3 scaling factor
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_position: int = 8192  # llama3 only: pre-extension context length
    max_position_embeddings: int = 4096
    sliding_window: int | None = None  # a query sees keys with q_pos - k_pos < sliding_window
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"  # gate activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU)
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + weight), weight init 0
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    dtype: Any = jnp.float32  # compute dtype of activations and matmuls
    param_dtype: Any = jnp.float32  # storage dtype of params
    scan_layers: bool = False  # nn.scan over layers: one compiled layer, stacked params
    remat: str = "none"  # "none", "full" or "dots_saveable" (see REMAT_POLICIES)

    def __post_init__(self):
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope_type {self.rope_type!r} is not one of default, linear, llama3")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")

    @classmethod
    def from_hf(cls, hf_config, **overrides) -> DecoderConfig:
        """Reads a transformers config; ``overrides`` set fields such as dtype or scan_layers."""
        mt = getattr(hf_config, "model_type", None)
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {mt!r} is not supported by loraxs_jax.models.decoder; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        c = hf_config
        rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"{mt}: rope_type {rope_type!r} is not supported "
                             "(supported: default, linear, llama3)")
        sliding = None
        if mt == "mistral":
            sliding = getattr(c, "sliding_window", None)
        layer_types = getattr(c, "layer_types", None) or []
        if mt == "qwen2" and getattr(c, "use_sliding_window", False):
            kinds = set(layer_types)
            if kinds != {"sliding_attention"}:
                raise NotImplementedError(
                    f"qwen2 with sliding window on only some layers ({sorted(kinds)}) is not "
                    "supported: one window for all layers only")
            sliding = c.sliding_window
        heads = c.num_attention_heads
        attention_bias = bool(getattr(c, "attention_bias", False))
        fields = dict(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            rms_norm_eps=c.rms_norm_eps,
            rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
            max_position_embeddings=c.max_position_embeddings,
            sliding_window=sliding,
            qkv_bias=True if mt == "qwen2" else attention_bias,
            o_bias=False if mt == "qwen2" else attention_bias,
            mlp_bias=bool(getattr(c, "mlp_bias", False)),
            hidden_act=getattr(c, "hidden_act", None) or "silu",
            norm_plus_one=mt == "gemma",
            scale_embeddings=mt == "gemma",
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            model_type=mt,
        )
        fields.update(overrides)
        return cls(**fields)


def rope_inv_freq(config: DecoderConfig) -> np.ndarray:
    """Inverse rotary frequencies (head_dim/2,) float32, with linear or Llama-3.1 scaling.

    Llama 3.1 (Meta's ``apply_scaling``): wavelengths longer than original_context/low_freq_factor
    are divided by ``factor``, shorter than original_context/high_freq_factor kept, and those in
    between interpolated smoothly.
    """
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    if config.rope_type == "linear":
        inv = inv / config.rope_factor
    elif config.rope_type == "llama3":
        factor, lo = config.rope_factor, config.rope_low_freq_factor
        hi = config.rope_high_freq_factor
        old = config.rope_original_max_position
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def _apply_rope(x, cos, sin):
    """Rotates halves (HF ``rotate_half`` layout); x (B, T, H, D), cos/sin (B, T, D/2)."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _dense(config: DecoderConfig, features: int, axes: tuple[str, str], use_bias: bool, name: str):
    return nn.Dense(
        features, use_bias=use_bias, dtype=config.dtype, param_dtype=config.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
        name=name)


class RMSNorm(nn.Module):
    """x / rms(x) in float32, times weight (Llama) or (1 + weight) (Gemma)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        init = nn.initializers.zeros_init() if c.norm_plus_one else nn.initializers.ones_init()
        w = self.param("weight", nn.with_logical_partitioning(init, ("embed",)),
                       (x.shape[-1],), c.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + c.rms_norm_eps)
        if c.norm_plus_one:
            return (normed * (1.0 + w.astype(jnp.float32))).astype(c.dtype)
        return normed.astype(c.dtype) * w.astype(c.dtype)


class Attention(nn.Module):
    """Grouped-query attention with rotary positions through ``jax.nn.dot_product_attention``."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x, mask, cos, sin, kv_cache, cache_index):
        """x (B, T, hidden); mask (B, 1, T, S) bool; kv_cache None or (k, v) each (B, S, K, D).

        Returns the output (B, T, hidden) and this step's (k, v), each (B, T, K, D), for the caller
        to write into the cache.
        """
        c = self.config
        b, t, _ = x.shape
        q = _dense(c, c.num_heads * c.head_dim, ("embed", "heads"), c.qkv_bias, "q_proj")(x)
        k = _dense(c, c.num_kv_heads * c.head_dim, ("embed", "kv"), c.qkv_bias, "k_proj")(x)
        v = _dense(c, c.num_kv_heads * c.head_dim, ("embed", "kv"), c.qkv_bias, "v_proj")(x)
        q = _apply_rope(q.reshape(b, t, c.num_heads, c.head_dim), cos, sin)
        k = _apply_rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), cos, sin)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", None))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv", None))
        keys, values = k, v
        if kv_cache is not None:
            ck, cv = kv_cache
            at = (0, cache_index, 0, 0)
            keys = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), at).astype(c.dtype)
            values = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), at).astype(c.dtype)
        out = jax.nn.dot_product_attention(q, keys, values, mask=mask, scale=c.head_dim**-0.5,
                                           implementation=None)
        out = out.reshape(b, t, c.num_heads * c.head_dim)
        return _dense(c, c.hidden_size, ("heads", "embed"), c.o_bias, "o_proj")(out), (k, v)


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU or GeGLU."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = _dense(c, c.intermediate_size, ("embed", "mlp"), c.mlp_bias, "gate_proj")(x)
        up = _dense(c, c.intermediate_size, ("embed", "mlp"), c.mlp_bias, "up_proj")(x)
        h = nn.with_logical_constraint(_ACTIVATIONS[c.hidden_act](gate) * up,
                                       ("batch", "length", "mlp"))
        return _dense(c, c.hidden_size, ("mlp", "embed"), c.mlp_bias, "down_proj")(h)


class DecoderLayer(nn.Module):
    """Pre-norm block; ``(x, ...) -> (x, new (k, v))`` so it can be the body of ``nn.scan``."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x, mask, cos, sin, kv_cache, cache_index):
        c = self.config
        h, new_kv = Attention(c, name="self_attn")(
            RMSNorm(c, name="input_layernorm")(x), mask, cos, sin, kv_cache, cache_index)
        x = x + h
        x = x + MLP(c, name="mlp")(RMSNorm(c, name="post_attention_layernorm")(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), new_kv


def _layer_class(config: DecoderConfig):
    cls = DecoderLayer
    if config.remat != "none":
        cls = nn.remat(cls, policy=REMAT_POLICIES[config.remat], prevent_cse=not config.scan_layers)
    if config.scan_layers:
        cls = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                      length=config.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    return cls


class DecoderModel(nn.Module):
    """Embeddings, layers and final norm (HF's ``model.*``)."""

    config: DecoderConfig

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("vocab", "embed")))
        cls = _layer_class(c)
        if c.scan_layers:
            self.layers = cls(c)
        else:
            self.layers = [cls(c) for _ in range(c.num_layers)]
        self.norm = RMSNorm(c)

    def __call__(self, input_ids, mask, cos, sin, cache_kv, cache_index):
        """Returns final hidden states (B, T, hidden) and new (k, v), each (L, B, T, K, D)."""
        c = self.config
        x = embedding_lookup(self.embed_tokens, input_ids)
        if c.scale_embeddings:
            x = x * jnp.asarray(math.sqrt(c.hidden_size), c.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        if c.scan_layers:
            x, new_kv = self.layers(x, mask, cos, sin, cache_kv, cache_index)
        else:
            ks, vs = [], []
            for i, layer in enumerate(self.layers):
                layer_kv = None if cache_kv is None else (cache_kv[0][i], cache_kv[1][i])
                x, (k, v) = layer(x, mask, cos, sin, layer_kv, cache_index)
                ks.append(k)
                vs.append(v)
            new_kv = (jnp.stack(ks), jnp.stack(vs))
        return self.norm(x), new_kv

    def attend(self, x):
        """Tied LM head: x @ embedding.T."""
        return self.embed_tokens.attend(x)


def _attention_mask(q_slot, k_slot, key_valid, q_pos, k_pos, window):
    """(B, 1, T, S) bool: causal over slots, real keys, sliding window over positions.

    A query always sees itself, so pad rows (which see no real key) never go empty.
    """
    allowed = key_valid[:, None, :] & (k_slot[None, None, :] <= q_slot[None, :, None])
    if window is not None:
        allowed &= (q_pos[:, :, None] - k_pos[:, None, :]) < window
    allowed |= k_slot[None, None, :] == q_slot[None, :, None]
    return allowed[:, None]


class DecoderForCausalLM(nn.Module):
    """The causal LM (HF ``*ForCausalLM``); see the module docstring for the call signature."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None,
                 last_logits_only: bool = False):
        c = self.config
        b, t = input_ids.shape
        mask = (jnp.ones((b, t), bool) if attention_mask is None
                else jnp.asarray(attention_mask).astype(bool))
        prior = 0 if cache is None else jnp.sum(cache["mask"], axis=-1, keepdims=True)
        if positions is None:
            positions = jnp.maximum(prior + jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1, 0)
        positions = jnp.asarray(positions, jnp.int32)
        freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(c))
        cos, sin = jnp.cos(freqs), jnp.sin(freqs)
        if cache is None:
            slots = jnp.arange(t)
            attn = _attention_mask(slots, slots, mask, positions, positions, c.sliding_window)
            cache_kv, index = None, None
        else:
            index = cache["index"]
            key_valid = jax.lax.dynamic_update_slice(cache["mask"], mask, (0, index))
            key_pos = jax.lax.dynamic_update_slice(cache["pos"], positions, (0, index))
            attn = _attention_mask(index + jnp.arange(t), jnp.arange(key_valid.shape[1]),
                                   key_valid, positions, key_pos, c.sliding_window)
            cache_kv = (cache["k"], cache["v"])
        model = DecoderModel(c, name="model")
        h, (k, v) = model(input_ids, attn, cos, sin, cache_kv, index)
        if last_logits_only:  # generation needs one row of (vocab) logits, not T
            h = h[:, -1:]
        if c.tie_word_embeddings:
            logits = model.attend(h)
        else:
            logits = _dense(c, c.vocab_size, ("embed", "vocab"), False, "lm_head")(h)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        if cache is None:
            return logits
        at = (0, 0, index, 0, 0)
        new_cache = {
            "k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at),
            "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at),
            "mask": key_valid, "pos": key_pos, "index": index + t,
        }
        return logits, new_cache


def init_cache(config: DecoderConfig, batch_size: int, max_length: int, dtype=None) -> dict:
    """An empty KV cache for ``max_length`` tokens per row.

    Returns ``{"k", "v": (L, B, S, K, D) in dtype (default: compute dtype), "mask": (B, S) bool
    (slot holds a real token), "pos": (B, S) int32 (its rotary position), "index": () int32
    (next slot to write)}``.
    """
    shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
    dtype = config.dtype if dtype is None else dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "mask": jnp.zeros((batch_size, max_length), bool),
            "pos": jnp.zeros((batch_size, max_length), jnp.int32),
            "index": jnp.zeros((), jnp.int32)}


def _boxed_init(config: DecoderConfig, rng):
    return DecoderForCausalLM(config).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def init_params(config: DecoderConfig, rng: jax.Array) -> dict:
    """Randomly initialised params as a plain (unboxed) tree."""
    return nn.meta.unbox(jax.jit(_boxed_init, static_argnums=0)(config, rng))


def boxed_param_shapes(config: DecoderConfig) -> dict:
    """The param tree as ``nn.Partitioned`` boxes of ``jax.ShapeDtypeStruct`` (logical axis
    names included), without allocating anything."""
    return jax.eval_shape(functools.partial(_boxed_init, config), jax.random.key(0))


def param_shapes(config: DecoderConfig) -> dict:
    """The param tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything."""
    return nn.meta.unbox(boxed_param_shapes(config))


def param_logical_axes(config: DecoderConfig) -> dict:
    """Logical axis names per param, e.g. ``('embed', 'heads')`` for q_proj/kernel.

    Names: 'vocab', 'embed', 'heads', 'kv', 'mlp', and 'layers' for the scanned layer axis.
    Map them to mesh axes with ``nn.logical_to_mesh_sharding``.
    """
    specs = nn.get_partition_spec(boxed_param_shapes(config))
    return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


# --------------------------------------------------------------------------------------------
# Loading Hugging Face tensors.

_LAYER = re.compile(r"^layers_(\d+)$")
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def hf_names(path: tuple[str, ...], config: DecoderConfig) -> tuple[list[str], bool]:
    """The Hugging Face tensor names of one of our params and whether it is transposed there.

    ``("model", "layers_0", "self_attn", "q_proj", "kernel")`` -> ``(["model.layers.0.self_attn
    .q_proj.weight"], True)``: a kernel (in, out) is the transpose of the torch Linear weight
    (out, in). With ``scan_layers`` a layer param holds every layer stacked on axis 0, and the
    list has one name per layer. The loader and the exporters (``loraxs_jax.interop``) both use
    this one mapping.
    """
    *mods, leaf = path
    transpose = leaf == "kernel"
    leaf = {"kernel": "weight", "embedding": "weight"}.get(leaf, leaf)
    mods = [m.replace("_", ".", 1) if _LAYER.match(m) else m for m in mods]
    if config.scan_layers and "layers" in mods:
        at = mods.index("layers")
        return [".".join([*mods[:at + 1], str(i), *mods[at + 1:], leaf])
                for i in range(config.num_layers)], transpose
    return [".".join([*mods, leaf])], transpose


def load_params(source, config: DecoderConfig,
                sharding: Callable[[str], jax.sharding.Sharding] | None = None) -> dict:
    """Converts HF-named tensors into our param tree, one tensor at a time.

    Args:
      source: anything with ``keys()``, ``shape(name)`` and ``get(name) -> np.ndarray`` in
        PyTorch layout (a :class:`~loraxs_jax.models.hub.HFFolder`, a GGUF view).
      config: the architecture; its ``param_dtype`` is the dtype of the result.
      sharding: optional ``path -> Sharding`` (path like ``"model/layers_0/mlp/up_proj/kernel"``);
        each converted tensor is ``jax.device_put`` there directly.
    Returns:
      A plain param tree matching :func:`param_shapes`.
    Raises:
      ValueError listing every missing tensor, unexpected tensor and shape mismatch by name.
    """
    expected = param_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(expected)
    available = set(source.keys())
    plan, missing, mismatched, used = [], [], [], set()
    for path, want in leaves:
        path = path_keys(path)
        names, transpose = hf_names(path, config)
        shape = want.shape[1:] if len(names) > 1 else want.shape
        hf_shape = tuple(reversed(shape)) if transpose else tuple(shape)
        for name in names:
            if name not in available:
                missing.append(name)
            elif tuple(source.shape(name)) != hf_shape:
                mismatched.append(f"{name}: checkpoint {tuple(source.shape(name))}, "
                                  f"expected {hf_shape}")
            used.add(name)
        plan.append((path, names, transpose, want))
    ignorable = {n for n in available if _IGNORED.search(n)}
    if config.tie_word_embeddings:
        ignorable.add("lm_head.weight")
    unexpected = sorted(available - used - ignorable)
    if missing or mismatched or unexpected:
        parts = [f"checkpoint does not fit {config.model_type} ({config.num_layers} layers, "
                 f"hidden {config.hidden_size}):"]
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
        raise ValueError("\n".join(parts))

    def convert(name, transpose):
        x = np.asarray(source.get(name))
        return (x.T if transpose else x).astype(config.param_dtype)

    out = []
    for path, names, transpose, want in plan:
        if len(names) == 1:
            host = convert(names[0], transpose)
        else:  # scanned: one stacked host buffer per param, filled layer by layer
            host = np.empty(want.shape, config.param_dtype)
            for i, name in enumerate(names):
                host[i] = convert(name, transpose)
        target = sharding("/".join(path)) if sharding is not None else None
        out.append(jax.device_put(host, target))
        del host
    return jax.tree_util.tree_unflatten(treedef, out)


def load_decoder(path_or_hub_id, dtype=jnp.float32, param_dtype=jnp.float32,
                 sharding: Callable[[str], jax.sharding.Sharding] | None = None,
                 **config_overrides) -> tuple[DecoderConfig, dict]:
    """Loads a Hugging Face causal-LM folder (or hub id) into ``(DecoderConfig, params)``.

    ``config_overrides`` set other :class:`DecoderConfig` fields (``scan_layers=True``,
    ``remat="full"``). Use the model as ``DecoderForCausalLM(config)``.
    """
    from loraxs_jax.models.hub import HFFolder

    ckpt = HFFolder(path_or_hub_id)
    config = DecoderConfig.from_hf(ckpt.config(), dtype=dtype, param_dtype=param_dtype,
                                   **config_overrides)
    return config, load_params(ckpt, config, sharding)
