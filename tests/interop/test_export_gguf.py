"""Merged Llama-family models as llama.cpp GGUF files: read back by our loader (load_gguf) and by
transformers' independent GGUF reader, with the tokenizer converted from a Hugging Face folder
or copied from a GGUF file; real SmolLM2-135M round trip; what llama.cpp's 'llama' cannot hold
is refused."""

import dataclasses

import jax
import numpy as np
import pytest

import loraxs_jax as lx
from loraxs_jax.interop import export_gguf
from loraxs_jax.models import decoder
from loraxs_jax.models.gguf import load_gguf

TEXTS = ["the theme", "Hello world, 1234 the end\n", "<|endoftext|>tthe"]


def _logits(config, params, ids):
    return np.asarray(decoder.DecoderForCausalLM(config).apply({"params": params}, ids))


def test_round_trip_through_our_loader_and_transformers(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, config, params = tiny_llama
    merged = lx.merge(params)
    out = export_gguf(params, config, tmp_path / "m.gguf", tokenizer=folder)
    back, loaded, tok = load_gguf(out)
    same = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "head_dim", "rope_theta", "max_position_embeddings",
            "tie_word_embeddings")
    assert {k: getattr(back, k) for k in same} == {k: getattr(config, k) for k in same}
    worst = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(merged)))
    assert worst == 0.0                                  # f32: the q/k permutation undone exactly
    hf_tok = AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert tok(text)["input_ids"] == hf_tok(text)["input_ids"], text
    ids = np.asarray([hf_tok(TEXTS[1])["input_ids"]])
    ours = _logits(config, merged, ids)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    import torch

    with torch.no_grad():
        theirs = ref(torch.tensor(ids)).logits.numpy()
    diff = float(np.abs(theirs - ours).max())
    print(f"tiny Llama GGUF: load_gguf params exact, transformers(gguf) vs ours {diff:.2e}")
    assert diff <= 1e-4

    # the tokenizer copied from a GGUF file is the same, key for key
    again = export_gguf(merged, config, tmp_path / "again.gguf", tokenizer=out)
    from gguf import GGUFReader

    def tok_keys(p):
        return {k: f.contents() for k, f in GGUFReader(p).fields.items()
                if k.startswith("tokenizer.")}

    assert tok_keys(again) == tok_keys(out)


@pytest.mark.parametrize("quant,tol", [("f16", 2e-2), ("q8_0", 5e-2)])
def test_smaller_types(tiny_llama, tmp_path, quant, tol):
    from gguf import GGUFReader

    folder, config, params = tiny_llama
    if quant == "q8_0":       # blocks of 32 along the rows: down_proj's 48 stay F16, as llama.cpp
        with pytest.warns(UserWarning, match=r"2 tensors stay F16.*blk.0.ffn_down"):
            out = export_gguf(params, config, tmp_path / "q.gguf", tokenizer=folder, quant=quant)
    else:
        out = export_gguf(params, config, tmp_path / "h.gguf", tokenizer=folder, quant=quant)
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == quant.upper() and types["output_norm.weight"] == "F32"
    back, loaded, _ = load_gguf(out)
    ids = np.arange(12)[None] % config.vocab_size
    diff = np.abs(_logits(back, loaded, ids) - _logits(config, lx.merge(params), ids)).max()
    assert diff <= tol


def test_what_llama_cpp_llama_cannot_hold_is_refused(tiny_llama, tmp_path):
    folder, config, params = tiny_llama
    for change, word in [(dict(model_type="qwen2", qkv_bias=True), "qwen2"),
                         (dict(model_type="mistral", sliding_window=8), "sliding window"),
                         (dict(rope_type="llama3"), "rope_type"),
                         (dict(model_type="gemma", norm_plus_one=True), "gemma")]:
        with pytest.raises(NotImplementedError, match=f"{word}.*convert_hf_to_gguf"):
            export_gguf(params, dataclasses.replace(config, **change), tmp_path / "x.gguf",
                        tokenizer=folder)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_smollm2_round_trip(tmp_path):
    from loraxs_jax.experiments.assets import asset_path

    src = asset_path("smollm2", fetch=True) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    config, base, tok = load_gguf(src, scan_layers=True)
    # random bases: 210 exact SVDs would take minutes on a CPU, and GGUF does not care
    cfg = lx.LoraXSConfig(rank=8, alpha=8.0, r_std=0.05, targets=decoder.PAPER_TARGETS,
                          stacked_axes=1, init="random")
    merged = lx.merge(lx.apply(base, cfg, jax.random.key(0)))
    out = export_gguf(merged, config, tmp_path / "smollm2.gguf", tokenizer=src)
    back, loaded, tok2 = load_gguf(out, scan_layers=True)
    assert back == config
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded),
                                                     jax.tree.leaves(merged)))
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert tok2.chat_template == tok.chat_template
