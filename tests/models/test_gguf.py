"""GGUF loading: llama.cpp's rotary permutation undone, and real SmolLM2-135M-Instruct (Q4_1)."""

import jax
import numpy as np
import pytest

from loraxs_jax.experiments import assets
from loraxs_jax.models.decoder import DecoderForCausalLM
from loraxs_jax.models.generate import generate
from loraxs_jax.models.gguf import gguf_name, hf_name, load_gguf, permute_rotary, unpermute_rotary

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _llama_cpp_permute(weights, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permute(n_head):
    w = np.random.RandomState(n_head).randn(n_head * 8, 5).astype(np.float32)
    permuted = _llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rotary(permuted, n_head), w)
    np.testing.assert_array_equal(permute_rotary(w, n_head), permuted)


def test_gguf_names_invert_hf_names():
    for g in ("token_embd.weight", "output_norm.weight", "output.weight", "blk.3.attn_q.weight",
              "blk.0.ffn_down.weight", "blk.11.ffn_norm.weight", "blk.2.attn_k.bias"):
        assert gguf_name(hf_name(g)) == g
    assert hf_name("blk.0.attn_output.weight") == "model.layers.0.self_attn.o_proj.weight"
    with pytest.raises(KeyError, match="no llama.cpp"):
        gguf_name("model.layers.0.self_attn.q_norm.weight")


@pytest.fixture(scope="module")
def smollm2():
    folder = assets.asset_path("smollm2", fetch=True)
    # Scanned layers: one compiled layer body keeps the test's compile time short.
    config, params, tokenizer = load_gguf(folder / GGUF_NAME, scan_layers=True)
    return folder, config, params, tokenizer


@pytest.mark.slow
def test_smollm2_hyperparameters(smollm2):
    _, c, params, _ = smollm2
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
            c.num_kv_heads, c.head_dim, c.rope_theta, c.tie_word_embeddings) == (
        49152, 576, 1536, 30, 9, 3, 64, 100000.0, True)
    assert params["model"]["layers"]["self_attn"]["k_proj"]["kernel"].shape == (30, 576, 192)
    assert sum(x.size for x in jax.tree.leaves(params)) == 134_515_008


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf_reader(smollm2):
    from transformers import PreTrainedTokenizerFast

    folder, _, _, tok = smollm2
    ref = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=GGUF_NAME)
    for text in ["Hello world, 1234 Über  two spaces\n\nnew line",
                 "<|im_start|>user\nWhat?<|im_end|>", " 3.14159 e=mc^2 日本語"]:
        ids = tok(text)["input_ids"]
        assert ids == ref(text)["input_ids"]
        assert tok.decode(ids) == text
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert "<|im_start|>assistant" in tok.chat_template


@pytest.mark.slow
def test_smollm2_answers_capital_of_france(smollm2):
    _, config, params, tok = smollm2
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    enc = tok([text], return_tensors="np")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out = generate(DecoderForCausalLM(config).apply, params, config, enc["input_ids"],
                   enc["attention_mask"], 12, eos_token_id=eos, pad_token_id=eos)
    answer = tok.decode(np.asarray(out[0]), skip_special_tokens=True)
    assert "Paris" in answer, answer
