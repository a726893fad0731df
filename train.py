"""Train LoRA-XS (or a baseline) on a task from an ml-collections config.

    python train.py --config=configs/minilm_sst2.py --workdir=runs/demo
    python train.py --config=configs/glue.py:task=rte,rank=25 --config.optim.lr=2e-3 --workdir=...

``train_step`` is a pure jitted function of (state, frozen params, batch): it differentiates the
trainable half of ``lx.split`` only (R and the task head), so no gradient of a frozen weight is
computed and AdamW holds state for the trainable leaves alone. ``train_and_evaluate`` runs the
loop and leaves in the workdir: config.json, metrics.jsonl, TensorBoard events (tb/), PNG plots
(plots/), the adapter (adapter.safetensors: R alone; adapter_best.safetensors: the best
evaluation's), resumable checkpoints (checkpoints/) and summary.json. Killed runs resume from the
latest checkpoint and end with the same R as an uninterrupted run.
"""

from __future__ import annotations

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

import experiment
import loraxs_jax as lx

log = logging.getLogger("loraxs")


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------- steps
def make_train_step(task, apply_fn: Callable, tx: optax.GradientTransformation, seed: int):
    """The pure step (state, frozen, batch) -> (state, metrics); ``sharding.jit_train_step``
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
    from loraxs_jax import sharding

    mesh, method.params, shardings = experiment.place_params(config, model, method.params)
    trainable, frozen = method.split()
    t_sh = sharding.subtree_shardings(shardings, trainable)
    f_sh = sharding.subtree_shardings(shardings, frozen)

    def init(t):
        return {"trainable": t, "opt_state": tx.init(t), "step": jnp.zeros((), jnp.int32)}

    # Explicit: AdamW's mu and nu (and MultiSteps' accumulators) like their param, the rest
    # (counts, schedule state) replicated.
    abstract = jax.eval_shape(init, trainable)
    state_sh = {"trainable": t_sh, "step": sharding.replicated(mesh),
                "opt_state": sharding.opt_state_shardings(abstract["opt_state"], t_sh, mesh)}
    state = jax.jit(init, in_shardings=(t_sh,), out_shardings=state_sh)(trainable)
    log.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
    return mesh, state, frozen, state_sh, f_sh


# ----------------------------------------------------------------------------- logging
class Writer:
    """metrics.jsonl + TensorBoard, one call per record; only process 0 of a multi-process job
    writes (``enabled``), the others' calls do nothing."""

    def __init__(self, workdir: Path, enabled: bool = True):
        from tensorboardX import SummaryWriter

        self.enabled = enabled
        if enabled:
            self.jsonl = open(workdir / "metrics.jsonl", "a")
            self.tb = SummaryWriter(str(workdir / "tb"))

    def write(self, split: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        rec = {"split": split, "step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def close(self):
        if not self.enabled:
            return
        self.jsonl.close()
        self.tb.close()


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def plot_metrics(workdir: Path, main_metric: str) -> list[Path]:
    """plots/train_loss.png and plots/eval_<metric>.png from metrics.jsonl (last record wins for
    a step, so a resumed run's plot has no duplicates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(workdir)
    out = []
    (workdir / "plots").mkdir(exist_ok=True)
    for split, key, name in (("train", "loss", "train_loss"), ("eval", main_metric,
                                                              f"eval_{main_metric}")):
        pts = {r["step"]: r[key] for r in recs if r["split"] == split and key in r}
        if not pts:
            continue
        steps = sorted(pts)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, [pts[s] for s in steps], marker="o" if split == "eval" else None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.set_title(f"{split} {key}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = workdir / "plots" / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(path)
    return out


def summary_table(summary: dict[str, Any]) -> str:
    rows = [(k, f"{v:,}" if isinstance(v, int) else (f"{v:.4f}" if isinstance(v, float) else str(v)))
            for k, v in summary.items()]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)


# ----------------------------------------------------------------------------- loop
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       hooks: Sequence[Callable[[int, dict], None]] = ()) -> dict[str, Any]:
    """Train per ``config`` in ``workdir`` (resuming if it holds a checkpoint); return the summary.

    ``hooks`` are called as hook(step, metrics) after every optimizer step (tests use one to
    simulate a kill)."""
    from tqdm import tqdm

    from loraxs_jax import sharding
    from loraxs_jax.checkpointing import CheckpointManager

    workdir = experiment.workdir_path(workdir)
    main = sharding.is_main_process()     # multi-process: all compute, process 0 writes files
    if main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    t0 = time.time()
    model = experiment.build_model(config, experiment.num_labels_for(config))
    task = experiment.build_task(config, model)
    method = experiment.build_method(config, model.params)
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
    ckpt_every = config.checkpoint_every_steps or eval_every

    apply_fn = lx.wrap(model.module.apply)
    tx = experiment.make_optimizer(config, method.split()[0], method.lora_cfg, total)
    mesh, state, frozen, state_sh, frozen_sh = place_on_mesh(config, model, method, tx)
    mngr = CheckpointManager(workdir / "checkpoints", keep=config.keep_checkpoints)
    best = {"metric": -math.inf, "step": -1}
    if mngr.latest_step() is not None:
        state, meta = mngr.restore(target=state)
        stream.load_state_dict(meta["data"])
        best = meta["best"]
        log.info("resumed from step %d (data epoch %d, batch %d)", meta["opt_step"],
                 stream.epoch, stream.step)
    train_step = sharding.jit_train_step(make_train_step(task, apply_fn, tx, config.seed), mesh,
                                         state_sh, frozen_sh)
    rows = sharding.process_batch_slice(config.batch_size // accum, mesh)
    predict = task.predict_fn(apply_fn, mesh, lx.combine(state_sh["trainable"], frozen_sh))
    writer = Writer(workdir, enabled=main)

    last_eval: dict[str, Any] = {}

    def evaluate(opt_step: int) -> dict[str, float]:
        params = lx.combine(state["trainable"], frozen)
        scores = task.evaluate(apply_fn, params, config.eval_batch_size, predict)
        last_eval.update(step=opt_step, scores=scores)
        writer.write("eval", opt_step, scores)
        metric = scores[task.main_metric]
        if metric > best["metric"]:
            best.update(metric=float(metric), step=int(opt_step))
            save_trained(workdir / "adapter_best", method, state["trainable"], frozen)
        log.info("step %d: %s (best %s %.4f at step %d)", opt_step,
                 " ".join(f"{k}={v:.4f}" for k, v in scores.items()), task.main_metric,
                 best["metric"], best["step"])
        return scores

    opt_step = int(state["step"]) // accum
    bar = tqdm(total=total, initial=opt_step, desc=f"{method.name} {task.name}", unit="step",
               dynamic_ncols=True, mininterval=1.0, disable=not main)
    window: list[dict] = []
    tokens, t_last = 0.0, time.time()
    batches = iter(stream)
    try:
        while opt_step < total:
            for _ in range(accum):
                batch = task.prepare(next(batches))
                batch = sharding.global_batch({k: v[rows] for k, v in batch.items()}, mesh)
                state, metrics = train_step(state, frozen, batch)
                window.append(metrics)
            opt_step += 1
            bar.update(1)
            if opt_step % config.log_every_steps == 0 or opt_step == total:
                host = jax.device_get(window)
                window = []
                loss = float(np.mean([m["loss"] for m in host]))
                if not math.isfinite(loss):
                    raise NonFiniteLoss(
                        f"training loss became {loss} by optimizer step {opt_step}; stopping. "
                        f"The last good checkpoint (step {mngr.latest_step()}) is in "
                        f"{workdir / 'checkpoints'}: lower optim.lr or enable optim.grad_clip")
                tokens = float(sum(m["tokens"] for m in host))
                now = time.time()
                rate = tokens / max(now - t_last, 1e-9)
                t_last = now
                writer.write("train", opt_step, {
                    "loss": loss, "grad_norm": float(np.mean([m["grad_norm"] for m in host])),
                    "tokens_per_s": rate})
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
            if opt_step % eval_every == 0 or opt_step == total:
                evaluate(opt_step)
            if opt_step % ckpt_every == 0 or opt_step == total:
                mngr.save(int(state["step"]), state, {"data": stream.state_dict(), "best": best,
                                                      "opt_step": opt_step})
            for hook in hooks:
                hook(opt_step, metrics)
    finally:
        bar.close()
        writer.close()

    final = last_eval["scores"] if last_eval.get("step") == opt_step else task.evaluate(
        apply_fn, lx.combine(state["trainable"], frozen), config.eval_batch_size, predict)
    adapter = save_trained(workdir / "adapter", method, state["trainable"], frozen)
    if main:
        plot_metrics(workdir, task.main_metric)
    summary = {
        "method": method.name, "task": task.name,
        "rank": config.loraxs.rank if method.name in ("loraxs", "lora") else "-",
        "init": config.loraxs.init if method.name == "loraxs" else "-",
        "trainable_params": counts["trainable"], "head_params": counts["head"],
        "adapter_file_bytes": adapter.stat().st_size if adapter else 0,
        f"final_{task.main_metric}": float(final[task.main_metric]),
        f"best_{task.main_metric}": float(max(best["metric"], final[task.main_metric])),
        "best_step": best["step"], "steps": opt_step,
        "init_seconds": round(init_s, 2), "total_seconds": round(time.time() - t0, 1),
    }
    if main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        print("\n" + summary_table(summary), flush=True)
    return summary


def save_trained(path: Path, method: experiment.Method, trainable: dict, frozen: dict) -> Path | None:
    """LoRA-XS: the adapter file (R + head). Baselines: their trained leaves as safetensors."""
    params = lx.combine(trainable, frozen)
    if method.name == "loraxs":
        return lx.save_adapter(path, params, method.lora_cfg)
    if method.name == "full":
        return None
    from loraxs_jax.adapters import atomic_write, safetensors_bytes
    from loraxs_jax.sharding import is_main_process, sync, to_host
    from loraxs_jax.transform import flatten, path_str

    tensors = {path_str(p): to_host(v) for p, v in flatten(trainable).items()}
    out = path.with_name(path.name + ".safetensors")
    if is_main_process():
        atomic_write(out, safetensors_bytes(tensors, {"method": method.name}))
    sync(f"save {out}")
    return out


def main(argv):
    del argv
    from absl import flags

    from loraxs_jax.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    FLAGS = flags.FLAGS
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except NonFiniteLoss as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py[:args])")
    flags.DEFINE_string("workdir", None, "where the run writes everything; resumes if it exists")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
