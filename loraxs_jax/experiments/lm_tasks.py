"""Causal-LM tasks of the paper: commonsense reasoning (Table 2) and math (Table 3).

Training is instruction tuning on prompt + answer with the prompt masked out of the loss;
evaluation generates greedily with the KV cache and extracts answers the way LLM-Adapters
(commonsense) and MetaMath (GSM8K, MATH) do. ``tasks.build_task`` builds them from
:data:`LM_TASKS`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

log = logging.getLogger("loraxs")
MATH_EVAL_SETS = ("gsm8k", "math")     # config.task.eval_sets of the math task


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def causal_lm_loss(logits: jax.Array, batch: dict) -> jax.Array:
    """Mean next-token cross-entropy over the tokens ``batch['loss_mask']`` marks (the answer),
    computed in float32: logits (B, T, V) predict ``batch['labels']`` shifted by one."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    labels = jnp.maximum(batch["labels"][:, 1:], 0)
    mask = batch["loss_mask"][:, 1:]
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class CausalLMTask:
    """Prompt/answer pairs for training and a set of generative evaluations (a ``tasks.Task``)."""

    def __init__(self, config: ml_collections.ConfigDict, model, train_rows, eval_sets,
                 main_metric: str):
        from loraxs_jax.experiments.data.lm import tokenize_lm

        self.config, self.model, self.name = config, model, config.task.name
        self.tokenizer = model.tokenizer
        self.pad_id = _pad_id(self.tokenizer)
        self.eos_id = getattr(self.tokenizer, "eos_token_id", None)
        prompts, answers = train_rows
        self.train = tokenize_lm(self.tokenizer, prompts, answers,
                                 max_length=config.task.max_length)
        self.num_train = len(self.train)
        self.eval_sets = eval_sets          # {name: (prompts, golds, scorer(generation, gold))}
        self.main_metric = main_metric
        log.info("task %s: %d training examples; eval sets %s", self.name, self.num_train,
                 {k: len(v[0]) for k, v in eval_sets.items()})

    def train_batches(self, batch_size: int, seed: int):
        from loraxs_jax.experiments.data.lm import lm_batches

        return lm_batches(self.train, batch_size, pad_id=self.pad_id, seed=seed,
                          max_length=self.config.task.max_length)

    @staticmethod
    def prepare(batch):
        return batch

    def loss(self, apply_fn, params, batch, rng, train: bool):
        del rng, train   # our decoders have no dropout
        logits = apply_fn({"params": params}, batch["input_ids"],
                          attention_mask=batch["attention_mask"])
        return causal_lm_loss(logits, batch), {"tokens": jnp.sum(batch["attention_mask"])}

    def predict_fn(self, apply_fn, mesh=None, param_shardings=None):
        """``generate(params, prompts) -> texts``: KV-cache generation in batches of
        ``generation.batch_size``. With a ``mesh`` (and the params' shardings) the program is
        jitted with explicit shardings and each batch is split along data+fsdp; a batch that
        data*fsdp does not divide is padded with copies of its last prompt, whose generations are
        dropped."""
        from loraxs_jax.experiments.data.lm import generation_batch
        from loraxs_jax.models.generate import generate
        from loraxs_jax.parallel import batch_ways, pad_rows

        g = self.config.generation
        ways = 1 if mesh is None else batch_ways(mesh)
        if g.batch_size % ways:
            log.warning("generation.batch_size=%d is not a multiple of the batch mesh axes "
                        "data*fsdp = %d: each batch is padded to %d rows", g.batch_size, ways,
                        -(-g.batch_size // ways) * ways)

        def run(params, prompts: list[str]) -> list[str]:
            out = []
            for lo in range(0, len(prompts), g.batch_size):
                batch = generation_batch(self.tokenizer, prompts[lo:lo + g.batch_size],
                                         pad_id=self.pad_id,
                                         max_length=self.config.task.max_length)
                batch, n = pad_rows(batch, ways)
                new = generate(apply_fn, params, self.model.config, batch["input_ids"],
                               batch["attention_mask"], g.max_new_tokens,
                               eos_token_id=self.eos_id, pad_token_id=self.pad_id, mesh=mesh,
                               param_shardings=param_shardings)
                out += self.tokenizer.batch_decode(np.asarray(new)[:n],
                                                   skip_special_tokens=True)
            return out

        return run

    def generate(self, apply_fn, params, prompts: list[str]) -> list[str]:
        return self.predict_fn(apply_fn)(params, prompts)

    def evaluate(self, apply_fn, params, batch_size: int, predict=None,
                 predictions: str | Path | None = None) -> dict[str, float]:
        del batch_size
        generate = predict or self.predict_fn(apply_fn)
        scores, records = {}, []
        for name, (prompts, golds, scorer) in self.eval_sets.items():
            gens = generate(params, list(prompts))
            hits = [bool(scorer(g, y)) for g, y in zip(gens, golds)]
            scores[f"{name}_accuracy"] = float(np.mean(hits))
            records += [{"set": name, "prompt": p, "generation": g, "gold": y, "correct": h}
                        for p, g, y, h in zip(prompts, gens, golds, hits)]
        per_set = [v for k, v in scores.items() if k.endswith("_accuracy")]
        scores["accuracy"] = float(np.mean(per_set))
        if predictions:
            with open(predictions, "w") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
        return scores


def _limit(rows, n: int):
    return rows.select(range(min(n, len(rows)))) if n else rows


def commonsense_task(config, model) -> CausalLMTask:
    from loraxs_jax.experiments.data import commonsense as cs

    t = config.task
    source = t.train_source if t.train_source not in ("auto", "") else "assets"
    train = _limit(cs.commonsense_train_mixture(tuple(t.tasks), seed=config.seed, source=source),
                   t.train_limit)
    prompts = [cs.commonsense_prompt(i, x) for i, x in zip(train["instruction"], train["input"])]
    eval_sets = {}
    for name in t.tasks:
        ds = _limit(cs.load_commonsense_eval(name), t.eval_limit)
        eval_sets[name] = ([cs.commonsense_prompt(i, x) for i, x in zip(ds["instruction"],
                                                                        ds["input"])],
                           list(ds["answer"]),
                           lambda g, y, task=name: cs.extract_commonsense_answer(task, g) == y)
    return CausalLMTask(config, model, (prompts, list(train["output"])), eval_sets, "accuracy")


def math_task(config, model) -> CausalLMTask:
    from loraxs_jax.experiments.data import math as m
    from loraxs_jax.experiments.data import metrics

    t = config.task
    if t.train_source in ("auto", "gsm_symbolic"):
        train = m.gsm_symbolic_train(t.train_limit or 10_000, seed=config.seed)
    else:
        train = m.load_metamathqa(t.train_source, limit=t.train_limit or 100_000)
    prompts = [m.math_prompt(q) for q in train["query"]]
    answers = [" " + r for r in train["response"]]
    eval_sets: dict[str, Any] = {}
    if "gsm8k" in t.eval_sets:
        gsm = m.load_gsm8k_test()
        if t.train_source in ("auto", "gsm_symbolic"):    # their templates come from these rows
            gsm = gsm.filter(lambda r: not r["in_gsm_symbolic"])
        gsm = _limit(gsm, t.eval_limit)
        eval_sets["gsm8k"] = ([m.math_prompt(q, evaluation=True) for q in gsm["question"]],
                              list(gsm["answer"]),
                              lambda g, y: metrics.gsm8k_equal(metrics.extract_gsm8k_answer(g), y))
    if "math" in t.eval_sets:
        mt = _limit(m.load_math_test(), t.eval_limit)
        eval_sets["math"] = ([m.math_prompt(q, evaluation=True) for q in mt["problem"]],
                             list(mt["answer"]),
                             lambda g, y: metrics.math_equal(metrics.extract_math_answer(g), y))
    return CausalLMTask(config, model, (prompts, answers), eval_sets, "accuracy")


# config.task.name -> (config, model) -> CausalLMTask
LM_TASKS = {"commonsense": commonsense_task, "math": math_task}
