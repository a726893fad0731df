"""What train.py and eval.py share: build the model, the method (LoRA-XS or a baseline) and the
task from a config. Read top to bottom; no framework.

A task is a small object with ``train_batches(seed)`` (a resumable stream of numpy batches),
``loss(apply_fn, params, batch, rng, train)`` and ``evaluate(apply_fn, params)``; the model
bundle carries the Flax module, its params and tokenizer.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import loraxs_jax as lx
from loraxs_jax.baselines import LORA_TRAINABLE, lora_apply

log = logging.getLogger("loraxs")
METHODS = ("loraxs", "lora", "full", "head")


# ----------------------------------------------------------------------------- model
@dataclasses.dataclass
class Model:
    module: Any          # the Flax linen module (unmodified; LoRA-XS comes in through lx.wrap)
    params: dict         # the base params (plain tree)
    tokenizer: Any
    config: Any          # EncoderConfig | DecoderConfig
    kind: str            # encoder | decoder


def resolve_path(path: str) -> str:
    """"asset:NAME" → the cached asset's folder or file (loraxs_jax.assets); anything else as is."""
    if not path:
        raise ValueError("config.model.path is empty: give an HF folder, a hub id, a .gguf file "
                         "or asset:NAME")
    if path.startswith("asset:"):
        from loraxs_jax.assets import asset_path

        p = asset_path(path.split(":", 1)[1])
        if p.is_dir():
            ggufs = sorted(p.glob("*.gguf"))
            if ggufs and not (p / "config.json").exists():
                return str(ggufs[0])
        return str(p)
    return path


def _tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def build_model(config: ml_collections.ConfigDict, num_labels: int = 2) -> Model:
    """Load the base model named by ``config.model`` (weights from disk, hub or GGUF)."""
    m = config.model
    dtype, param_dtype = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
    path = resolve_path(m.path)
    if m.kind == "encoder":
        from loraxs_jax.models.encoder import Encoder, load_encoder

        options = {"scan_layers": m.scan_layers, "remat": m.remat, "param_dtype": param_dtype}
        if m.dropout >= 0:
            options.update(hidden_dropout=m.dropout, attention_dropout=m.dropout)
        cfg, params = load_encoder(path, num_labels=num_labels, head=m.head, dtype=dtype,
                                   rng=jax.random.key(config.seed), fresh_head=m.fresh_head,
                                   **options)
        return Model(Encoder(cfg), params, _tokenizer(path), cfg, "encoder")
    if m.kind == "decoder":
        from loraxs_jax.models.decoder import DecoderForCausalLM, load_decoder

        options = {"scan_layers": m.scan_layers, "remat": m.remat}
        if path.endswith(".gguf"):
            from loraxs_jax.models.gguf import load_gguf

            cfg, params, tok = load_gguf(path, dtype=dtype, param_dtype=param_dtype, **options)
        else:
            cfg, params = load_decoder(path, dtype=dtype, param_dtype=param_dtype, **options)
            tok = _tokenizer(path)
        return Model(DecoderForCausalLM(cfg), params, tok, cfg, "decoder")
    raise ValueError(f"config.model.kind={m.kind!r}: expected 'encoder' or 'decoder'")


def place_params(config: ml_collections.ConfigDict, model: Model, params: dict, mesh=None):
    """Shard ``params`` (base, adapted or merged) on the mesh of ``config.mesh``: base leaves by
    the model's logical axes and the rules, LoRA-XS leaves like their kernel (A: input axes, B:
    output axes, R replicated). Returns (mesh, placed params, their NamedSharding tree)."""
    from loraxs_jax import sharding

    if model.kind == "encoder":
        from loraxs_jax.models.encoder import param_logical_axes
    else:
        from loraxs_jax.models.decoder import param_logical_axes
    mesh = mesh or sharding.make_mesh(config.mesh)
    base = sharding.param_shardings(model.params, param_logical_axes(model.config), mesh)
    shardings = sharding.adapted_shardings(params, base)
    return mesh, sharding.shard_params(params, shardings), shardings


# ----------------------------------------------------------------------------- method
def loraxs_config(config: ml_collections.ConfigDict) -> lx.LoraXSConfig:
    return lx.LoraXSConfig.from_section(config.loraxs, config.model.scan_layers)


@dataclasses.dataclass
class Method:
    """The adapted params and which of their leaves are trained."""

    name: str
    params: dict
    trainable: tuple[str, ...]   # regexes of trained leaves besides R
    train_r: bool
    lora_cfg: lx.LoraXSConfig

    def split(self, params=None):
        return lx.split(self.params if params is None else params, trainable=self.trainable,
                        train_r=self.train_r)

    def counts(self) -> dict[str, int]:
        """Trainable numbers: the method's own (R; LoRA's A, B; all weights) and the head's."""
        t, _ = self.split()
        head = lx.split(self.params, trainable=self.lora_cfg.trainable, train_r=False)[0] \
            if self.lora_cfg.trainable else {}
        n_head = sum(x.size for x in jax.tree_util.tree_leaves(head))
        n_all = sum(x.size for x in jax.tree_util.tree_leaves(t))
        return {"trainable": n_all - (n_head if self.name != "full" else 0), "head": n_head,
                **{k: v for k, v in lx.count(self.params).items() if k == "adapter_bytes"}}


def build_method(config: ml_collections.ConfigDict, params: dict) -> Method:
    if config.method not in METHODS:
        raise ValueError(f"config.method={config.method!r}: expected one of {', '.join(METHODS)}")
    cfg = loraxs_config(config)
    rng = jax.random.key(config.seed)
    if config.method == "loraxs":
        return Method("loraxs", lx.apply(params, cfg, rng), cfg.trainable, True, cfg)
    if config.method == "lora":
        return Method("lora", lora_apply(params, cfg, rng), cfg.trainable + LORA_TRAINABLE,
                      False, cfg)
    if config.method == "full":
        return Method("full", params, (".*",), False, cfg)
    return Method("head", params, cfg.trainable, False, cfg)


# ----------------------------------------------------------------------------- optimizer
def make_optimizer(config: ml_collections.ConfigDict, trainable: dict, lora_cfg: lx.LoraXSConfig,
                   total_steps: int) -> optax.GradientTransformation:
    """AdamW with separate peak rates for the method's params (``optim.lr``) and the task head
    (``optim.head_lr``), warmup then linear or cosine decay to 0, optional clipping and gradient
    accumulation (``optax.MultiSteps``). State exists only for ``trainable``."""
    o = config.optim
    warmup = o.warmup_steps if o.warmup_steps >= 0 else int(round(o.warmup_ratio * total_steps))
    warmup = min(warmup, max(total_steps - 1, 0))

    def schedule(peak):
        decay = max(total_steps - warmup, 1)
        if o.schedule == "cosine":
            tail = optax.cosine_decay_schedule(peak, decay)
        elif o.schedule == "linear":
            tail = optax.linear_schedule(peak, 0.0, decay)
        else:
            raise ValueError(f"optim.schedule={o.schedule!r}: expected linear or cosine")
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), tail], [warmup])

    def adamw(peak):
        return optax.adamw(schedule(peak), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)

    head = lora_cfg.trainable if config.method != "full" else ()

    labels = lx.transform.unflatten(
        {p: "head" if head and lora_cfg.is_extra_trainable(lx.transform.path_str(p)) else "main"
         for p in lx.transform.flatten(trainable)}, {})

    tx = optax.multi_transform({"main": adamw(o.lr), "head": adamw(o.head_lr)}, labels)
    if o.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
    if o.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum)
    return tx


def classifier_predict_fn(apply_fn, num_labels: int, mesh=None, param_shardings=None):
    """``predict(params, batch) -> predictions`` for an encoder classifier: class ids, or the
    score when ``num_labels == 1`` (STS-B). Jitted once; with a ``mesh`` (and the params'
    ``NamedSharding`` tree) it is jitted with explicit shardings (``sharding.jit_predict``):
    params as placed, the batch split along data+fsdp with each process contributing its rows,
    predictions replicated. A batch data*fsdp does not divide is padded by repeating its last
    row, and those predictions are dropped."""
    from loraxs_jax import sharding

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
    jitted = sharding.jit_predict(predict, mesh, param_shardings)

    def sharded(params, batch):
        inputs, n = sharding.pad_rows(inputs_of(batch), sharding.batch_ways(mesh))
        return jitted(params, sharding.shard_batch(inputs, mesh))[:n]

    sharded.jitted = jitted
    return sharded


# ----------------------------------------------------------------------------- GLUE task
class GlueTask:
    """Sequence classification (or STS-B regression) on a GLUE task with an encoder."""

    def __init__(self, config: ml_collections.ConfigDict, model: Model):
        from loraxs_jax.data import glue

        self.name = config.task.glue
        self.spec = glue.get_task(self.name)
        self.config = config
        t = config.task
        train = glue.load_glue(self.name, "train", t.train_source)
        val = glue.load_glue(self.name, "validation", t.eval_source)
        if t.train_limit:
            train = train.select(range(min(t.train_limit, len(train))))
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
        from loraxs_jax.data.batching import Batches, bucketed_plan
        from loraxs_jax.data.glue import glue_batches

        if not self.config.task.bucket:
            return glue_batches(self.train_arrays, batch_size, seed=seed)
        arrays = self.train_arrays
        plan = bucketed_plan(arrays["attention_mask"].sum(1), batch_size, seed=seed, window=16)
        return Batches(plan, lambda idx: {k: v[idx] for k, v in arrays.items()},
                       num_examples=self.num_train, batch_size=batch_size, seed=seed)

    def eval_batches(self, batch_size: int):
        from loraxs_jax.data.glue import glue_batches

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

    def loss(self, apply_fn, params, batch, rng, train: bool):
        logits = apply_fn({"params": params}, *self._inputs(batch), deterministic=not train,
                          rngs={"dropout": rng} if train else None)
        w = batch.get("weights", jnp.ones(logits.shape[0], jnp.float32))
        if self.num_labels == 1:
            per = (logits[:, 0] - batch["labels"]) ** 2
        else:
            per = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        loss = jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)
        return loss, {"tokens": jnp.sum(batch["attention_mask"])}

    def predict_fn(self, apply_fn, mesh=None, param_shardings=None):
        return classifier_predict_fn(apply_fn, self.num_labels, mesh, param_shardings)

    def evaluate(self, apply_fn, params, batch_size: int, predict=None) -> dict[str, float]:
        from loraxs_jax.data.metrics import glue_metrics

        predict = predict or self.predict_fn(apply_fn)
        preds, labels = [], []
        for batch in self.eval_batches(batch_size):
            batch = self.prepare(batch)
            keep = batch.pop("weights") > 0
            preds.append(np.asarray(predict(params, batch))[keep])
            labels.append(batch["labels"][keep])
        return glue_metrics(self.name, np.concatenate(preds), np.concatenate(labels))


def build_task(config: ml_collections.ConfigDict, model: Model):
    if config.task.name == "glue":
        if model.kind != "encoder":
            raise ValueError("GLUE tasks need model.kind='encoder'")
        return GlueTask(config, model)
    if config.task.name in ("commonsense", "math"):
        from lm_tasks import build_lm_task

        return build_lm_task(config, model)
    raise ValueError(f"config.task.name={config.task.name!r}: expected glue, commonsense or math")


def num_labels_for(config: ml_collections.ConfigDict) -> int:
    if config.task.name == "glue":
        from loraxs_jax.data.glue import get_task

        return get_task(config.task.glue).num_labels
    return 0


def workdir_path(workdir: str | Path) -> Path:
    p = Path(workdir)
    p.mkdir(parents=True, exist_ok=True)
    return p
