"""Fixtures of the interop tests: tiny random transformers checkpoints of every family we load
and our adapted versions of them (helpers in families.py)."""

import jax
import pytest
from families import byte_bpe, hf_config, is_encoder, load_ours, lora_config, torch_class

import loraxs_jax as lx
from loraxs_jax.models import decoder


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """fam -> folder of a tiny random transformers model (every weight moved off its init)."""
    import torch

    made = {}

    def make(fam):
        if fam not in made:
            torch.manual_seed(0)
            model = torch_class(fam).from_config(hf_config(fam)).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            folder = tmp_path_factory.mktemp(fam)
            model.save_pretrained(folder, safe_serialization=True)
            made[fam] = folder
        return made[fam]

    return make


@pytest.fixture(scope="session")
def adapted(checkpoint):
    """fam -> (folder, our config, base params, adapted params, LoraXSConfig): LoRA-XS on the
    paper's targets with R ~ N(0, 0.5²); the head (encoders) moved too, as training would."""
    made = {}

    def make(fam):
        if fam not in made:
            folder = checkpoint(fam)
            config, base = load_ours(folder, fam)
            cfg = lora_config(fam)
            params = lx.apply(base, cfg, jax.random.key(1))
            if is_encoder(fam):
                params = jax.tree_util.tree_map_with_path(
                    lambda p, x: x + 0.1 if "classifier" in jax.tree_util.keystr(p) else x,
                    params)
            made[fam] = (folder, config, base, params, cfg)
        return made[fam]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(folder, config, adapted params): a random HF Llama with a byte-level BPE tokenizer and
    LoRA-XS on every projection."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama_bpe")
    n = byte_bpe(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=n + 4, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, rms_norm_eps=1e-5,
                                 max_position_embeddings=64)).save_pretrained(folder)
    config, base = decoder.load_decoder(folder)
    cfg = lx.LoraXSConfig(rank=4, alpha=8.0, r_std=0.5, targets=decoder.PAPER_TARGETS)
    return folder, config, lx.apply(base, cfg, jax.random.key(0))
