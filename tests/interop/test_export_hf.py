"""Merged models as Hugging Face folders: transformers (no LoRA-XS code) loads every family with
no missing or unexpected tensor and computes our logits; config.json survives the round trip."""

import dataclasses
import json

import pytest
from families import FAMILIES, our_logits, real_diff, torch_class, torch_logits
from safetensors import safe_open

import loraxs_jax as lx
from loraxs_jax.interop import export_hf
from loraxs_jax.interop.hf import hf_config


def _load(out, fam, **kw):
    model, info = torch_class(fam).from_pretrained(out, output_loading_info=True, **kw)
    return model.eval(), {k: v for k, v in info.items() if v}


@pytest.mark.parametrize("fam", FAMILIES)
def test_transformers_loads_our_merged_model(adapted, tmp_path, fam):
    folder, config, _, params, _ = adapted(fam)
    out = export_hf(params, config, tmp_path / "hf", base_config=folder)   # merged on the way
    model, info = _load(out, fam)
    assert info == {}, info                                 # nothing missing, nothing unexpected
    diff = real_diff(torch_logits(model, fam), our_logits(config, lx.merge(params)), fam)
    print(f"{fam}: transformers(exported) vs ours max |Δlogit| {diff:.2e}")
    assert diff <= 1e-4
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        type(model).__name__]


def test_bfloat16_export(adapted, tmp_path):
    folder, config, _, params, _ = adapted("llama")
    out = export_hf(params, config, tmp_path / "hf", base_config=folder, dtype="bfloat16")
    with safe_open(out / "model.safetensors", "numpy") as f:
        assert str(f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype) == "bfloat16"
    model, info = _load(out, "llama")
    assert info == {} and str(model.dtype) == "torch.bfloat16"
    diff = real_diff(torch_logits(model, "llama"), our_logits(config, lx.merge(params)), "llama")
    assert diff <= 0.1        # bf16 weights: a few ulps of bf16 on logits of size ~3


def test_scanned_layers_export_per_layer(checkpoint, tmp_path):
    from families import load_ours, lora_config

    folder = checkpoint("qwen2")
    config, base = load_ours(folder, "qwen2", scan_layers=True)
    params = lx.apply(base, lora_config("qwen2", stacked_axes=1), 3)
    out = export_hf(params, config, tmp_path / "hf", base_config=folder)
    model, info = _load(out, "qwen2")
    assert info == {}
    assert real_diff(torch_logits(model, "qwen2"), our_logits(config, lx.merge(params)),
                     "qwen2") <= 1e-4


def test_what_transformers_cannot_express_is_refused(adapted):
    _, config, _, _, _ = adapted("bert")
    with pytest.raises(ValueError, match="head='mean'.*no transformers class"):
        hf_config(dataclasses.replace(config, head="mean"))
    _, dconfig, _, _, _ = adapted("llama")
    with pytest.raises(ValueError, match="one attention_bias switch"):
        hf_config(dataclasses.replace(dconfig, qkv_bias=True))
    with pytest.raises(ValueError, match="unknown model family"):
        hf_config(object())


def test_base_config_keys_we_do_not_model_are_kept(adapted):
    folder, config, _, _, _ = adapted("llama")
    base = json.loads((folder / "config.json").read_text())
    base["bos_token_id"], base["rope_theta"] = 5, 1.0            # a stale legacy key goes
    d = hf_config(config, base)
    assert d["bos_token_id"] == 5 and "rope_theta" not in d
    assert d["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert d["dtype"] == "float32"
