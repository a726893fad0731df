"""train.py / eval.py end to end on a tiny BERT with the real MiniLM tokenizer and real SST-2
data: outputs, NaN handling, methods, merged == unmerged eval."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import loraxs_jax as lx
from loraxs_jax.experiments import evaluate as evaluate_lib
from loraxs_jax.experiments import train
from loraxs_jax.experiments.reporting import read_metrics


def _r(path):
    return load_file(path)


def test_run_outputs(tiny_config, tiny_bert, tmp_path):
    """What a run leaves; resuming after kills is tests/experiments/test_reliability.py's."""
    full = train.train_and_evaluate(tiny_config(tiny_bert), tmp_path / "full")
    wd = tmp_path / "full"
    for name in ("config.json", "metrics.jsonl", "summary.json", "adapter.safetensors",
                 "adapter_best.safetensors", "plots/train_loss.png", "plots/eval_accuracy.png",
                 "log.txt"):
        assert (wd / name).exists(), name
    assert list((wd / "tb").iterdir())
    recs = read_metrics(wd)
    assert [r["step"] for r in recs if r["split"] == "eval"] == [3, 6]
    assert full["trainable_params"] == 4 * 4 * 4 * 2 and full["steps"] == 6
    size = (wd / "adapter.safetensors").stat().st_size
    assert size < 2048 + (32 * 2 + 2) * 4 + 128 * 4     # R + the 2-label mean head + header
    assert full["best_accuracy"] >= full["final_accuracy"]
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["4", "6"]  # optimizer steps


def test_non_finite_loss_stops_before_anything_is_kept(tiny_config, tiny_bert, tmp_path):
    """lr=1e30 with evaluations every 5 steps (row 1 of the reliability issue): R is NaN after
    step 1, found at the first check (step 2, a log step) before any checkpoint or adapter."""
    with pytest.raises(train.NonFiniteLoss, match=r"non-finite at optimizer step 2 \(loss nan.*"
                                                  r"There is no checkpoint yet \(a rerun starts at "
                                                  r"step 0\)\. Lower optim.lr \(now 1e\+30"):
        train.train_and_evaluate(tiny_config(tiny_bert, **{
            "optim.lr": 1e30, "optim.head_lr": 1e30, "eval_every_steps": 5,
            "checkpoint_every_steps": 0}), tmp_path / "nan")
    assert not list((tmp_path / "nan" / "checkpoints").iterdir())
    assert not list((tmp_path / "nan").glob("adapter*")) and not read_metrics(tmp_path / "nan")


@pytest.mark.parametrize("method", ["lora", "head", "full"])
def test_baseline_methods_train_on_the_same_machinery(tiny_config, tiny_bert, tmp_path, method):
    s = train.train_and_evaluate(tiny_config(tiny_bert, method=method, num_train_steps=2,
                                         eval_every_steps=2), tmp_path / method)
    expected = {"lora": 2 * (3 * 4 * (32 + 32) + 4 * (64 + 32)), "head": 0}.get(method)
    if expected is not None:
        assert s["trainable_params"] == expected
    else:
        assert s["trainable_params"] > 900_000          # every weight (embeddings included)
    assert s["head_params"] == 66


def test_eval_merged_equals_adapted(tiny_config, tiny_bert, tmp_path):
    cfg = tiny_config(tiny_bert, num_train_steps=3)
    train.train_and_evaluate(cfg, tmp_path / "run")
    scores = evaluate_lib.evaluate(cfg, str(tmp_path / "run" / "adapter.safetensors"), "both",
                                   tmp_path / "eval")
    assert scores["agree"]["difference"] == 0.0
    saved = json.loads((tmp_path / "eval" / "scores_merged.json").read_text())
    assert saved["accuracy"] == scores["merged"]["accuracy"]
    info = lx.io.adapter_info(tmp_path / "run" / "adapter.safetensors")
    assert info["config"].rank == 4
    with pytest.raises(ValueError, match="needs --adapter"):
        evaluate_lib.evaluate(cfg, None, "merged")


def test_grad_accumulation_matches_one_big_batch(tiny_config, tiny_bert, tmp_path):
    """2 micro-batches of 8 with optax.MultiSteps == one batch of 16 (no dropout)."""
    same = {"num_train_steps": 2, "model.dropout": 0.0, "task.bucket": False}  # same rows
    one = tiny_config(tiny_bert, **same)
    two = tiny_config(tiny_bert, **same, **{"optim.grad_accum": 2})
    train.train_and_evaluate(one, tmp_path / "one")
    train.train_and_evaluate(two, tmp_path / "two")
    a, b = _r(tmp_path / "one" / "adapter.safetensors"), _r(tmp_path / "two" / "adapter.safetensors")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
    assert np.abs(a["loraxs_R/r4"]).max() > 1e-3          # R moved away from its 1e-5 init


def test_sweep_reports_the_median_of_best_epochs(tiny_config, tiny_bert, tmp_path):
    from loraxs_jax.experiments import sweep

    res = sweep.sweep(tiny_config(tiny_bert, num_train_steps=2, eval_every_steps=1), tmp_path, 3)
    assert len(res["per_seed"]) == 3 and res["median"] == sorted(res["per_seed"])[1]
    again = sweep.sweep(tiny_config(tiny_bert), tmp_path, 3)      # finished seeds are read back
    assert again == res
