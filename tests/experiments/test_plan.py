"""plan: memory per device from shapes (Mistral-7B without weights), and the CLI."""

import json
import sys
import textwrap

import jax
import pytest

from loraxs_jax.apply import apply
from loraxs_jax.config import LoraXSConfig
from loraxs_jax.experiments import plan as pl
from loraxs_jax.models import decoder as dec
from loraxs_jax.models import encoder as enc

TINY = dec.DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_layers=2,
                         num_heads=4, num_kv_heads=4, head_dim=8, scan_layers=True)
TINY_LORA = LoraXSConfig(rank=4, targets=dec.PAPER_TARGETS, stacked_axes=1)


def test_mistral_7b_r64_on_fsdp8():
    lora = LoraXSConfig(rank=64, alpha=64.0, targets=dec.PAPER_TARGETS)
    mistral = pl.model_config("mistralai/Mistral-7B-v0.1", dtype="bfloat16", param_dtype="bfloat16")
    r = pl.plan(mistral, lora, {"fsdp": -1}, 8, 512, devices=8, compile=False,
                activations=False)
    assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    c, tot, dev = r["counts"], r["total_bytes"], r["per_device_bytes"]
    assert c["R"] == 917_504 and c["adapted_matrices"] == 32 * 7   # 224 matrices x 64²
    assert c["base_params"] == 7_241_732_096                        # Mistral-7B
    assert tot["R"] == dev["R"] == 917_504 * 4                      # float32, replicated
    assert tot["opt_state"] == 2 * 917_504 * 4 + 4                  # mu, nu (+ the int32 count)
    assert dev["opt_state"] == tot["opt_state"]
    assert tot["base_params"] == 7_241_732_096 * 2                  # bfloat16
    assert dev["base_params"] == 7_241_732_096 * 2 // 8             # every param has 'embed'
    # A of embed-input kernels and B of embed-output kernels split 8-way, the other half whole
    assert tot["bases"] == 167_772_160 * 2 and tot["bases"] / 8 < dev["bases"] < tot["bases"]


def test_adapted_shapes_equal_eval_shape_of_apply():
    shapes = dec.param_shapes(TINY)
    lora = LoraXSConfig(rank=4, targets=dec.PAPER_TARGETS, stacked_axes=1,
                        bases_dtype="bfloat16", r_dtype="float32")
    assert pl.adapted_shapes(shapes, lora) == jax.eval_shape(lambda p: apply(p, lora, 0), shapes)


def test_tiny_plan_compiles_and_remat_saves_activations(capsys):
    r = pl.plan(TINY, TINY_LORA, {"data": 2, "fsdp": 2, "tensor": 2}, 8, 16, remat=True)
    dev, comp = r["per_device_bytes"], r["compiled"]
    assert 0 < dev["activations_remat"] < dev["activations_no_remat"]
    assert list(comp) == ["remat"] and comp["remat"]["temp_size_in_bytes"] > 0
    # the step's arguments: every device's shard of state and frozen params, plus its batch rows
    # (the causal-LM task's batch: input_ids, attention_mask, labels, loss_mask of 8 x 16 int32)
    static = dev["base_params"] + dev["bases"] + dev["R"] + dev["opt_state"]
    assert static <= comp["remat"]["argument_size_in_bytes"] < static + 4 * 8 * 16 * 4
    out = capsys.readouterr().out
    assert "activations, remat *" in out and "compiled (remat)" in out


def test_encoder_plan_counts():
    cfg = enc.EncoderConfig(model_type="roberta", vocab_size=50, hidden_size=32, num_layers=2,
                            num_heads=4, intermediate_size=64, max_positions=40,
                            type_vocab_size=1, pad_token_id=1, roberta_position_ids=True)
    lora = LoraXSConfig(rank=4, targets=enc.PAPER_TARGETS, trainable=(r"^classifier/",))
    r = pl.plan(cfg, lora, {"data": 4, "tensor": 2}, 8, 16, devices=8, compile=False,
                print_table=False)
    assert r["counts"]["R"] == 2 * 4 * 16 and r["counts"]["extra_trainable"] > 0
    # both halves of the split are traced: remat keeps only the layer inputs
    assert r["per_device_bytes"]["activations_no_remat"] > r["per_device_bytes"][
        "activations_remat"] > 0


def test_cli_reads_an_experiment_config(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "tiny-llama"   # an HF folder: only its config.json is read
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "head_dim": 8}))
    path = tmp_path / "tiny.py"
    path.write_text(textwrap.dedent(f"""
        from ml_collections import ConfigDict

        def get_config(arg=None):
            return ConfigDict({{
                "model": {{"kind": "decoder", "path": {str(folder)!r}, "dtype": "float32",
                          "param_dtype": "float32", "scan_layers": True, "remat": "full"}},
                "loraxs": {{"rank": 4, "alpha": 4.0, "targets": [r"(q|v)_proj/kernel$"],
                           "bases_dtype": "", "svd_method": "randomized"}},
                "optim": {{"grad_accum": 2}},
                "task": {{"max_length": 16}},
                "mesh": {{"data": 1, "fsdp": 8, "tensor": 1}},
                "batch_size": 16}})
        """))
    # ml_collections reads --config.* overrides from sys.argv itself
    monkeypatch.setattr(sys, "argv", ["plan", f"--config={path}", "--config.mesh.fsdp=4",
                                      "--config.mesh.data=2", "--nocompile"])
    r = pl.main()
    assert r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert r["counts"]["R"] == 2 * 2 * 4 * 4 and r["counts"]["adapted_matrices"] == 4
    assert (r["batch_size"], r["seq_len"], r["remat"]) == (8, 16, True)   # micro-batch 16 / 2
    assert "activations, remat *" in capsys.readouterr().out
    with pytest.raises(ValueError, match="cannot get the architecture of 'mistral-8b'"):
        pl.main(["plan", "--model=mistral-8b", "--nocompile"])
