"""Official LoRA-XS checkpoints (their PEFT 0.10 layout, built here with torch the way their
code writes them) imported as our adapted trees: our logits equal a torch forward of the same
checkpoint with their LoRA-XS forward; A and B come from the file, not from a fresh SVD."""

import jax
import numpy as np
import pytest
from families import (
    OFFICIAL_CASES,
    load_ours,
    our_logits,
    real_diff,
    torch_class,
    torch_logits,
    write_official,
)

import loraxs_jax as lx
from loraxs_jax.interop import export_peft, import_official


@pytest.mark.parametrize("fam", list(OFFICIAL_CASES))
def test_import_matches_a_torch_forward_of_the_checkpoint(checkpoint, tmp_path, fam):
    folder = checkpoint(fam)
    model = torch_class(fam).from_pretrained(folder).eval()
    targets, rank, alpha, task, head = OFFICIAL_CASES[fam]
    official = write_official(model, tmp_path / "official", targets, rank, alpha, task, head)
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
    official = write_official(model, tmp_path / "official", *OFFICIAL_CASES["llama"])
    config, base = load_ours(folder, "llama", scan_layers=True)
    params, cfg = import_official(official, base, config)
    assert cfg.stacked_axes == 1
    assert real_diff(our_logits(config, params), torch_logits(model, "llama"), "llama") <= 1e-4


def test_what_cannot_be_imported_is_refused(checkpoint, adapted, tmp_path):
    folder = checkpoint("llama")
    official = write_official(torch_class("llama").from_pretrained(folder), tmp_path / "official",
                         *OFFICIAL_CASES["llama"])
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
