"""A merged Llama-family model as a llama.cpp GGUF file: the inverse of ``models.gguf``.

Tensors get llama.cpp's names (``models.gguf.gguf_name``) in PyTorch layout, the rows of q and k
re-permuted for llama.cpp's interleaved rotary pairs (``permute_rotary``: q with the attention
heads, k with the key/value heads), 1-D norms in float32 and matrices in the chosen type
(``gguf.quants``). The hyperparameters llama.cpp requires go into ``llama.*`` keys; the
tokenizer's ``tokenizer.ggml.*`` keys are copied from a source GGUF file or converted from a
Hugging Face byte-level BPE tokenizer folder. Only what our GGUF loader and llama.cpp's
``llama`` architecture both read is written; anything else (rope scaling, biases, a sliding
window, Qwen2 or Gemma) is refused by name: export a Hugging Face folder (``export_hf``) and
convert that with llama.cpp's ``convert_hf_to_gguf.py``.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from loraxs_jax.interop.names import torch_tensors
from loraxs_jax.merge import merge
from loraxs_jax.models.decoder import DecoderConfig
from loraxs_jax.models.gguf import gguf_name, permute_rotary
from loraxs_jax.parallel.hosts import is_main_process, sync
from loraxs_jax.tree import is_adapted

TYPES = ("f32", "f16", "bf16", "q8_0")   # storage of the matrices; norms stay f32
# byte-level BPE pre-tokenizers (tokenizer.json) by the name llama.cpp and our loader give them
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_PRE = {"gpt2": [_BYTE_LEVEL],
        "smollm": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]}


def check_llama(config: DecoderConfig) -> None:
    """Refuse, naming it, what the GGUF 'llama' architecture (and our loader) cannot hold."""
    if not isinstance(config, DecoderConfig):
        raise ValueError(f"GGUF export takes a decoder (DecoderConfig), not "
                         f"{type(config).__name__}")
    problems = []
    if config.model_type not in ("llama", "mistral"):
        problems.append(f"model_type {config.model_type!r} (llama.cpp has its own architecture "
                        "for it)")
    if config.sliding_window is not None:
        problems.append(f"a sliding window of {config.sliding_window}")
    if config.rope_type != "default":
        problems.append(f"rope_type {config.rope_type!r}")
    if config.qkv_bias or config.o_bias or config.mlp_bias:
        problems.append("projection biases")
    if config.hidden_act != "silu" or config.norm_plus_one or config.scale_embeddings:
        problems.append(f"hidden_act {config.hidden_act!r} / Gemma-style norms or embeddings")
    if problems:
        raise NotImplementedError(
            "GGUF export writes llama.cpp's 'llama' architecture (Llama, and Mistral without a "
            f"sliding window) and this model has {', '.join(problems)}; export a Hugging Face "
            "folder (export hf) and convert it with llama.cpp's convert_hf_to_gguf.py")


def _hparams(writer, config: DecoderConfig, file_type) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim * config.num_heads != config.hidden_size:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)


def _copy_tokenizer(writer, source: str | os.PathLike) -> None:
    """Every ``tokenizer.*`` key of a GGUF file, as is."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(os.fspath(source))
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in fields:
        raise ValueError(f"{source} holds no tokenizer (tokenizer.ggml.tokens)")
    for key, f in fields.items():
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), f.types[0], sub_type=sub)


def _convert_tokenizer(writer, folder: str | os.PathLike, vocab_size: int) -> None:
    """A Hugging Face byte-level BPE tokenizer (tokenizer.json) as ``tokenizer.ggml.*`` keys,
    as llama.cpp's converter writes them: tokens by id (missing ids as unused ``[PAD{i}]``),
    special added tokens as control tokens, merges, special ids and chat template from gguf's
    ``SpecialVocab``."""
    from gguf import SpecialVocab, TokenType
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.fspath(folder))
    spec = json.loads(tok.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    name = next((n for n, want in _PRE.items() if len(want) == len(steps) and all(
        all(s.get(k) == v for k, v in w.items()) for s, w in zip(steps, want))), None)
    if spec["model"]["type"] != "BPE" or name is None or spec.get("normalizer"):
        raise NotImplementedError(
            f"{folder}: GGUF export converts byte-level BPE tokenizers with a GPT-2 or SmolLM "
            f"pre-tokenizer and no normalizer; this one is {spec['model']['type']} with "
            f"pre-tokenizer {pre} (pass tokenizer= a GGUF file to copy its tokenizer instead)")
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"{folder}: token ids reach {max(vocab.values())}, the model's vocab is "
                         f"{vocab_size}")
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = (TokenType.NORMAL if text not in added else
                    TokenType.CONTROL if added[text].special else TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def export_gguf(params: Mapping, config: DecoderConfig, out: str | os.PathLike, *,
                tokenizer: str | os.PathLike, quant: str = "f32", name: str | None = None
                ) -> Path:
    """Write a (merged, or adapted: merged first) Llama-family model as a GGUF file.

    Args:
      params: our decoder params.
      config: its DecoderConfig (checked by :func:`check_llama`).
      out: the .gguf file, written atomically.
      tokenizer: a .gguf file whose tokenizer keys are copied (e.g. the base model's), or a
        Hugging Face folder with a byte-level BPE tokenizer.json.
      quant: "f32", "f16", "bf16" or "q8_0" for the matrices (``gguf.quants``).
      name: ``general.name``.
    Returns: the file. ``models.gguf.load_gguf`` (and llama.cpp) read it back.
    """
    from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType, quants

    check_llama(config)
    if quant not in TYPES:
        raise ValueError(f"quant {quant!r} is not one of {', '.join(TYPES)}")
    qtype = GGMLQuantizationType[quant.upper()]
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                 "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}[quant]
    if is_adapted(params):
        params = merge(params)
    tensors = torch_tensors(params, config)
    out = Path(out)
    if is_main_process():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
        try:
            writer = GGUFWriter(tmp, arch="llama")
            writer.add_name(name or "loraxs-jax merged model")
            _hparams(writer, config, file_type)
            if Path(tokenizer).suffix == ".gguf":
                _copy_tokenizer(writer, tokenizer)
            else:
                _convert_tokenizer(writer, tokenizer, config.vocab_size)
            writer.add_quantization_version(GGML_QUANT_VERSION)
            heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}
            kept = []
            for hf, x in tensors.items():
                proj = hf.split(".")[-2]
                x = permute_rotary(x, heads[proj]) if proj in heads else x
                x = np.ascontiguousarray(x, np.float32)
                t = qtype if x.ndim == 2 else GGMLQuantizationType.F32
                try:
                    data = quants.quantize(x, t)
                except quants.QuantError:     # rows not a multiple of the block: as llama.cpp
                    t = GGMLQuantizationType.F16
                    data = quants.quantize(x, t)
                    kept.append(gguf_name(hf))
                writer.add_tensor(gguf_name(hf), data, raw_dtype=t)
            if kept:
                warnings.warn(f"{len(kept)} tensors stay F16 (their rows are not a multiple of "
                              f"{quant}'s block): {kept[:4]}", stacklevel=2)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    sync(f"write {out}")
    return out
