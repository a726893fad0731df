"""Tasks: what a run trains on and how it is scored. Every task satisfies :class:`Task`.

Two families implement it: :class:`GlueTask` (sequence classification and regression with an
encoder) and ``lm_tasks.CausalLMTask`` (instruction tuning and generative evaluation with a
decoder: commonsense, math). ``build_task`` picks one by ``config.task.name`` from
:data:`TASKS`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from loraxs_jax import parallel
from loraxs_jax.experiments.modeling import Model

log = logging.getLogger("loraxs")


class Task(Protocol):
    """What the train loop and evaluation need from a task.

    Attributes:
      name: the task's name in logs and summaries.
      main_metric: the key of ``evaluate``'s result that picks the best checkpoint.
      num_train: training examples.
    """

    name: str
    main_metric: str
    num_train: int

    def train_batches(self, batch_size: int, seed: int) -> Iterable[dict[str, np.ndarray]]:
        """A resumable stream of numpy batches (``state_dict``/``load_state_dict``,
        ``steps_per_epoch``)."""

    def prepare(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch as the step takes it (e.g. padding columns trimmed)."""

    def loss(self, apply_fn: Callable, params: dict, batch: dict, rng: jax.Array,
             train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(mean loss, auxiliary metrics) of one batch; jittable."""

    def predict_fn(self, apply_fn: Callable, mesh: Any = None,
                   param_shardings: Any = None) -> Callable:
        """``predict(params, inputs) -> predictions``, jitted (sharded on ``mesh``)."""

    def evaluate(self, apply_fn: Callable, params: dict, batch_size: int,
                 predict: Callable | None = None,
                 predictions: str | Path | None = None) -> dict[str, float]:
        """Scores on the evaluation set; ``predictions`` names a JSONL file for each example's
        prediction."""


def classification_loss(logits: jax.Array, batch: dict, num_labels: int) -> jax.Array:
    """Mean cross-entropy (or squared error when ``num_labels == 1``, STS-B) of a batch,
    weighted by ``batch['weights']`` when present (padding rows weigh 0)."""
    w = batch.get("weights", jnp.ones(logits.shape[0], jnp.float32))
    if num_labels == 1:
        per = (logits[:, 0] - batch["labels"]) ** 2
    else:
        per = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def classifier_predict_fn(apply_fn, num_labels: int, mesh=None, param_shardings=None):
    """``predict(params, batch) -> predictions`` for an encoder classifier: class ids, or the
    score when ``num_labels == 1`` (STS-B). Jitted once; with a ``mesh`` (and the params'
    ``NamedSharding`` tree) it is jitted with explicit shardings (``parallel.jit_predict``):
    params as placed, the batch split along data+fsdp with each process contributing its rows,
    predictions replicated. A batch data*fsdp does not divide is padded by repeating its last
    row, and those predictions are dropped."""
    def predict(params, inputs):
        logits = apply_fn({"params": params}, inputs["input_ids"], inputs["attention_mask"],
                          inputs.get("token_type_ids"))
        return logits[:, 0] if num_labels == 1 else jnp.argmax(logits, -1)

    def inputs_of(batch):
        return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")
                if k in batch}

    if mesh is None:
        jitted = jax.jit(predict)
        return lambda params, batch: jitted(params, inputs_of(batch))
    jitted = parallel.jit_predict(predict, mesh, param_shardings)

    def sharded(params, batch):
        inputs, n = parallel.pad_rows(inputs_of(batch), parallel.batch_ways(mesh))
        return jitted(params, parallel.shard_batch(inputs, mesh))[:n]

    sharded.jitted = jitted
    return sharded


# ----------------------------------------------------------------------------- GLUE task
class GlueTask:
    """Sequence classification (or STS-B regression) on a GLUE task with an encoder."""

    model_kind = "encoder"

    def __init__(self, config: ml_collections.ConfigDict, model: Model):
        from loraxs_jax.experiments.data import glue

        self.name = config.task.glue
        self.spec = glue.get_task(self.name)
        self.config = config
        t = config.task
        train = glue.load_glue(self.name, "train", t.train_source)
        val = glue.load_glue(self.name, "validation", t.eval_source)
        if t.train_limit:     # a seeded subset, each label keeping its share (not the first N)
            from loraxs_jax.experiments.data.batching import subset

            labels = np.asarray(train["label"][:]) if self.spec.labels else None
            train = train.select(subset(len(train), t.train_limit, config.seed, labels))
        if t.eval_limit:
            val = val.select(range(min(t.eval_limit, len(val))))
        self.train_arrays = glue.tokenize_glue(train, self.name, model.tokenizer, t.max_length)
        self.eval_arrays = glue.tokenize_glue(val, self.name, model.tokenizer, t.max_length)
        self.num_train, self.num_eval = len(train), len(val)
        self.main_metric = self.spec.metric
        log.info("task %s: %d train / %d validation examples", self.name, len(train), len(val))

    @property
    def num_labels(self) -> int:
        return self.spec.num_labels

    def train_batches(self, batch_size: int, seed: int):
        from loraxs_jax.experiments.data.batching import Batches, bucketed_plan
        from loraxs_jax.experiments.data.glue import glue_batches

        if not self.config.task.bucket:
            return glue_batches(self.train_arrays, batch_size, seed=seed)
        arrays = self.train_arrays
        plan = bucketed_plan(arrays["attention_mask"].sum(1), batch_size, seed=seed, window=16)
        return Batches(plan, lambda idx: {k: v[idx] for k, v in arrays.items()},
                       num_examples=self.num_train, batch_size=batch_size, seed=seed)

    def eval_batches(self, batch_size: int):
        from loraxs_jax.experiments.data.glue import glue_batches

        return glue_batches(self.eval_arrays, batch_size, shuffle=False, drop_remainder=False,
                            num_epochs=1, pad_remainder=True)

    @staticmethod
    def prepare(batch, multiple: int = 16):
        """Trim padding columns that no row uses (rounded up to ``multiple`` tokens, so only a
        few shapes are compiled): SST-2 sentences average ~25 tokens, max_length is 128."""
        longest = int(np.max(np.sum(batch["attention_mask"], axis=1)))
        width = min(batch["input_ids"].shape[1], -(-longest // multiple) * multiple)
        return {k: v[:, :width] if v.ndim == 2 else v for k, v in batch.items()}

    @staticmethod
    def _inputs(batch):
        return (batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))

    @staticmethod
    def num_labels_of(config: ml_collections.ConfigDict) -> int:
        from loraxs_jax.experiments.data.glue import get_task

        return get_task(config.task.glue).num_labels

    def loss(self, apply_fn, params, batch, rng, train: bool):
        logits = apply_fn({"params": params}, *self._inputs(batch), deterministic=not train,
                          rngs={"dropout": rng} if train else None)
        return classification_loss(logits, batch, self.num_labels), {
            "tokens": jnp.sum(batch["attention_mask"])}

    def predict_fn(self, apply_fn, mesh=None, param_shardings=None):
        return classifier_predict_fn(apply_fn, self.num_labels, mesh, param_shardings)

    def evaluate(self, apply_fn, params, batch_size: int, predict=None,
                 predictions: str | Path | None = None) -> dict[str, float]:
        from loraxs_jax.experiments.data.metrics import glue_metrics

        predict = predict or self.predict_fn(apply_fn)
        preds, labels = [], []
        for batch in self.eval_batches(batch_size):
            batch = self.prepare(batch)
            keep = batch.pop("weights") > 0
            preds.append(np.asarray(predict(params, batch))[keep])
            labels.append(batch["labels"][keep])
        preds, labels = np.concatenate(preds), np.concatenate(labels)
        if predictions:
            with open(predictions, "w") as f:
                for i, (p, y) in enumerate(zip(preds.tolist(), labels.tolist())):
                    f.write(json.dumps({"index": i, "prediction": p, "label": y}) + "\n")
        return glue_metrics(self.name, preds, labels)


def _lm_task(name: str):
    def build(config: ml_collections.ConfigDict, model: Model):
        from loraxs_jax.experiments import lm_tasks

        return lm_tasks.LM_TASKS[name](config, model)

    build.model_kind = "decoder"
    build.num_labels_of = lambda config: 0
    return build


# config.task.name -> a builder (config, model) -> Task, with the model kind it needs and the
# number of labels the model's head needs (0: no head).
TASKS: dict[str, Any] = {"glue": GlueTask, "commonsense": _lm_task("commonsense"),
                         "math": _lm_task("math")}


def _task_entry(config: ml_collections.ConfigDict):
    if config.task.name not in TASKS:
        raise ValueError(f"config.task.name={config.task.name!r}: expected one of "
                         f"{', '.join(TASKS)}")
    return TASKS[config.task.name]


def build_task(config: ml_collections.ConfigDict, model: Model) -> Task:
    """The task ``config.task.name`` names, on ``model`` (whose kind it must fit)."""
    entry = _task_entry(config)
    if model.kind != entry.model_kind:
        raise ValueError(f"task {config.task.name} needs model.kind='{entry.model_kind}', "
                         f"got '{model.kind}'")
    return entry(config, model)


def num_labels_for(config: ml_collections.ConfigDict) -> int:
    """Outputs of the task head the model needs (0 for causal-LM tasks)."""
    return _task_entry(config).num_labels_of(config)
