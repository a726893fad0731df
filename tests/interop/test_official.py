"""Official LoRA-XS checkpoints (their PEFT 0.10 layout, built here with torch the way their
code writes them) imported as our adapted trees: our logits equal a torch forward of the same
checkpoint with their LoRA-XS forward; A and B come from the file, not from a fresh SVD."""

import json

import jax
import numpy as np
import pytest
from families import load_ours, our_logits, real_diff, torch_class, torch_logits
from safetensors.torch import save_file

import loraxs_jax as lx
from loraxs_jax.interop import export_peft, import_official

GLUE_TARGETS = ["query", "value", "attention.output.dense", "output.dense"]   # main_glue.py
MATH_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _official(model, folder, targets, rank, alpha, task_type, head=None, seed=0):
    """Write ``model``'s LoRA-XS adapter as their code saves it and give ``model`` their forward
    (``base(x) + lora_B(latent(lora_A(x))) * lora_alpha / r``, utils/latent_utils.py). A = U_rΣ_r
    and B = V_rᵀ of the weight, turned by a random orthogonal r×r matrix (their randomized SVD
    is not ours); the latent (Rᵀ) random; ``head`` names modules saved whole (GLUE)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or not any(
                name == t or name.endswith("." + t) for t in targets):
            continue
        u, s, vh = torch.linalg.svd(mod.weight.detach().double().T, full_matrices=False)
        q, _ = torch.linalg.qr(torch.randn(rank, rank, generator=gen, dtype=torch.float64))
        a_w = ((u[:, :rank] * s[:rank]) @ q).T.float().contiguous()        # (r, in)
        b_w = (q.T @ vh[:rank]).T.float().contiguous()                      # (out, r)
        latent = (0.5 * torch.randn(rank, rank, generator=gen)).contiguous()
        key = f"base_model.model.{name}"
        tensors.update({f"{key}.lora_A.weight": a_w, f"{key}.lora_B.weight": b_w,
                        f"{key}_lora_latent_mapping.weight": latent})
        mod.forward = (lambda x, base=mod.forward, a=a_w, b=b_w, lat=latent:
                       base(x) + F.linear(F.linear(F.linear(x, a), lat), b) * (alpha / rank))
    for module in head or ():
        with torch.no_grad():
            for pname, p in model.get_submodule(module).named_parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
                tensors[f"base_model.model.{module}.{pname}"] = p.detach().clone()
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": task_type, "r": rank, "lora_alpha": alpha,
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "fan_in_fan_out": False,
        "inference_mode": True, "peft_version": "0.10.0"}))
    return folder


CASES = {  # fam -> (targets, rank, alpha, task type, head): the official GLUE and math setups
    "roberta": (GLUE_TARGETS, 4, 16, "SEQ_CLS", ["classifier"]),
    "llama": (MATH_TARGETS, 6, 6, "CAUSAL_LM", None),
}


@pytest.mark.parametrize("fam", list(CASES))
def test_import_matches_a_torch_forward_of_the_checkpoint(checkpoint, tmp_path, fam):
    folder = checkpoint(fam)
    model = torch_class(fam).from_pretrained(folder).eval()
    targets, rank, alpha, task, head = CASES[fam]
    official = _official(model, tmp_path / "official", targets, rank, alpha, task, head)
    ref = torch_logits(model, fam)

    config, base = load_ours(folder, fam)
    params, cfg = import_official(official, base, config, save_to=tmp_path / "ours")
    assert (cfg.init, cfg.rank, cfg.alpha) == ("given", rank, alpha)
    assert cfg.targets == tuple(rf"(^|/){t.replace('.', '/')}/kernel$" for t in targets)
    moved = real_diff(our_logits(config, base), ref, fam)
    diff = real_diff(our_logits(config, params), ref, fam)
    merged = real_diff(our_logits(config, lx.merge(params)), ref, fam)
    print(f"{fam}: official checkpoint, torch vs ours adapted {diff:.2e}, merged {merged:.2e} "
          f"(checkpoint moves logits {moved:.2f})")
    assert moved > 0.1 and diff <= 1e-4 and merged <= 1e-4

    # A, B are the file's: our own SVD of W gives other bases
    fresh = lx.apply(base, lx.LoraXSConfig(rank=rank, targets=cfg.targets), 0)
    name = ("encoder", "layer", "0", "attention", "self", "query") if fam == "roberta" else (
        "model", "layers_0", "self_attn", "q_proj")
    pick = lambda t: np.asarray(jax.tree_util.tree_reduce(lambda a, k: a[k], name, t)[
        "kernel_loraxs_A"])
    assert np.abs(pick(fresh) - pick(params)).max() > 0.1

    # saved as our adapter + a bases cache: the same tree back; never without the cache
    again = lx.load_adapter(tmp_path / "ours" / "adapter.safetensors", base,
                            bases_cache=tmp_path / "ours" / "bases")
    assert real_diff(our_logits(config, again), ref, fam) <= 1e-4
    with pytest.raises(ValueError, match="cannot be recomputed"):
        lx.load_adapter(tmp_path / "ours" / "adapter.safetensors", base)


def test_import_onto_scanned_layers(checkpoint, tmp_path):
    folder = checkpoint("llama")
    model = torch_class("llama").from_pretrained(folder).eval()
    official = _official(model, tmp_path / "official", *CASES["llama"])
    config, base = load_ours(folder, "llama", scan_layers=True)
    params, cfg = import_official(official, base, config)
    assert cfg.stacked_axes == 1
    assert real_diff(our_logits(config, params), torch_logits(model, "llama"), "llama") <= 1e-4


def test_what_cannot_be_imported_is_refused(checkpoint, adapted, tmp_path):
    folder = checkpoint("llama")
    official = _official(torch_class("llama").from_pretrained(folder), tmp_path / "official",
                         *CASES["llama"])
    rconfig, rbase = load_ours(checkpoint("roberta"), "roberta")
    with pytest.raises(ValueError, match="have no place in this roberta model.*another base"):
        import_official(official, rbase, rconfig)
    _, config, base, params, cfg = adapted("llama")
    plain = export_peft(params, config, tmp_path / "plain", cfg)        # a standard LoRA
    with pytest.raises(ValueError, match="plain LoRA adapter"):
        import_official(plain, base, config)
    (official / "adapter_model.safetensors").rename(official / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="only adapter_model.bin"):
        import_official(official, base, config)
