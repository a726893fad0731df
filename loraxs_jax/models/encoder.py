"""BERT and RoBERTa encoders in Flax linen, with Hugging Face param paths, and their loader.

One implementation serves both families (Devlin et al. 2019; Liu et al. 2019, the paper's GLUE
model is RoBERTa-large); ``EncoderConfig`` switches what differs: RoBERTa's position ids
(padding_idx + 1 + index among non-pad tokens), token-type embeddings, layer-norm epsilon, exact
or tanh GELU, and the classification head.

Every projection is a plain ``nn.Dense`` with a 2-D kernel (in, out); the model knows nothing of
LoRA-XS (``loraxs_jax.wrap`` adapts its contractions).

Param paths ('/'-joined, ``params`` collection), H = hidden_size, I = intermediate_size,
for i in 0..num_layers-1::

  embeddings/word_embeddings/embedding                  (vocab_size, H)
  embeddings/position_embeddings/embedding              (max_positions, H)
  embeddings/token_type_embeddings/embedding            (type_vocab_size, H), if type_vocab_size>0
  embeddings/LayerNorm/{scale,bias}                     (H,)
  encoder/layer/{i}/attention/self/{query,key,value}/{kernel,bias}     (H, H), (H,)
  encoder/layer/{i}/attention/output/dense/{kernel,bias}              (H, H), (H,)
  encoder/layer/{i}/attention/output/LayerNorm/{scale,bias}           (H,)
  encoder/layer/{i}/intermediate/dense/{kernel,bias}                  (H, I), (I,)
  encoder/layer/{i}/output/dense/{kernel,bias}                        (I, H), (H,)
  encoder/layer/{i}/output/LayerNorm/{scale,bias}                     (H,)
  head="cls", BERT:     pooler/dense/{kernel,bias} (H, H); classifier/{kernel,bias} (H, labels)
  head="cls", RoBERTa:  classifier/dense/{kernel,bias} (H, H); classifier/out_proj/{kernel,bias}
  head="mean":          classifier/{kernel,bias} (H, labels)

With ``scan_layers=True`` the layers are one ``nn.scan``-ed module and the index disappears:
``encoder/layer/attention/self/query/kernel`` has shape (num_layers, H, H), leading logical axis
'layers' (give LoRA-XS ``stacked_axes=1`` for those paths).

The paper's four GLUE targets (query, value, attention output dense, FFN output dense) are
``PAPER_TARGETS``, regexes searched in kernel paths (``LoraXSConfig(targets=PAPER_TARGETS)``)::

  attention/self/(query|value)/kernel$
  output/dense/kernel$

The second is the paper's suffix match "output.dense": it hits both
``encoder/layer/{i}/attention/output/dense/kernel`` and ``encoder/layer/{i}/output/dense/kernel``
(both are targets) and nothing in the heads. Pinned down fully:
``^encoder/layer/(\\d+/)?(attention/self/(query|value)|(attention/)?output/dense)/kernel$``.

Logical axis names: params use 'vocab', 'embed', 'heads' (H = heads·head_dim, flattened),
'mlp', 'classes', 'layers' (scan); activations use 'batch', 'length', 'embed', 'heads', 'kv',
'mlp'. Map them to a mesh with ``nn.logical_axis_rules``; ``param_logical_axes(config)`` gives
the tree of logical PartitionSpecs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from loraxs_jax.models.hub import HFFolder
from loraxs_jax.models.layers import embedding_lookup
from loraxs_jax.tree import flatten, unflatten

logger = logging.getLogger(__name__)

PAPER_TARGETS = (r"attention/self/(query|value)/kernel$", r"output/dense/kernel$")
SUPPORTED_MODEL_TYPES = ("bert", "roberta")
HEADS = ("cls", "mean")
_GELU = {"gelu": True, "gelu_new": False, "gelu_pytorch_tanh": False}  # name -> exact?


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Architecture and numerics of one BERT/RoBERTa encoder with a classification head.

    Attributes:
      model_type: "bert" or "roberta": the checkpoint's key prefix and the "cls" head's shape.
      vocab_size: rows of the word embedding.
      hidden_size: H, the model width.
      num_layers: transformer layers.
      num_heads: attention heads; H must divide evenly.
      intermediate_size: I, the FFN width.
      max_positions: rows of the position embedding (RoBERTa: max length + pad_token_id + 1).
      type_vocab_size: rows of the token-type embedding; 0 means the model has none.
      pad_token_id: id of the padding token (RoBERTa's positions are counted past it).
      roberta_position_ids: positions are pad_token_id + 1 + index among non-pad tokens, and
        pad_token_id at padding (HF ``create_position_ids_from_input_ids``); else 0..T-1.
      layer_norm_eps: epsilon of every LayerNorm (BERT 1e-12, RoBERTa 1e-5).
      gelu_exact: erf GELU (HF "gelu"); False is the tanh approximation ("gelu_new").
      hidden_dropout: dropout on embeddings and every residual branch.
      attention_dropout: dropout on attention probabilities.
      classifier_dropout: dropout in the head; None uses hidden_dropout (as HF).
      num_labels: head outputs; 1 is regression (STS-B).
      head: "cls": HF's sequence-classification head (BERT: pooler dense+tanh on [CLS], then
        classifier; RoBERTa: dense+tanh+out_proj on <s>); "mean": a fresh linear layer on the
        attention-masked mean of the last hidden states (for sentence-transformers models whose
        pooler was never trained).
      dtype: computation dtype (activations); e.g. "bfloat16".
      param_dtype: dtype params are created (and loaded) in.
      scan_layers: run the layers as one ``nn.scan`` (stacked params, fast compiles).
      remat: rematerialise each layer in the backward pass (less activation memory).
      initializer_range: std of the normal init of fresh kernels and embeddings (HF's 0.02).
    """

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    roberta_position_ids: bool = False
    layer_norm_eps: float = 1e-12
    gelu_exact: bool = True
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    classifier_dropout: float | None = None
    num_labels: int = 2
    head: str = "cls"
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    scan_layers: bool = False
    remat: bool = False
    initializer_range: float = 0.02

    def __post_init__(self):
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not an encoder we implement; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if self.head not in HEADS:
            raise ValueError(f"head {self.head!r} is unknown; choose one of {', '.join(HEADS)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1 (1 = regression), got {self.num_labels}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf_config: Any, num_labels: int = 2, head: str = "cls",
                **options: Any) -> EncoderConfig:
        """From a transformers ``BertConfig``/``RobertaConfig``; ``options`` set the other fields
        (dtype, param_dtype, scan_layers, remat, dropouts, ...)."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported by the encoder family "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        position_type = getattr(hf_config, "position_embedding_type", "absolute") or "absolute"
        if position_type != "absolute":
            raise ValueError(f"position_embedding_type {position_type!r} is not supported; "
                             "only 'absolute' position embeddings are implemented")
        if hf_config.hidden_act not in _GELU:
            raise ValueError(f"hidden_act {hf_config.hidden_act!r} is not supported; "
                             f"supported: {', '.join(_GELU)}")
        fields = dict(
            model_type=model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=hf_config.num_attention_heads,
            intermediate_size=hf_config.intermediate_size,
            max_positions=hf_config.max_position_embeddings,
            type_vocab_size=hf_config.type_vocab_size,
            pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0,
            roberta_position_ids=model_type == "roberta",
            layer_norm_eps=hf_config.layer_norm_eps,
            gelu_exact=_GELU[hf_config.hidden_act],
            hidden_dropout=hf_config.hidden_dropout_prob,
            attention_dropout=hf_config.attention_probs_dropout_prob,
            classifier_dropout=getattr(hf_config, "classifier_dropout", None),
            initializer_range=hf_config.initializer_range,
            num_labels=num_labels,
            head=head,
        )
        return cls(**{**fields, **options})


def roberta_large_config(num_labels: int = 2, head: str = "cls", **options: Any) -> EncoderConfig:
    """roberta-large (355M, the paper's GLUE model), without the hub."""
    return EncoderConfig(**{**dict(
        model_type="roberta", vocab_size=50265, hidden_size=1024, num_layers=24, num_heads=16,
        intermediate_size=4096, max_positions=514, type_vocab_size=1, pad_token_id=1,
        roberta_position_ids=True, layer_norm_eps=1e-5, num_labels=num_labels, head=head),
        **options})


def roberta_base_config(num_labels: int = 2, head: str = "cls", **options: Any) -> EncoderConfig:
    """roberta-base (125M), without the hub."""
    return roberta_large_config(num_labels, head, **{**dict(
        hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072), **options})


# ------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------

def _dense(config: EncoderConfig, features: int, axes: tuple[str | None, str | None],
           name: str) -> nn.Dense:
    """A plain Dense whose kernel (in, out) and bias carry logical axis names."""
    return nn.Dense(
        features, dtype=config.dtype, param_dtype=config.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(config.initializer_range), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]))


def _layer_norm(config: EncoderConfig, name: str = "LayerNorm") -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype,
        name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


def _embed(config: EncoderConfig, rows: int, axes: tuple[str | None, str], name: str) -> nn.Embed:
    return nn.Embed(
        rows, config.hidden_size, dtype=config.dtype, param_dtype=config.param_dtype, name=name,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(config.initializer_range), axes))


def _hidden(x: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def position_ids(input_ids: jax.Array, config: EncoderConfig) -> jax.Array:
    """(B, T) position ids: 0..T-1 (BERT) or RoBERTa's pad_token_id + 1 + index among non-pad
    tokens, pad_token_id at pad tokens."""
    if not config.roberta_position_ids:
        return jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    real = (input_ids != config.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=-1) * real + config.pad_token_id


class Embeddings(nn.Module):
    """word + position (+ token type) embeddings, LayerNorm, dropout: (B, T) ids -> (B, T, H)."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic: bool):
        cfg = self.config
        x = embedding_lookup(_embed(cfg, cfg.vocab_size, ("vocab", "embed"), "word_embeddings"),
                             input_ids)
        x += embedding_lookup(_embed(cfg, cfg.max_positions, (None, "embed"),
                                     "position_embeddings"), position_ids(input_ids, cfg), None)
        if cfg.type_vocab_size:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(input_ids)
            x += embedding_lookup(_embed(cfg, cfg.type_vocab_size, (None, "embed"),
                                         "token_type_embeddings"), token_type_ids, None)
        x = _layer_norm(cfg)(x)
        x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
        return _hidden(x)


class SelfAttention(nn.Module):
    """Multi-head attention over the unpadded keys: (B, T, H) -> (B, T, H) (before the output
    projection). ``jax.nn.dot_product_attention`` when no attention dropout is drawn; with
    dropout, the same maths spelled out so the probabilities can be dropped."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        cfg = self.config
        b, t, _ = x.shape
        q, k, v = (
            nn.with_logical_constraint(
                _dense(cfg, cfg.hidden_size, ("embed", "heads"), name)(x).reshape(
                    b, t, cfg.num_heads, cfg.head_dim),
                ("batch", "length", "heads", "kv"))
            for name in ("query", "key", "value"))
        keep = mask[:, None, None, :]  # (B, 1, 1, S): a query attends to the real keys
        if deterministic or cfg.attention_dropout == 0.0:
            out = jax.nn.dot_product_attention(q, k, v, mask=keep)
        else:
            logits = jnp.einsum("btnd,bsnd->bnts", q, k).astype(jnp.float32)
            logits = jnp.where(keep, logits / math.sqrt(cfg.head_dim), jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
            probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=False)
            out = jnp.einsum("bnts,bsnd->btnd", probs, v)
        return out.reshape(b, t, cfg.hidden_size)


class AddNorm(nn.Module):
    """HF's *Output block: LayerNorm(residual + dropout(dense(x))), children dense, LayerNorm."""

    config: EncoderConfig
    in_axis: str

    @nn.compact
    def __call__(self, x, residual, deterministic: bool):
        cfg = self.config
        x = _dense(cfg, cfg.hidden_size, (self.in_axis, "embed"), "dense")(x)
        x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
        return _hidden(_layer_norm(cfg)(x + residual))


class Attention(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        a = SelfAttention(self.config, name="self")(x, mask, deterministic)
        return AddNorm(self.config, "heads", name="output")(a, x, deterministic)


class Intermediate(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "dense")(x)
        x = nn.gelu(x, approximate=not cfg.gelu_exact)
        return nn.with_logical_constraint(x, ("batch", "length", "mlp"))


class Layer(nn.Module):
    """One post-LN transformer layer: (B, T, H) -> (B, T, H); returns (x, None) under scan."""

    config: EncoderConfig
    scanned: bool = False

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        x = Attention(self.config, name="attention")(x, mask, deterministic)
        h = Intermediate(self.config, name="intermediate")(x)
        x = AddNorm(self.config, "mlp", name="output")(h, x, deterministic)
        return (x, None) if self.scanned else x


class LayerStack(nn.Module):
    """The unscanned layers as children "0".."N-1", so paths read encoder/layer/{i}/..."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        layer = nn.remat(Layer, static_argnums=(3,)) if self.config.remat else Layer
        for i in range(self.config.num_layers):
            x = layer(self.config, name=str(i))(x, mask, deterministic)
        return x


class Transformer(nn.Module):
    """HF's ``encoder``: the stack of layers (child ``layer``)."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        cfg = self.config
        if not cfg.scan_layers:
            return LayerStack(cfg, name="layer")(x, mask, deterministic)
        layer = Layer
        if cfg.remat:
            layer = nn.remat(layer, static_argnums=(3,), prevent_cse=False)
        scanned = nn.scan(
            layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = scanned(cfg, scanned=True, name="layer")(x, mask, deterministic)
        return x


class Pooler(nn.Module):
    """BERT's pooler: tanh(dense(h[:, 0]))."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, hidden):
        return jnp.tanh(_dense(self.config, self.config.hidden_size, ("embed", None),
                               "dense")(hidden[:, 0]))


class RobertaHead(nn.Module):
    """RoBERTa's classification head on <s>: out_proj(dropout(tanh(dense(dropout(h[:, 0])))))."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, hidden, deterministic: bool):
        cfg = self.config
        drop = nn.Dropout(_classifier_dropout(cfg))
        x = drop(hidden[:, 0], deterministic=deterministic)
        x = jnp.tanh(_dense(cfg, cfg.hidden_size, ("embed", None), "dense")(x))
        x = drop(x, deterministic=deterministic)
        return _dense(cfg, cfg.num_labels, ("embed", "classes"), "out_proj")(x)


def _classifier_dropout(config: EncoderConfig) -> float:
    return config.hidden_dropout if config.classifier_dropout is None else config.classifier_dropout


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """(B, T, H), (B, T) -> (B, H) float32: the mean over real tokens (sentence-transformers'
    pooling, clamping the count at 1e-9)."""
    m = attention_mask.astype(jnp.float32)[..., None]
    return (hidden.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


class Encoder(nn.Module):
    """A BERT/RoBERTa encoder with a sequence-classification head.

    ``apply({"params": p}, input_ids, attention_mask, token_type_ids=None, deterministic=True,
    rngs={"dropout": key})`` -> float32 logits (B, num_labels). ``method=Encoder.encode`` gives
    the last hidden states (B, T, H); ``method=Encoder.embed`` the mean-pooled sentence
    embeddings (B, H) float32. ids and mask are (B, T); the mask is 1 at real tokens.
    """

    config: EncoderConfig

    def setup(self):
        cfg = self.config
        self.embeddings = Embeddings(cfg)
        self.encoder = Transformer(cfg)
        if cfg.head == "cls" and cfg.model_type == "roberta":
            self.classifier = RobertaHead(cfg)
        else:
            if cfg.head == "cls":
                self.pooler = Pooler(cfg)
            self.classifier = _dense(cfg, cfg.num_labels, ("embed", "classes"), "classifier")
            self.head_dropout = nn.Dropout(_classifier_dropout(cfg))

    def encode(self, input_ids, attention_mask=None, token_type_ids=None,
               deterministic: bool = True):
        x = self.embeddings(input_ids, token_type_ids, deterministic)
        return self.encoder(x, _mask(input_ids, attention_mask).astype(bool), deterministic)

    def embed(self, input_ids, attention_mask=None, token_type_ids=None,
              deterministic: bool = True):
        hidden = self.encode(input_ids, attention_mask, token_type_ids, deterministic)
        return mean_pool(hidden, _mask(input_ids, attention_mask))

    def classify(self, hidden, attention_mask, deterministic: bool = True):
        """The head alone: (B, T, H) last hidden states -> float32 logits (B, num_labels)."""
        cfg = self.config
        if cfg.head == "cls" and cfg.model_type == "roberta":
            return self.classifier(hidden, deterministic).astype(jnp.float32)
        if cfg.head == "cls":
            x = self.pooler(hidden)
        else:
            x = mean_pool(hidden, attention_mask).astype(cfg.dtype)
        x = self.head_dropout(x, deterministic=deterministic)
        return self.classifier(x).astype(jnp.float32)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None,
                 deterministic: bool = True):
        hidden = self.encode(input_ids, attention_mask, token_type_ids, deterministic)
        return self.classify(hidden, _mask(input_ids, attention_mask), deterministic)


def _mask(input_ids, attention_mask):
    """No mask means every token is real."""
    return jnp.ones_like(input_ids) if attention_mask is None else attention_mask


# ------------------------------------------------------------------------------------------
# Init, logical axes, loading
# ------------------------------------------------------------------------------------------

def _dummy_inputs() -> tuple[jax.Array, jax.Array]:
    return jnp.ones((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32)


def boxed_param_shapes(config: EncoderConfig) -> dict:
    """The param tree as ``nn.Partitioned`` boxes of ``jax.ShapeDtypeStruct`` (logical axis
    names included), without allocating anything."""
    return jax.eval_shape(Encoder(config).init, jax.random.key(0), *_dummy_inputs())["params"]


def param_shapes(config: EncoderConfig) -> dict:
    """The param tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything."""
    return nn.meta.unbox(boxed_param_shapes(config))


def init_encoder(config: EncoderConfig, rng: jax.Array) -> dict:
    """Fresh params (a plain tree, no partitioning boxes) for training from scratch or tests."""
    params = jax.jit(Encoder(config).init)(rng, *_dummy_inputs())["params"]
    return nn.meta.unbox(params)


def param_logical_axes(config: EncoderConfig) -> dict:
    """The params tree with a logical ``PartitionSpec`` at each leaf (no arrays are made)."""
    return nn.get_partition_spec(boxed_param_shapes(config))


def _init_head(config: EncoderConfig, rng: jax.Array) -> dict:
    """Fresh pooler/classifier params only (the body is never materialised)."""
    hidden = jnp.zeros((1, 2, config.hidden_size), config.dtype)
    init = partial(Encoder(config).init, method=Encoder.classify)
    return nn.meta.unbox(jax.jit(init)(rng, hidden, jnp.ones((1, 2), jnp.int32))["params"])


_HEAD = ("pooler", "classifier")  # top-level param groups freshly initialised when missing
_IGNORED = ("pooler", "classifier", "lm_head", "cls")  # checkpoint groups we may leave unused
_BUFFERS = ("position_ids", "token_type_ids")  # non-persistent buffers some checkpoints keep
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def torch_name(path: tuple[str, ...], prefix: str) -> str:
    """encoder/layer/0/attention/self/query/kernel -> {prefix}encoder.layer.0.attention.self
    .query.weight (the classifier sits outside the base model's prefix, as in HF). ``prefix`` is
    "bert." / "roberta." for the transformers task models, "" for bare sentence-transformers
    folders."""
    name = ".".join(path[:-1] + (_LEAF[path[-1]],))
    return name if path[0] == "classifier" else prefix + name


def checkpoint_prefix(model_type: str, keys) -> str:
    """The prefix of a checkpoint's base-model tensors: "bert." / "roberta." for transformers'
    task and base models, "" for sentence-transformers / bare base-model folders."""
    prefix = f"{model_type}."
    return prefix if any(k.startswith(prefix) for k in keys) else ""


def hf_names(path: tuple[str, ...], config: EncoderConfig,
             prefix: str | None = None) -> tuple[list[str], bool]:
    """The Hugging Face tensor names of one of our params and whether it is transposed there
    (kernels (in, out) are torch Linear weights (out, in)); one name per layer for a scanned
    layer param (stacked on axis 0). ``prefix`` defaults to the task model's ("bert."); names
    are those of ``{Bert,Roberta}ForSequenceClassification``."""
    prefix = f"{config.model_type}." if prefix is None else prefix
    transpose = path[-1] == "kernel"
    if config.scan_layers and path[:2] == ("encoder", "layer"):
        return [torch_name(path[:2] + (str(i),) + path[2:], prefix)
                for i in range(config.num_layers)], transpose
    return [torch_name(path, prefix)], transpose


def _listing(kind: str, items: list[str], limit: int = 20) -> str:
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)} {kind}:\n  " + "\n  ".join(items[:limit]) + more


def load_encoder(
    path_or_id: str | os.PathLike,
    num_labels: int = 2,
    head: str = "cls",
    dtype: Any = jnp.float32,
    sharding: Callable[[str], jax.sharding.Sharding] | None = None,
    rng: jax.Array | None = None,
    *,
    fresh_head: bool = False,
    **options: Any,
) -> tuple[EncoderConfig, dict]:
    """Load a Hugging Face BERT/RoBERTa folder (or hub id) into ``Encoder`` params.

    Reads ``bert.``/``roberta.``-prefixed checkpoints (``*ForSequenceClassification``,
    ``*Model``, masked-LM) and sentence-transformers folders whose keys lack the prefix. Tensors
    are streamed one at a time: read (memory-mapped), transposed to (in, out) for Linear weights,
    cast to ``param_dtype`` on the host, then ``device_put`` — with ``sharding(path)`` when given
    (``path`` is the '/'-joined param path) — so the whole model never sits on one device.

    Args:
      path_or_id: a checkpoint folder (config.json + safetensors) or a hub id.
      num_labels: head outputs (1 = regression).
      head: "cls" or "mean" (see ``EncoderConfig``).
      dtype: computation dtype and, unless ``param_dtype`` is in ``options``, the params' dtype.
      sharding: maps a param path to the Sharding it is placed with; None: default device.
      rng: key for head params the checkpoint lacks; default ``jax.random.key(0)``.
      fresh_head: initialise ``classifier/*`` afresh even if the checkpoint has one (e.g. an
        MNLI-tuned checkpoint, 3 labels, as the start for RTE, 2 labels). Always so for
        head="mean": a checkpoint's classifier was trained on the [CLS] pooler, not the mean.
      **options: other ``EncoderConfig`` fields (scan_layers, remat, dropouts, ...).

    Returns:
      (config, params): params a plain nested dict of arrays, paths as in the module docstring.

    Raises:
      ValueError: an unsupported model_type, or tensors missing (outside the head), unexpected,
        or of the wrong shape, each listed by name.
    """
    ckpt = HFFolder(path_or_id)
    options.setdefault("param_dtype", dtype)
    config = EncoderConfig.from_hf(ckpt.config(), num_labels=num_labels, head=head,
                                   dtype=dtype, **options)
    keys = set(ckpt.keys())
    prefix = checkpoint_prefix(config.model_type, keys)

    # Plan on the unscanned layout (one tensor per path); stack afterwards if scanning.
    flat_config = dataclasses.replace(config, scan_layers=False)
    expected = flatten(param_shapes(flat_config))
    fresh_head = fresh_head or config.head == "mean"  # no HF checkpoint has a mean head
    sources, fresh, missing, mismatched = {}, [], [], []
    absent_head = False  # a head part the checkpoint lacks although nobody asked for a fresh one
    for path, want in expected.items():
        name = torch_name(path, prefix)
        if (fresh_head and path[0] == "classifier") or (name not in keys and path[0] in _HEAD):
            absent_head |= not (fresh_head and path[0] == "classifier")
            fresh.append(path)
            continue
        if name not in keys:
            missing.append(f"{name} (for {'/'.join(path)})")
            continue
        shape = ckpt.shape(name)
        shape = shape[::-1] if path[-1] == "kernel" else shape
        if shape != want.shape:
            mismatched.append(f"{name}: checkpoint {tuple(ckpt.shape(name))} "
                              f"(as {'/'.join(path)}: {shape}), model wants {want.shape}")
        sources[path] = name
    used = set(sources.values())
    unused = sorted(keys - used)
    ignored = [k for k in unused if k.removeprefix(prefix).split(".")[0] in _IGNORED
               or k.rsplit(".", 1)[-1] in _BUFFERS]
    unexpected = sorted(set(unused) - set(ignored))
    problems = [_listing(kind, items) for kind, items in (
        ("missing tensors", missing), ("tensors with the wrong shape", mismatched),
        ("unexpected tensors", unexpected)) if items]
    if problems:
        raise ValueError(f"checkpoint {ckpt.folder} does not fit {config.model_type} "
                         f"{config.num_layers}x{config.hidden_size} (head={head!r}, "
                         f"num_labels={num_labels}):\n" + "\n".join(problems))
    if ignored:
        logger.info("not used from %s: %s", ckpt.folder, ", ".join(ignored))

    param_dtype = np.dtype(config.param_dtype)

    def place(path: tuple[str, ...], host: np.ndarray) -> jax.Array:
        target = sharding("/".join(path)) if sharding is not None else None
        return jax.device_put(host, target)

    def read(path: tuple[str, ...]) -> np.ndarray:
        arr = ckpt.get(sources[path])
        return (arr.T if path[-1] == "kernel" else arr).astype(param_dtype)

    flat = {}
    if config.scan_layers:
        stacked: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
        for path in sources:
            if path[:2] == ("encoder", "layer"):
                stacked.setdefault(path[:2] + path[3:], []).append(path)
            else:
                flat[path] = place(path, read(path))
        for path, per_layer in stacked.items():
            per_layer.sort(key=lambda p: int(p[2]))
            flat[path] = place(path, np.stack([read(p) for p in per_layer]))
    else:
        flat = {path: place(path, read(path)) for path in sources}
    if fresh:
        init = flatten(_init_head(config, jax.random.key(0) if rng is None else rng))
        flat.update({path: place(path, np.asarray(init[path])) for path in fresh})
        logger.log(logging.WARNING if absent_head else logging.INFO,
                   "freshly initialised (not taken from %s; train them): %s", ckpt.folder,
                   ", ".join("/".join(p) for p in fresh))
    return config, unflatten(flat)
