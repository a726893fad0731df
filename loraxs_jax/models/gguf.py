"""Loading llama.cpp GGUF files (Llama architecture) into the decoder, tokenizer included.

GGUF stores tensors under llama.cpp names, quantised, with the rows of q/k projections permuted
for llama.cpp's interleaved rotary layout. We dequantise each tensor with the ``gguf`` package,
undo the permutation, present it under the Hugging Face name in PyTorch layout, and hand it to the
same streaming converter as safetensors checkpoints (:func:`decoder.load_params`). The tokenizer
is rebuilt from ``tokenizer.ggml.*`` metadata (GPT-2 style byte-level BPE, as SmolLM2 uses) with
its chat template.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from loraxs_jax.models.decoder import DecoderConfig, load_params

_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# llama.cpp's pre-tokenizer names -> how the text is split before byte-level BPE.
_SPLIT_DIGITS = {"gpt2": False, "smollm": True}
_CONTROL, _USER_DEFINED = 3, 4


def hf_name(gguf_name: str) -> str:
    """llama.cpp tensor name -> Hugging Face name ("blk.0.attn_q.weight" ->
    "model.layers.0.self_attn.q_proj.weight"); an unknown name -> "gguf:<name>"."""
    if gguf_name in _NAMES:
        return _NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    return f"gguf:{gguf_name}"  # unknown: surfaces as an unexpected tensor


_GGUF_NAMES = {v: k for k, v in _NAMES.items()}
_GGUF_BLOCK = {v: k for k, v in _BLOCK.items()}
_HF_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def gguf_name(hf: str) -> str:
    """The inverse of :func:`hf_name`: "model.layers.0.self_attn.q_proj.weight" ->
    "blk.0.attn_q.weight". Raises KeyError for a tensor llama.cpp's llama architecture lacks."""
    if hf in _GGUF_NAMES:
        return _GGUF_NAMES[hf]
    m = _HF_BLOCK_RE.match(hf)
    if m and m.group(2) in _GGUF_BLOCK:
        return f"blk.{m.group(1)}.{_GGUF_BLOCK[m.group(2)]}.{m.group(3)}"
    raise KeyError(f"{hf} has no llama.cpp (GGUF 'llama' architecture) name")


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``permute`` (convert_hf_to_gguf.py), what writing a GGUF file applies to q/k
    rows: reshape(n_head, 2, d/2, in).swapaxes(1, 2). The inverse of :func:`unpermute_rotary`;
    ``w`` is (n_head * d, in) in PyTorch layout (or a bias (n_head * d,))."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverts llama.cpp's ``permute``: rows reshape(n_head, 2, d/2, in).swapaxes(1, 2).

    llama.cpp rotates adjacent pairs (x0, x1), Hugging Face rotates halves (x_i, x_{i+d/2});
    ``w`` is (n_head * d, in) in PyTorch layout.
    """
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


class GGUFTensors:
    """A GGUF file's tensors under Hugging Face names in PyTorch layout, dequantised on ``get``."""

    def __init__(self, reader, n_head: int, n_kv_head: int):
        self._tensors = {hf_name(t.name): t for t in reader.tensors}
        self._heads = {"q_proj": n_head, "k_proj": n_kv_head}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def get(self, name: str) -> np.ndarray:
        from gguf import dequantize

        t = self._tensors[name]
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(self.shape(name))
        proj = name.split(".")[-2]
        if proj in self._heads:
            w = unpermute_rotary(w, self._heads[proj])
        return w


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader, **overrides) -> DecoderConfig:
    """Hyperparameters from ``{arch}.*`` metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: llama")
    g = lambda k, d=None: _field(reader, f"llama.{k}", d)
    if "rope_freqs.weight" in {t.name for t in reader.tensors} or g("rope.scaling.type") not in (
            None, "none"):
        raise NotImplementedError("GGUF rope scaling (rope_freqs / llama.rope.scaling.*) is not "
                                  "supported yet; load the Hugging Face checkpoint instead")
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    fields = dict(
        vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")), num_layers=int(g("block_count")),
        num_heads=heads, num_kv_heads=int(g("attention.head_count_kv", heads)),
        head_dim=int(g("attention.key_length", hidden // heads)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        max_position_embeddings=int(g("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names, model_type="llama")
    fields.update(overrides)
    return DecoderConfig(**fields)


def gguf_tokenizer(reader):
    """A ``PreTrainedTokenizerFast`` from ``tokenizer.ggml.*`` (byte-level BPE only)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2" or pre not in _SPLIT_DIGITS:
        raise NotImplementedError(f"GGUF tokenizer {kind!r} with pre-tokenizer {pre!r} is not "
                                  f"supported; supported: 'gpt2' BPE with {sorted(_SPLIT_DIGITS)}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  byte_level])
                         if _SPLIT_DIGITS[pre] else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k in (_CONTROL, _USER_DEFINED)])
    special = {}
    for role in ("bos", "eos", "unknown", "padding"):
        i = _field(reader, f"tokenizer.ggml.{role}_token_id")
        if i is not None:
            key = {"unknown": "unk", "padding": "pad"}.get(role, role)
            special[f"{key}_token"] = tokens[int(i)]
    return PreTrainedTokenizerFast(tokenizer_object=tok,
                                   chat_template=_field(reader, "tokenizer.chat_template"),
                                   **special)


def load_gguf(path: str | os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32,
              sharding: Callable[[str], jax.sharding.Sharding] | None = None,
              **config_overrides) -> tuple[DecoderConfig, dict, object]:
    """Loads a Llama-architecture GGUF file into ``(DecoderConfig, params, tokenizer)``.

    Quantised tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantised to ``param_dtype``.
    ``sharding`` and ``config_overrides`` work as in :func:`decoder.load_decoder`.
    """
    from gguf import GGUFReader

    reader = GGUFReader(os.fspath(path))
    config = gguf_config(reader, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    source = GGUFTensors(reader, config.num_heads, config.num_kv_heads)
    return config, load_params(source, config, sharding), gguf_tokenizer(reader)
