"""The command line (python -m loraxs_jax.interop, loraxs-export, loraxs-import): real exports
from an adapter file and a base folder, an official import, and the errors a user meets, each
one line with status 2 naming the culprit."""

import json
import subprocess
import sys

import numpy as np
import pytest
from families import (
    OFFICIAL_CASES,
    hf_config,
    load_ours,
    our_logits,
    real_diff,
    torch_class,
    torch_logits,
    write_official,
)

import loraxs_jax as lx
from loraxs_jax.interop.cli import export_main, import_main, main
from loraxs_jax.models import decoder


@pytest.fixture(scope="module")
def saved(adapted, tmp_path_factory):
    """fam -> (base folder, our config, adapted params, our adapter file)."""
    made = {}

    def make(fam):
        if fam not in made:
            folder, config, _, params, cfg = adapted(fam)
            path = lx.save_adapter(tmp_path_factory.mktemp("adapter") / "adapter", params, cfg)
            made[fam] = (folder, config, params, path)
        return made[fam]

    return make


def _fails(capsys, argv, entry=main):
    assert entry(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: " in err
    return err


def test_export_peft_and_hf_from_files(saved, tmp_path, capsys):
    from peft import PeftModel

    folder, config, params, adapter = saved("bert")
    ours = our_logits(config, lx.merge(params))
    assert main(["export", "peft", "--adapter", str(adapter), "--base", str(folder),
                 "--out", str(tmp_path / "peft"), "--head", "cls"]) == 0
    assert "rebuilding the adapted model" in capsys.readouterr().err       # progress lines
    base = torch_class("bert").from_pretrained(folder).eval()
    got = torch_logits(PeftModel.from_pretrained(base, tmp_path / "peft").eval(), "bert")
    assert real_diff(got, ours, "bert") <= 1e-4
    c = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert c["base_model_name_or_path"] == str(folder.resolve())

    assert export_main(["hf", "--adapter", str(adapter), "--base", str(folder),
                        "--out", str(tmp_path / "hf"), "--head", "cls"]) == 0
    model = torch_class("bert").from_pretrained(tmp_path / "hf").eval()
    assert real_diff(torch_logits(model, "bert"), ours, "bert") <= 1e-4


def test_export_gguf(tiny_llama, tmp_path):
    from loraxs_jax.models.gguf import load_gguf

    folder, config, params = tiny_llama          # a tiny Llama with a byte-level BPE tokenizer
    cfg = lx.LoraXSConfig(rank=4, alpha=8.0, r_std=0.5, targets=decoder.PAPER_TARGETS)
    adapter = lx.save_adapter(tmp_path / "adapter", params, cfg)
    assert main(["export", "gguf", "--adapter", str(adapter), "--base", str(folder),
                 "--out", str(tmp_path / "m.gguf"), "--quant", "f32"]) == 0
    back, loaded, _ = load_gguf(tmp_path / "m.gguf")
    assert real_diff(our_logits(back, loaded), our_logits(config, lx.merge(params)),
                     "llama") <= 1e-5


def test_import_official_from_files(checkpoint, tmp_path):
    folder = checkpoint("roberta")
    model = torch_class("roberta").from_pretrained(folder).eval()
    official = write_official(model, tmp_path / "official", *OFFICIAL_CASES["roberta"])
    assert import_main(["--checkpoint", str(official), "--base", str(folder),
                        "--out", str(tmp_path / "ours")]) == 0
    config, base = load_ours(folder, "roberta")
    params = lx.load_adapter(tmp_path / "ours" / "adapter.safetensors", base,
                             bases_cache=tmp_path / "ours" / "bases")
    assert real_diff(our_logits(config, params), torch_logits(model, "roberta"),
                     "roberta") <= 1e-4


def test_the_head_kind_is_never_guessed(saved, tmp_path, capsys):
    """A classifier trained on mean-pooled tokens must not be exported onto [CLS]: the kind comes
    from --head or the run's config.json beside the adapter, and a mean head is refused."""
    folder, _, params, adapter = saved("bert")
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter.safetensors").write_bytes(adapter.read_bytes())
    argv = ["export", "peft", "--adapter", str(run / "adapter.safetensors"), "--base",
            str(folder), "--out", str(tmp_path / "x")]
    assert "nothing says how it was trained: pass --head" in _fails(capsys, argv)
    (run / "config.json").write_text(json.dumps({"model": {"head": "mean", "kind": "encoder"}}))
    assert "mean-pooled tokens" in _fails(capsys, argv)
    assert "--head cls, but" in _fails(capsys, [*argv, "--head", "cls"])
    assert main([*argv, "--no-head"]) == 0                     # the LoRA alone
    c = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert c["modules_to_save"] is None and c["task_type"] is None


def test_an_adapter_on_the_wrong_base_is_refused(saved, tmp_path, capsys):
    import torch

    _, _, _, adapter = saved("llama")
    torch.manual_seed(7)                                   # same architecture, other weights
    torch_class("llama").from_config(hf_config("llama")).save_pretrained(tmp_path / "other")
    err = _fails(capsys, ["export", "peft", "--adapter", str(adapter),
                          "--base", str(tmp_path / "other"), "--out", str(tmp_path / "x")])
    assert "trained on a different base model" in err
    assert not (tmp_path / "x").exists()


def test_a_rank_over_the_limit_is_refused(saved, tmp_path, capsys):
    folder, _, _, adapter = saved("llama")
    err = _fails(capsys, ["peft", "--adapter", str(adapter), "--base", str(folder),
                          "--out", str(tmp_path / "x"), "--max-rank", "2"], export_main)
    assert "rank 4 of model/layers_0/" in err and "exceeds max_rank=2" in err
    assert not (tmp_path / "x").exists()


def test_an_unknown_family_is_refused(saved, tmp_path, capsys):
    _, _, _, adapter = saved("llama")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    err = _fails(capsys, ["export", "hf", "--adapter", str(adapter),
                          "--base", str(tmp_path / "gpt2"), "--out", str(tmp_path / "x")])
    assert "unknown model family 'gpt2'" in err and "llama" in err


def test_other_mistakes_name_their_culprit(saved, checkpoint, tmp_path, capsys):
    folder, _, _, adapter = saved("llama")
    assert "no adapter file at" in _fails(capsys, [
        "export", "hf", "--adapter", str(tmp_path / "nope"), "--base", str(folder),
        "--out", str(tmp_path / "x")])
    assert "neither a Hugging Face folder" in _fails(capsys, [
        "export", "hf", "--adapter", str(adapter), "--base", str(tmp_path),
        "--out", str(tmp_path / "x")])
    qwen = checkpoint("qwen2")
    _, _, _, qadapter = saved("qwen2")
    assert "convert_hf_to_gguf" in _fails(capsys, [
        "export", "gguf", "--adapter", str(qadapter), "--base", str(qwen),
        "--out", str(tmp_path / "x.gguf")])
    assert "has no adapter_config.json" in _fails(capsys, [
        "--checkpoint", str(folder), "--base", str(folder), "--out", str(tmp_path / "y")],
        import_main)


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "loraxs_jax.interop", "export", "--help"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "{peft,hf,gguf}" in out.stdout
    assert np.all([s in out.stdout for s in ("--adapter", "--base", "--max-rank", "--quant")])
