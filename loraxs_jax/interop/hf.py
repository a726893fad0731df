"""A merged model as a Hugging Face folder that ``transformers`` loads with no LoRA-XS code.

The folder holds ``model.safetensors`` (PyTorch layout under transformers' task-model names:
``*ForSequenceClassification`` for encoders, ``*ForCausalLM`` for decoders), ``config.json``
and the tokenizer's files. ``config.json`` is written from our architecture config (over the
base's own, whose other keys, e.g. token ids, are kept) and read back through transformers and
our ``from_hf`` before anything is written: a field that would not survive the trip is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from loraxs_jax.interop.names import ARCHITECTURES, family, torch_tensors
from loraxs_jax.io import save_tensors
from loraxs_jax.merge import merge
from loraxs_jax.models import decoder, encoder
from loraxs_jax.parallel.hosts import write_file
from loraxs_jax.tree import is_adapted

# a base folder's files that travel with the weights: the tokenizer's (transformers 5 writes the
# first three) and the generation defaults
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "spiece.model", "generation_config.json")
# our fields that are not architecture (how we compute), skipped when checking the round trip
_COMPUTE = ("dtype", "param_dtype", "scan_layers", "remat")


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """Whether a folder holds a tokenizer's files."""
    return any((Path(folder) / n).is_file() for n in COPIED_FILES
               if n.startswith(("tokenizer", "vocab", "spiece")))


def _rope(c: decoder.DecoderConfig) -> dict[str, Any]:
    rope = {"rope_type": c.rope_type, "rope_theta": c.rope_theta}
    if c.rope_type in ("linear", "llama3"):
        rope["factor"] = c.rope_factor
    if c.rope_type == "llama3":
        rope.update(low_freq_factor=c.rope_low_freq_factor,
                    high_freq_factor=c.rope_high_freq_factor,
                    original_max_position_embeddings=c.rope_original_max_position)
    return rope


def _decoder_fields(c: decoder.DecoderConfig) -> dict[str, Any]:
    d = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, hidden_act=c.hidden_act,
        tie_word_embeddings=c.tie_word_embeddings, rope_parameters=_rope(c))
    if c.model_type in ("llama", "mistral", "gemma"):
        if c.qkv_bias != c.o_bias:
            raise ValueError(f"{c.model_type} has one attention_bias switch; q/k/v bias "
                             f"{c.qkv_bias} with o bias {c.o_bias} cannot be written")
        d["attention_bias"] = c.qkv_bias
    if c.model_type == "llama":
        d["mlp_bias"] = c.mlp_bias
    if c.model_type == "mistral":
        d["sliding_window"] = c.sliding_window
    if c.model_type == "qwen2":
        d.update(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window,
                 max_window_layers=0, layer_types=None)
    return d


def _encoder_fields(c: encoder.EncoderConfig) -> dict[str, Any]:
    if c.head != "cls":
        raise ValueError(f"head={c.head!r} (a linear layer on the mean-pooled tokens) has no "
                         f"transformers class; only head='cls' exports as "
                         f"{ARCHITECTURES[c.model_type]}")
    if c.roberta_position_ids != (c.model_type == "roberta"):
        raise ValueError(f"roberta_position_ids={c.roberta_position_ids} with model_type "
                         f"{c.model_type!r} has no transformers equivalent")
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_positions, type_vocab_size=c.type_vocab_size,
        pad_token_id=c.pad_token_id, layer_norm_eps=c.layer_norm_eps,
        hidden_act="gelu" if c.gelu_exact else "gelu_new",
        hidden_dropout_prob=c.hidden_dropout, attention_probs_dropout_prob=c.attention_dropout,
        classifier_dropout=c.classifier_dropout, initializer_range=c.initializer_range,
        position_embedding_type="absolute",
        id2label={str(i): f"LABEL_{i}" for i in range(c.num_labels)},
        label2id={f"LABEL_{i}": i for i in range(c.num_labels)},
        problem_type="regression" if c.num_labels == 1 else None)


def hf_config(config, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """config.json for our architecture ``config``: the base's own dict (``base``, if any) with
    every field we model set from ``config``, the task-model class and the params' dtype.

    Raises ValueError naming each field transformers would read back differently.
    """
    kind = family(config)
    fields = _encoder_fields(config) if kind == "encoder" else _decoder_fields(config)
    out = {k: v for k, v in dict(base or {}).items()
           if k not in ("rope_scaling", "rope_theta", "torch_dtype", "_name_or_path",
                        "architectures", "transformers_version")}
    out.update(fields, model_type=config.model_type,
               architectures=[ARCHITECTURES[config.model_type]],
               dtype=jnp.dtype(config.param_dtype).name)
    _check_round_trip(config, out)
    return out


def _check_round_trip(config, d: dict[str, Any]) -> None:
    from transformers import AutoConfig

    hf = AutoConfig.for_model(**d)
    if family(config) == "encoder":
        back = encoder.EncoderConfig.from_hf(hf, num_labels=config.num_labels, head=config.head)
    else:
        back = decoder.DecoderConfig.from_hf(hf)
    ours, theirs = dataclasses.asdict(config), dataclasses.asdict(back)
    bad = {k: (ours[k], theirs[k]) for k in ours if k not in _COMPUTE and ours[k] != theirs[k]}
    if bad:
        raise ValueError(f"config.json would not describe this {config.model_type} model: "
                         + "; ".join(f"{k}: ours {a!r}, read back {b!r}"
                                     for k, (a, b) in bad.items()))


def export_hf(params: Mapping, config, out: str | os.PathLike, *,
              tokenizer: Any = None, base_config: Mapping[str, Any] | str | os.PathLike | None = None,
              dtype: Any = None) -> Path:
    """Write a (merged, or adapted: it is merged first) model as a Hugging Face folder.

    Args:
      params: our param tree (plain or adapted).
      config: our architecture config (``EncoderConfig``/``DecoderConfig``).
      out: the folder to write.
      tokenizer: a folder whose tokenizer files are copied, or a transformers tokenizer
        (``save_pretrained``), or None.
      base_config: the base checkpoint's config.json (a dict, or a folder/file path), whose keys
        we do not model (token ids, ...) are kept.
      dtype: store the weights in this dtype (e.g. "bfloat16"); default the params' own.
    Returns: the folder. ``AutoModelFor{SequenceClassification,CausalLM}.from_pretrained(out)``
    then computes what our model computes.
    """
    if is_adapted(params):
        params = merge(params)
    if dtype is not None:
        config = dataclasses.replace(config, param_dtype=dtype)
    if base_config is not None and not isinstance(base_config, Mapping):
        p = Path(base_config)
        base_config = json.loads((p / "config.json" if p.is_dir() else p).read_text())
    cfg_json = hf_config(config, base_config)
    want = np.dtype(jnp.dtype(config.param_dtype))
    tensors = {k: v.astype(want) for k, v in torch_tensors(params, config).items()}
    out = Path(out)
    save_tensors(out / "model.safetensors", tensors, {"format": "pt"})
    write_file(out / "config.json", (json.dumps(cfg_json, indent=2) + "\n").encode())
    if isinstance(tokenizer, (str, os.PathLike)):
        src = Path(tokenizer)
        if not has_tokenizer(src):
            raise FileNotFoundError(f"{src} holds no tokenizer files (tokenizer.json, vocab.txt, "
                                    "...)")
        for n in COPIED_FILES:
            if (src / n).is_file():
                write_file(out / n, (src / n).read_bytes())
    elif tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
