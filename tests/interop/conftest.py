"""Fixtures of the interop tests: tiny random transformers checkpoints of every family we load
and our adapted versions of them (helpers in families.py)."""

import jax
import pytest
from families import hf_config, is_encoder, load_ours, lora_config, torch_class

import loraxs_jax as lx


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
