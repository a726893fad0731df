"""Train LoRA-XS (or a baseline) on a task from an ml-collections config.

    python train.py --config=configs/minilm_sst2.py --workdir=runs/demo
    loraxs-train --config=configs/glue.py:task=rte,rank=25 --config.optim.lr=2e-3 --workdir=...

``train_step`` is a pure jitted function of (state, frozen params, batch): it differentiates the
trainable half of ``lx.split`` only (R and the task head), so no gradient of a frozen weight is
computed and AdamW holds state for the trainable leaves alone. ``train_and_evaluate`` runs the
loop and leaves in the workdir: config.json, metrics.jsonl, TensorBoard events (tb/), PNG plots
(plots/), the adapter (adapter.safetensors: R alone; adapter_best.safetensors: the best
evaluation's), resumable checkpoints (checkpoints/) and summary.json. Killed runs resume from the
latest checkpoint and end with the same R as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import loraxs_jax as lx
from loraxs_jax import parallel
from loraxs_jax.experiments import methods, modeling, tasks
from loraxs_jax.experiments.checkpointing import CheckpointManager
from loraxs_jax.experiments.reporting import Writer, plot_metrics, summary_table
from loraxs_jax.tree import flatten, unflatten

log = logging.getLogger("loraxs")


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------- optimizer
def make_optimizer(config: ml_collections.ConfigDict, trainable: dict, method: methods.Method,
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

    labels = unflatten({p: "head" if method.is_head(p) else "main" for p in flatten(trainable)})
    tx = optax.partition({"main": adamw(o.lr), "head": adamw(o.head_lr)}, labels)
    if o.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
    if o.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum)
    return tx


# ----------------------------------------------------------------------------- steps
def make_train_step(task: tasks.Task, apply_fn: Callable, tx: optax.GradientTransformation,
                    seed: int):
    """The pure step (state, frozen, batch) -> (state, metrics); ``parallel.jit_train_step``
    jits it with the mesh's shardings, donating the old state.

    state = {"trainable", "opt_state", "step"}; dropout keys are folded from ``seed`` and the
    step, so a resumed run draws the same masks as an uninterrupted one."""
    base_key = jax.random.key(seed)

    def train_step(state, frozen, batch):
        rng = jax.random.fold_in(base_key, state["step"])

        def loss_fn(trainable):
            return task.loss(apply_fn, lx.combine(trainable, frozen), batch, rng, True)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["trainable"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        new = {"trainable": optax.apply_updates(state["trainable"], updates),
               "opt_state": opt_state, "step": state["step"] + 1}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}

    return train_step


def place_on_mesh(config, model, method, tx):
    """Build the mesh from ``config.mesh``, shard the base params by the model's logical axes
    and the LoRA-XS leaves like their kernels (A: input axes, B: output axes, R replicated), and
    return (mesh, initial train state, frozen, state shardings, frozen shardings)."""
    mesh, method.params, shardings = modeling.place_params(config, model, method.params)
    trainable, frozen = method.split()
    t_sh = parallel.subtree_shardings(shardings, trainable)
    f_sh = parallel.subtree_shardings(shardings, frozen)

    def init(t):
        return {"trainable": t, "opt_state": tx.init(t), "step": jnp.zeros((), jnp.int32)}

    # Explicit: AdamW's mu and nu (and MultiSteps' accumulators) like their param, the rest
    # (counts, schedule state) replicated.
    abstract = jax.eval_shape(init, trainable)
    state_sh = {"trainable": t_sh, "step": parallel.replicated(mesh),
                "opt_state": parallel.opt_state_shardings(abstract["opt_state"], t_sh, mesh)}
    state = jax.jit(init, in_shardings=(t_sh,), out_shardings=state_sh)(trainable)
    log.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
    return mesh, state, frozen, state_sh, f_sh


# ----------------------------------------------------------------------------- loop
@dataclasses.dataclass
class Run:
    """Everything one training run holds: built by :func:`setup`, driven by
    :func:`train_and_evaluate`."""

    config: ml_collections.ConfigDict
    workdir: Path
    model: modeling.Model
    task: tasks.Task
    method: methods.Method
    stream: Any                  # the resumable batch stream
    total: int                   # optimizer steps
    accum: int                   # micro-batches per optimizer step
    eval_every: int
    ckpt_every: int
    apply_fn: Callable
    mesh: Any
    state: dict                  # {"trainable", "opt_state", "step"}
    frozen: dict
    train_step: Callable
    predict: Callable
    mngr: CheckpointManager
    writer: Writer
    counts: dict[str, int]
    init_seconds: float
    started: float
    best: dict = dataclasses.field(default_factory=lambda: {"metric": -math.inf, "step": -1})
    last_eval: dict = dataclasses.field(default_factory=dict)

    @property
    def opt_step(self) -> int:
        return int(self.state["step"]) // self.accum

    def params(self) -> dict:
        return lx.combine(self.state["trainable"], self.frozen)

    def evaluate(self, opt_step: int) -> dict[str, float]:
        """Score, record, and keep the best evaluation's trained leaves (adapter_best)."""
        scores = self.task.evaluate(self.apply_fn, self.params(), self.config.eval_batch_size,
                                    self.predict)
        self.last_eval.update(step=opt_step, scores=scores)
        self.writer.write("eval", opt_step, scores)
        metric = scores[self.task.main_metric]
        if metric > self.best["metric"]:
            self.best.update(metric=float(metric), step=int(opt_step))
            self.method.save(self.workdir / "adapter_best", self.state["trainable"], self.frozen)
        log.info("step %d: %s (best %s %.4f at step %d)", opt_step,
                 " ".join(f"{k}={v:.4f}" for k, v in scores.items()), self.task.main_metric,
                 self.best["metric"], self.best["step"])
        return scores

    def checkpoint(self, opt_step: int) -> None:
        self.mngr.save(int(self.state["step"]), self.state, {
            "data": self.stream.state_dict(), "best": self.best, "opt_step": opt_step})


def setup(config: ml_collections.ConfigDict, workdir: str | Path) -> Run:
    """Build the model, task, method, optimizer and mesh of a run, and restore its latest
    checkpoint if the workdir holds one."""
    workdir = modeling.workdir_path(workdir)
    if parallel.is_main_process():     # multi-process: all compute, process 0 writes files
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    t0 = time.time()
    model = modeling.build_model(config, tasks.num_labels_for(config))
    task = tasks.build_task(config, model)
    method = methods.build_method(config, model.params)
    init_s = time.time() - t0
    counts = method.counts()
    log.info("method %s: %s trainable (+%s head), built in %.1fs", method.name,
             f"{counts['trainable']:,}", f"{counts['head']:,}", init_s)

    accum = config.optim.grad_accum
    if config.batch_size % accum:
        raise ValueError(f"batch_size={config.batch_size} is not divisible by "
                         f"optim.grad_accum={accum}")
    stream = task.train_batches(config.batch_size // accum, config.seed)
    steps_per_epoch = stream.steps_per_epoch // accum
    if steps_per_epoch == 0:
        raise ValueError(f"{task.num_train} training examples make no batch of {config.batch_size}")
    total = config.num_train_steps if config.num_train_steps > 0 else (
        config.num_epochs * steps_per_epoch)
    eval_every = config.eval_every_steps or steps_per_epoch

    apply_fn = method.apply_fn(model.module.apply)
    tx = make_optimizer(config, method.split()[0], method, total)
    mesh, state, frozen, state_sh, frozen_sh = place_on_mesh(config, model, method, tx)
    run = Run(
        config=config, workdir=workdir, model=model, task=task, method=method, stream=stream,
        total=total, accum=accum, eval_every=eval_every,
        ckpt_every=config.checkpoint_every_steps or eval_every, apply_fn=apply_fn, mesh=mesh,
        state=state, frozen=frozen,
        train_step=parallel.jit_train_step(make_train_step(task, apply_fn, tx, config.seed),
                                           mesh, state_sh, frozen_sh),
        predict=task.predict_fn(apply_fn, mesh, lx.combine(state_sh["trainable"], frozen_sh)),
        mngr=CheckpointManager(workdir / "checkpoints", keep=config.keep_checkpoints),
        writer=Writer(workdir, enabled=parallel.is_main_process()), counts=counts,
        init_seconds=init_s, started=t0)
    if run.mngr.latest_step() is not None:
        run.state, meta = run.mngr.restore(target=run.state)
        stream.load_state_dict(meta["data"])
        run.best = meta["best"]
        log.info("resumed from step %d (data epoch %d, batch %d)", meta["opt_step"],
                 stream.epoch, stream.step)
    return run


def _train_loop(run: Run, hooks: Sequence[Callable[[int, dict], None]]) -> None:
    from tqdm import tqdm

    config = run.config
    rows = parallel.process_batch_slice(config.batch_size // run.accum, run.mesh)
    opt_step = run.opt_step
    bar = tqdm(total=run.total, initial=opt_step, desc=f"{run.method.name} {run.task.name}",
               unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=not parallel.is_main_process())
    window: list[dict] = []
    t_last = time.time()
    batches = iter(run.stream)
    try:
        while opt_step < run.total:
            for _ in range(run.accum):
                batch = run.task.prepare(next(batches))
                batch = parallel.global_batch({k: v[rows] for k, v in batch.items()}, run.mesh)
                run.state, metrics = run.train_step(run.state, run.frozen, batch)
                window.append(metrics)
            opt_step += 1
            bar.update(1)
            if opt_step % config.log_every_steps == 0 or opt_step == run.total:
                host = jax.device_get(window)
                window = []
                loss = float(np.mean([m["loss"] for m in host]))
                if not math.isfinite(loss):
                    raise NonFiniteLoss(
                        f"training loss became {loss} by optimizer step {opt_step}; stopping. "
                        f"The last good checkpoint (step {run.mngr.latest_step()}) is in "
                        f"{run.workdir / 'checkpoints'}: lower optim.lr or enable optim.grad_clip")
                now = time.time()
                rate = float(sum(m["tokens"] for m in host)) / max(now - t_last, 1e-9)
                t_last = now
                run.writer.write("train", opt_step, {
                    "loss": loss, "grad_norm": float(np.mean([m["grad_norm"] for m in host])),
                    "tokens_per_s": rate})
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
            if opt_step % run.eval_every == 0 or opt_step == run.total:
                run.evaluate(opt_step)
            if opt_step % run.ckpt_every == 0 or opt_step == run.total:
                run.checkpoint(opt_step)
            for hook in hooks:
                hook(opt_step, metrics)
    finally:
        bar.close()
        run.writer.close()


def _finish(run: Run) -> dict[str, Any]:
    """Final scores, the adapter, plots and the summary."""
    opt_step, metric = run.opt_step, run.task.main_metric
    final = run.last_eval["scores"] if run.last_eval.get("step") == opt_step else (
        run.task.evaluate(run.apply_fn, run.params(), run.config.eval_batch_size, run.predict))
    adapter = run.method.save(run.workdir / "adapter", run.state["trainable"], run.frozen)
    main = parallel.is_main_process()
    if main:
        plot_metrics(run.workdir, metric)
    summary = {
        "method": run.method.name, "task": run.task.name, **run.method.summary(run.config),
        "trainable_params": run.counts["trainable"], "head_params": run.counts["head"],
        "adapter_file_bytes": adapter.stat().st_size if adapter else 0,
        f"final_{metric}": float(final[metric]),
        f"best_{metric}": float(max(run.best["metric"], final[metric])),
        "best_step": run.best["step"], "steps": opt_step,
        "init_seconds": round(run.init_seconds, 2),
        "total_seconds": round(time.time() - run.started, 1),
    }
    if main:
        (run.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        print("\n" + summary_table(summary), flush=True)
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       hooks: Sequence[Callable[[int, dict], None]] = ()) -> dict[str, Any]:
    """Train per ``config`` in ``workdir`` (resuming if it holds a checkpoint); return the summary.

    ``hooks`` are called as hook(step, metrics) after every optimizer step (tests use one to
    simulate a kill)."""
    run = setup(config, workdir)
    _train_loop(run, hooks)
    return _finish(run)


# ----------------------------------------------------------------------------- command line
def main(argv: Sequence[str]) -> None:
    del argv
    from absl import flags

    from loraxs_jax.experiments import cli

    cli.start()
    try:
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except NonFiniteLoss as e:
        raise SystemExit(f"error: {e}") from None


def cli_main() -> None:
    """``loraxs-train`` / ``python train.py``: --config=FILE[:args] --workdir=DIR."""
    from absl import flags

    from loraxs_jax.experiments import cli

    cli.define_config_flag()
    flags.DEFINE_string("workdir", None, "where the run writes everything; resumes if it exists")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)


if __name__ == "__main__":
    cli_main()
