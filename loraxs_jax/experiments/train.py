"""Train LoRA-XS (or a baseline) on a task from an ml-collections config.

    python train.py --config=configs/minilm_sst2.py --workdir=runs/demo
    loraxs-train --config=configs/glue.py:task=rte,rank=25 --config.optim.lr=2e-3 --workdir=...

``train_step`` is a pure jitted function of (state, frozen params, batch): it differentiates the
trainable half of ``lx.split`` only (R and the task head), so no gradient of a frozen weight is
computed and AdamW holds state for the trainable leaves alone. ``train_and_evaluate`` runs the
loop and leaves in the workdir: config.json, metrics.jsonl, TensorBoard events (tb/), PNG plots
(plots/), the adapter (adapter.safetensors: R alone; adapter_best.safetensors: the best
evaluation's), resumable checkpoints (checkpoints/), log.txt (every log line, the libraries'
too) and summary.json. Killed runs resume from the latest checkpoint and end with the same R
and the same metrics.jsonl, record for record, as an uninterrupted run.

NaN and Inf never reach what is kept: the step computes a finite flag (loss, gradient norm and
every trained leaf) on the device; the host reads the flags of all steps since the last check
wherever something is logged, evaluated or saved, and stops with :class:`NonFiniteLoss` before
anything of a non-finite step is written. A workdir belongs to one config (see
``experiments.validate``).
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
from loraxs_jax.experiments.reporting import Writer, echo, plot_metrics, run_log, summary_table
from loraxs_jax.experiments.validate import ConfigError, resume_changes, validate
from loraxs_jax.tree import flatten, unflatten

log = logging.getLogger("loraxs")


class NonFiniteLoss(RuntimeError):
    """Training produced NaN or Inf; nothing of it was saved (the message says what was)."""


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
        trainable = optax.apply_updates(state["trainable"], updates)
        grad_norm = optax.tree.norm(grads)
        new = {"trainable": trainable, "opt_state": opt_state, "step": state["step"] + 1}
        return new, {"loss": loss, "grad_norm": grad_norm, **aux,
                     "params_finite": _all_finite(trainable)}

    return train_step


def _all_finite(tree) -> jax.Array:
    """One device bool: no NaN or Inf in any floating leaf (read on the host only at checks)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                              if jnp.issubdtype(x.dtype, jnp.inexact)] or [jnp.array(True)]))


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
    # host values of the steps since the last training record: {"loss": [...], "grad_norm":
    # [...]}; checkpointed, so a resumed run writes the same records as an uninterrupted one
    window: dict = dataclasses.field(default_factory=lambda: {"loss": [], "grad_norm": []})

    @property
    def opt_step(self) -> int:
        return int(self.state["step"]) // self.accum

    def params(self) -> dict:
        return lx.combine(self.state["trainable"], self.frozen)

    def check_finite(self, pending: list[tuple[int, dict]]) -> float:
        """Read the steps since the last check (one transfer) into ``window``; return their
        tokens. Raises NonFiniteLoss at the first step whose loss, gradient norm or trained
        leaves are not finite, before anything of it is logged, evaluated or saved."""
        host = jax.device_get([m for _, m in pending])
        for (opt_step, _), m in zip(pending, host):
            loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(grad_norm) and m["params_finite"]):
                raise NonFiniteLoss(self._non_finite_message(opt_step, loss, grad_norm,
                                                             bool(m["params_finite"])))
            self.window["loss"].append(loss)
            self.window["grad_norm"].append(grad_norm)
        return float(sum(m["tokens"] for m in host))

    def _non_finite_message(self, opt_step: int, loss: float, grad_norm: float,
                            params_finite: bool) -> str:
        what = f"loss {loss}, gradient norm {grad_norm}" + (
            "" if params_finite else ", and the trained parameters hold NaN/Inf")
        kept = self.mngr.latest_step()
        where = (f"The last finite checkpoint is step {kept} in {self.mngr.directory}"
                 if kept is not None else "There is no checkpoint yet (a rerun starts at step 0)")
        best = (f"; adapter_best.safetensors (step {self.best['step']}) is intact"
                if self.best["step"] >= 0 and self.method.name != "full" else "")
        o = self.config.optim
        return (f"training became non-finite at optimizer step {opt_step} ({what}); stopped "
                f"before logging, evaluating or saving anything of it. {where}{best}. Lower "
                f"optim.lr (now {o.lr:g}; head_lr {o.head_lr:g}) or set optim.grad_clip (now "
                f"{o.grad_clip:g}), and rerun with the same --workdir and "
                "--config.resume=optim.lr (naming each field you change) to continue from there.")

    def log_train(self, opt_step: int, tokens_per_s: float) -> float:
        loss = float(np.mean(self.window["loss"]))
        self.writer.write("train", opt_step, {
            "loss": loss, "grad_norm": float(np.mean(self.window["grad_norm"])),
            "tokens_per_s": tokens_per_s})
        self.window = {"loss": [], "grad_norm": []}
        return loss

    def evaluate(self, opt_step: int) -> dict[str, float]:
        """Score, record, keep the best evaluation's trained leaves (adapter_best) and print one
        line: the step, the scores, the best so far."""
        scores = self.task.evaluate(self.apply_fn, self.params(), self.config.eval_batch_size,
                                    self.predict)
        self.last_eval.update(step=opt_step, scores=scores)
        self.writer.write("eval", opt_step, scores)
        metric = scores[self.task.main_metric]
        if metric > self.best["metric"]:
            self.best.update(metric=float(metric), step=int(opt_step))
            self.method.save(self.workdir / "adapter_best", self.state["trainable"], self.frozen)
        echo(f"step {opt_step}/{self.total}: "       # ("primary" repeats the main metric)
             + " ".join(f"{k}={v:.4f}" for k, v in scores.items() if k != "primary")
             + f" (best {self.task.main_metric} {self.best['metric']:.4f} at step "
             f"{self.best['step']})")
        return scores

    def checkpoint(self, opt_step: int) -> None:
        self.mngr.save(opt_step, self.state, {
            "data": self.stream.state_dict(), "best": self.best, "opt_step": opt_step,
            "window": self.window})


def setup(config: ml_collections.ConfigDict, workdir: str | Path,
          changes: dict[str, tuple] | None = None) -> Run:
    """Build the model, task, method, optimizer and mesh of a run, and restore its latest
    checkpoint if the workdir holds one. ``changes`` are the fields ``config.resume`` changes
    in an existing workdir (:func:`validate.resume_changes`), reported when it resumes."""
    workdir = modeling.workdir_path(workdir)
    if parallel.is_main_process():     # multi-process: all compute, process 0 writes files
        for stale in parallel.remove_stale_temps(workdir):
            log.info("removed %s, left by a write that was killed", stale)
    t0 = time.time()
    model = modeling.build_model(config, tasks.num_labels_for(config))
    task = tasks.build_task(config, model)
    method = methods.build_method(config, model.params)
    init_s = time.time() - t0
    counts = method.counts()
    log.info("method %s: %s trainable (+%s head), built in %.1fs", method.name,
             f"{counts['trainable']:,}", f"{counts['head']:,}", init_s)

    accum = config.optim.grad_accum
    stream = task.train_batches(config.batch_size // accum, config.seed)
    steps_per_epoch = stream.steps_per_epoch // accum
    if steps_per_epoch == 0:
        raise ConfigError(f"config.batch_size={config.batch_size}: the {task.num_train} training "
                          "examples make no batch; lower it or raise task.train_limit")
    total = config.num_train_steps if config.num_train_steps > 0 else (
        config.num_epochs * steps_per_epoch)
    eval_every = config.eval_every_steps or steps_per_epoch

    apply_fn = method.apply_fn(model.module.apply)
    tx = make_optimizer(config, method.split()[0], method, total)
    mesh, state, frozen, state_sh, frozen_sh = place_on_mesh(config, model, method, tx)
    mngr = CheckpointManager(workdir / "checkpoints", keep=config.keep_checkpoints)
    restored = None
    if mngr.latest_step() is not None:
        try:
            state, restored = mngr.restore(target=state)
        except ValueError as e:        # a workdir whose config.json was removed or replaced
            mngr.close()
            raise ConfigError(
                f"checkpoint {mngr.latest_step()} in {mngr.directory} does not fit this config "
                f"({str(e).split('. ')[0][:300]}), and the workdir has no config.json to say "
                "which config wrote it: start a new --workdir, or rerun with that config."
                ) from None
        stream.load_state_dict(restored["data"])
    resume_step = restored["opt_step"] if restored else 0
    if parallel.is_main_process():     # the workdir's config, once its checkpoint fits
        parallel.atomic_write(workdir / "config.json",
                              config.to_json_best_effort(indent=2).encode())
    run = Run(
        config=config, workdir=workdir, model=model, task=task, method=method, stream=stream,
        total=total, accum=accum, eval_every=eval_every,
        ckpt_every=config.checkpoint_every_steps or eval_every, apply_fn=apply_fn, mesh=mesh,
        state=state, frozen=frozen,
        train_step=parallel.jit_train_step(make_train_step(task, apply_fn, tx, config.seed),
                                           mesh, state_sh, frozen_sh),
        predict=task.predict_fn(apply_fn, mesh, lx.combine(state_sh["trainable"], frozen_sh)),
        mngr=mngr, writer=Writer(workdir, parallel.is_main_process(), resume_step),
        counts=counts, init_seconds=init_s, started=t0)
    if restored:
        run.best, run.window = restored["best"], restored["window"]
        changed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in (changes or {}).items())
        echo(f"resumed from step {resume_step} of {total} (data epoch {stream.epoch}, batch "
             f"{stream.step})" + (f" with changes named in config.resume: {changed}"
                                  if changed else ""))
    return run


def _train_loop(run: Run, hooks: Sequence[Callable[[int, dict], None]]) -> None:
    from tqdm import tqdm

    config = run.config
    rows = parallel.process_batch_slice(config.batch_size // run.accum, run.mesh)
    opt_step = run.opt_step
    bar = tqdm(total=run.total, initial=opt_step, desc=f"{run.method.name} {run.task.name}",
               unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=not parallel.is_main_process())
    pending: list[tuple[int, dict]] = []      # (optimizer step, device metrics) since a check
    tokens, t_last = 0.0, time.time()
    batches = iter(run.stream)
    try:
        while opt_step < run.total:
            for _ in range(run.accum):
                batch = run.task.prepare(next(batches))
                batch = parallel.global_batch({k: v[rows] for k, v in batch.items()}, run.mesh)
                run.state, metrics = run.train_step(run.state, run.frozen, batch)
                pending.append((opt_step + 1, metrics))
            opt_step += 1
            bar.update(1)
            last = opt_step == run.total
            log_now = opt_step % config.log_every_steps == 0 or last
            eval_now = opt_step % run.eval_every == 0 or last
            save_now = opt_step % run.ckpt_every == 0 or last
            if log_now or eval_now or save_now:      # the only host syncs of the loop
                tokens += run.check_finite(pending)
                pending = []
            if log_now:
                now = time.time()
                loss = run.log_train(opt_step, tokens / max(now - t_last, 1e-9))
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / max(now - t_last, 1e-9):,.0f}")
                tokens, t_last = 0.0, now
            if eval_now:
                run.evaluate(opt_step)
            if save_now:
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

    The config is validated and compared with the workdir's (``experiments.validate``) before
    anything is loaded or written. Everything logged goes to workdir/log.txt. ``hooks`` are
    called as hook(step, metrics) after every optimizer step (tests use one to simulate a
    kill)."""
    validate(config)
    changes = resume_changes(workdir, config)
    workdir = modeling.workdir_path(workdir)
    with run_log(workdir, parallel.is_main_process()):
        run = setup(config, workdir, changes)
        try:
            _train_loop(run, hooks)
            return _finish(run)
        finally:
            run.mngr.close()


# ----------------------------------------------------------------------------- command line
def main(argv: Sequence[str]) -> None:
    del argv
    from absl import flags

    from loraxs_jax.experiments import cli

    cli.start(flags.FLAGS.config)
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


def cli_main() -> None:
    """``loraxs-train`` / ``python train.py``: --config=FILE[:args] --workdir=DIR."""
    from absl import flags

    from loraxs_jax.experiments import cli

    cli.define_config_flag()
    flags.DEFINE_string("workdir", None, "where the run writes everything; resumes if it exists")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main, errors=(ConfigError, NonFiniteLoss))


if __name__ == "__main__":
    cli_main()
