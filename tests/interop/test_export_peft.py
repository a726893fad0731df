"""LoRA-XS exported as a standard PEFT LoRA: PEFT (no LoRA-XS code) reproduces our logits for
every family we load; folder layout, config keys and key names as PEFT/vLLM read them."""

import json

import jax
import numpy as np
import pytest
from families import (
    FAMILIES,
    load_ours,
    lora_config,
    our_logits,
    real_diff,
    torch_class,
    torch_logits,
)
from safetensors import safe_open

import loraxs_jax as lx
from loraxs_jax.interop import export_peft
from loraxs_jax.interop.names import suffix_patterns


def _peft_logits(folder, out, fam):
    from peft import PeftModel

    base = torch_class(fam).from_pretrained(folder).eval()
    return torch_logits(PeftModel.from_pretrained(base, out).eval(), fam)


@pytest.mark.parametrize("fam", FAMILIES)
def test_peft_reproduces_our_adapted_logits(adapted, tmp_path, fam):
    folder, config, base, params, cfg = adapted(fam)
    ours = our_logits(config, lx.merge(params))
    moved = real_diff(ours, our_logits(config, base), fam)
    assert moved > 0.05, f"{fam}: the adapter hardly changes the logits ({moved})"
    out = export_peft(params, config, tmp_path / "peft", cfg, base_model_name_or_path=str(folder))
    diff = real_diff(_peft_logits(folder, out, fam), ours, fam)
    print(f"{fam}: PEFT vs ours max |Δlogit| {diff:.2e} (adapter moves them {moved:.2f})")
    assert diff <= 1e-4


def test_folder_keys_and_config_as_peft_writes_them(adapted, tmp_path):
    folder, config, _, params, cfg = adapted("bert")
    with pytest.warns(UserWarning, match="classification"):
        out = export_peft(params, config, tmp_path / "peft", cfg, base_model_name_or_path="b")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    c = json.loads((out / "adapter_config.json").read_text())
    assert (c["peft_type"], c["task_type"], c["r"], c["lora_alpha"], c["bias"]) == (
        "LORA", "SEQ_CLS", 4, 8, "none")
    assert c["target_modules"] == ["output.dense", "query", "value"]   # not intermediate.dense
    assert c["modules_to_save"] == ["classifier"] and c["base_model_name_or_path"] == "b"
    assert not c["use_dora"] and not c["use_rslora"] and c["rank_pattern"] == {}
    with safe_open(out / "adapter_model.safetensors", "numpy") as f:
        keys, meta = set(f.keys()), f.metadata()
        a = f.get_tensor("base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.weight")
        b = f.get_tensor("base_model.model.bert.encoder.layer.1.output.dense.lora_B.weight")
    assert meta["format"] == "pt" and json.loads(meta["loraxs_config"])["rank"] == 4
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert a.shape == (4, 32) and b.shape == (32, 4)          # (r, in), (out, r)
    assert len(keys) == 2 * 2 * 4 + 2                          # 2 layers x 4 targets x A, B + head
    # lora_A = (A·R)ᵀ, lora_B = Bᵀ: checked against the adapted leaves directly
    q = params["encoder"]["layer"]["1"]["attention"]["self"]["query"]
    np.testing.assert_allclose(a, np.asarray(q["kernel_loraxs_A"] @ q["kernel_loraxs_R"]).T,
                               rtol=1e-5, atol=1e-6)


def test_mixed_ranks_and_a_changed_scale_survive(checkpoint, tmp_path):
    """rank_pattern for the FFN's rank 6, and a kernel whose stored scale is not α/r (folded into
    its lora_A) still give PEFT our logits."""

    folder = checkpoint("llama")
    config, base = load_ours(folder, "llama")
    cfg = lora_config("llama", rank={r"self_attn": 4, r"mlp": 6})
    params = lx.apply(base, cfg, jax.random.key(2))
    o = params["model"]["layers_1"]["self_attn"]["o_proj"]
    o["kernel_loraxs_scale"] = o["kernel_loraxs_scale"] * 3.0
    out = export_peft(params, config, tmp_path / "peft", cfg)
    c = json.loads((out / "adapter_config.json").read_text())
    assert (c["r"], c["lora_alpha"], c["rank_pattern"]) == (
        4, 8, {"down_proj": 6, "gate_proj": 6, "up_proj": 6})
    diff = real_diff(_peft_logits(folder, out, "llama"), our_logits(config, lx.merge(params)),
                     "llama")
    assert diff <= 1e-4


def test_rank_over_the_limit_is_refused(adapted, tmp_path):
    _, config, _, params, cfg = adapted("llama")
    with pytest.raises(ValueError, match=r"rank 4 of model/layers_0/.*exceeds max_rank=1"):
        export_peft(params, config, tmp_path / "x", cfg, max_rank=1)


def test_roberta_head_is_exported_with_a_vllm_warning(adapted, tmp_path):
    _, config, _, params, cfg = adapted("roberta")
    with pytest.warns(UserWarning, match="vLLM refuses the 'classifier' head"):
        out = export_peft(params, config, tmp_path / "peft", cfg)
    assert "vLLM refuses" in (out / "README.md").read_text()


def test_suffix_patterns_select_exactly_the_chosen_modules():
    mods = {f"m.layer.{i}.{x}" for i in range(2) for x in
            ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense")}
    chosen = {m for m in mods if "intermediate" not in m}
    assert suffix_patterns(chosen, mods) == ["output.dense", "query"]
    assert suffix_patterns({"m.layer.0.output.dense"}, mods) == ["0.output.dense"]


def test_merged_params_are_refused(adapted, tmp_path):
    _, config, _, params, cfg = adapted("llama")
    with pytest.raises(ValueError, match="no LoRA-XS leaves"):
        export_peft(lx.merge(params), config, tmp_path / "x", cfg)
