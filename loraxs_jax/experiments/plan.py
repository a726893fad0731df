"""Memory plan of a LoRA-XS run per device, from shapes alone (no weights are made).

    loraxs-plan --config=configs/mistral_math.py --config.mesh.fsdp=8 --devices=8
    loraxs-plan --model=mistral-7b --rank=64 --fsdp=8 --devices=8   # no config file

For each device it reports the base params (sharded by the rules), the frozen bases A and B
(sharded like their kernels), R, the optimizer state (AdamW mu and nu for the trainable leaves
only: R and the chosen extras) and the activations the backward pass keeps, with and without
rematerialisation. Everything comes from ``jax.eval_shape``; activations are the residuals JAX
saves between the forward and backward pass of the train step (what ``print_saved_residuals``
lists), counted without the params they close over. Where the mesh fits on the devices present
(``--devices`` virtual CPU devices), the sharded train step is also compiled and XLA's
``memory_analysis()`` (arguments, outputs, temporaries per device) is reported.

The config is an experiment file (``configs/*.py``, fields of ``configs/base.py``); see
:func:`plan_from_config` for the fields read. Architectures come from ``models.presets`` for the
paper's hub ids, or from a local folder's config.json: no weights, no network.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

import loraxs_jax as lx
from loraxs_jax import parallel as sh
from loraxs_jax.bases import find_targets
from loraxs_jax.config import LoraXSConfig
from loraxs_jax.experiments import modeling
from loraxs_jax.experiments.cli import importable_configs
from loraxs_jax.experiments.lm_tasks import causal_lm_loss
from loraxs_jax.experiments.methods import lora_config_from
from loraxs_jax.experiments.tasks import classification_loss
from loraxs_jax.experiments.validate import ConfigError, validate
from loraxs_jax.models import decoder, encoder, presets
from loraxs_jax.tree import adapter_key, flatten, leaf_role, unflatten

ModelConfig = decoder.DecoderConfig | encoder.EncoderConfig


def _nbytes(x) -> int:
    return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def _device_bytes(tree, shardings) -> int:
    """Bytes one device holds of ``tree`` laid out by ``shardings`` (the largest shard)."""
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    return sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x, s in zip(leaves, shards, strict=True))


def _model_fns(model_config: ModelConfig):
    """(param shapes, logical axes, loss(params, batch), batch shapes for (b, t), with_remat):
    the loss is the task's own (causal LM over every token, or classification), on the
    LoRA-XS-wrapped model."""
    fam = modeling.family(model_config)
    apply_fn = lx.wrap(fam.module(model_config).apply)
    if fam.kind == "decoder":
        def loss(params, batch):
            logits = apply_fn({"params": params}, batch["input_ids"],
                              attention_mask=batch["attention_mask"])
            return causal_lm_loss(logits, batch)

        def batch(b, t):
            ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
            return {"input_ids": ids, "attention_mask": ids, "labels": ids, "loss_mask": ids}

        def with_remat(c, on):
            return dataclasses.replace(c, remat="full" if on else "none")
    else:
        def loss(params, batch):
            logits = apply_fn({"params": params}, batch["input_ids"], batch["attention_mask"])
            return classification_loss(logits, batch, model_config.num_labels)

        def batch(b, t):
            ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
            return {"input_ids": ids, "attention_mask": ids,
                    "labels": jax.ShapeDtypeStruct((b,), jnp.int32)}

        def with_remat(c, on):
            return dataclasses.replace(c, remat=on)
    return (fam.param_shapes(model_config), fam.logical_axes(model_config), loss, batch,
            with_remat)


def adapted_shapes(shapes: Mapping, lora_cfg: LoraXSConfig) -> dict:
    """``jax.eval_shape(lambda p: apply(p, lora_cfg), shapes)`` without tracing the SVDs: the
    A (*stack, *in, r), B (*stack, r, *out), R (*stack, r, r), scale (*stack,) leaves of each
    target as ``jax.ShapeDtypeStruct``s (tested equal to the traced version)."""
    flat = dict(flatten(shapes))
    for t in find_targets(shapes, lora_cfg):
        kernel = flat[t.path]
        bases = jnp.dtype(lora_cfg.bases_dtype) if lora_cfg.bases_dtype else kernel.dtype
        *parent, leaf = t.path
        for role, shape, dtype in (
                ("A", t.stack + t.in_dims + (t.rank,), bases),
                ("B", t.stack + (t.rank,) + t.out_dims, bases),
                ("R", t.stack + (t.rank, t.rank), jnp.dtype(lora_cfg.r_dtype)),
                ("scale", t.stack, jnp.float32)):
            flat[(*parent, adapter_key(str(leaf), role))] = jax.ShapeDtypeStruct(shape, dtype)
    return unflatten(flat, {})


def _activation_bytes(loss, trainable, frozen, batch) -> int:
    """Bytes of the residuals the backward pass of d loss / d trainable keeps, excluding the
    arguments themselves (params, batch): the activations."""
    from jax._src.ad_checkpoint import saved_residuals  # print_saved_residuals' data

    def f(t, fz, b):   # frozen and batch are arguments (not residuals) but not differentiated
        return loss(lx.combine(t, jax.lax.stop_gradient(fz)), b)

    res = saved_residuals(f, trainable, frozen, batch)
    # the frozen weights show up as arguments or as the stop_gradient of one: not activations
    return sum(_nbytes(aval) for aval, why in res if hasattr(aval, "shape") and not (
        why.startswith("from the argument") or why.startswith("output of stop_gradient")))


def _abstract_mesh(sizes: Mapping[str, int]) -> jax.sharding.AbstractMesh:
    return jax.sharding.AbstractMesh(tuple(sizes[a] for a in sh.MESH_AXES), sh.MESH_AXES,
                                     axis_types=(jax.sharding.AxisType.Auto,) * 3)


def plan(model_config: ModelConfig, lora_cfg: LoraXSConfig, mesh_cfg: Any, batch_size: int,
         seq_len: int, remat: bool | None = None, *, devices: int | None = None,
         compile: bool = True, activations: bool = True, rules=sh.DEFAULT_RULES,
         learning_rate: float = 1e-4, print_table: bool = True) -> dict:
    """Per-device memory of training ``lora_cfg`` on ``model_config`` over ``mesh_cfg``.

    Args:
      model_config: the architecture (dtype/param_dtype as they will run).
      lora_cfg: targets, rank, ``stacked_axes`` (1 with ``scan_layers``), ``trainable`` extras.
      mesh_cfg: data/fsdp/tensor sizes; -1 fills ``devices``.
      batch_size, seq_len: global examples per step and tokens per example.
      remat: the setting the run uses (marked in the table); both are always computed.
      devices: devices the mesh spans (default: ``jax.device_count()``); need not exist.
      compile: also compile the sharded train step (with ``remat``'s setting, or both when
        it is None) and report ``memory_analysis()`` when the mesh's devices exist here.
      activations: trace the backward pass for the activation sizes (a 7B model takes ~10 s
        per trace); False reports 0.
    Returns:
      {'mesh': sizes, 'counts': parameter counts, 'total_bytes': {...}, 'per_device_bytes':
      {'base_params', 'bases', 'R', 'opt_state', 'activations_no_remat', 'activations_remat'},
      'compiled': {'no_remat'|'remat': memory_analysis fields} or {}}.
    """
    n_dev = jax.device_count() if devices is None else int(devices)
    sizes = sh.mesh_shape(mesh_cfg, n_dev)
    real = compile and n_dev == jax.device_count()
    mesh = sh.make_mesh(mesh_cfg) if real else _abstract_mesh(sizes)
    _, _, _, batch_fn, with_remat = _model_fns(model_config)
    adapted, all_sh, trainable, frozen, state, state_sh, _ = _layout(
        model_config, lora_cfg, mesh, rules, learning_rate)
    opt, opt_sh = state["opt"], state_sh["opt"]

    def part(keep):
        return {p: v for p, v in flatten(adapted).items() if keep(leaf_role(p[-1]))}

    base = part(lambda r: r is None)
    bases = part(lambda r: r is not None and r[1] in ("A", "B"))
    r_only = part(lambda r: r is not None and r[1] == "R")
    flat_sh = flatten(all_sh)

    def dev(tree_flat):
        return _device_bytes(list(tree_flat.values()), [flat_sh[p] for p in tree_flat])

    batch = batch_fn(batch_size, seq_len)
    sh.process_batch_slice(batch_size, mesh)   # raises if data*fsdp does not divide the batch
    ways = sizes["data"] * sizes["fsdp"]
    acts = {False: 0, True: 0}
    for on in (False, True) if activations else ():
        _, _, loss_on, _, _ = _model_fns(with_remat(model_config, on))
        acts[on] = _activation_bytes(loss_on, trainable, frozen, batch)

    counts = lx.count(adapted, lora_cfg)
    opt_count = sum(math.prod(x.shape) for x in jax.tree.leaves(opt))
    result = {
        "mesh": sizes, "devices": n_dev, "batch_size": batch_size, "seq_len": seq_len,
        "remat": remat,
        "counts": {"base_params": counts["base"] + counts["extra"], "bases": counts["bases"],
                   "R": counts["R"], "extra_trainable": counts["extra"],
                   "adapted_matrices": counts["adapted_matrices"], "opt_state": opt_count},
        "total_bytes": {"base_params": sum(_nbytes(x) for x in base.values()),
                        "bases": sum(_nbytes(x) for x in bases.values()),
                        "R": sum(_nbytes(x) for x in r_only.values()),
                        "opt_state": sum(_nbytes(x) for x in jax.tree.leaves(opt)),
                        "activations_no_remat": acts[False], "activations_remat": acts[True]},
        # activations: split over the batch axes (data*fsdp); tensor-sharded ones (heads, mlp)
        # are smaller still by up to the tensor size, so these are upper bounds.
        "per_device_bytes": {"base_params": dev(base), "bases": dev(bases), "R": dev(r_only),
                             "opt_state": _device_bytes(opt, opt_sh),
                             "activations_no_remat": acts[False] // ways,
                             "activations_remat": acts[True] // ways},
        "compiled": {},
    }
    if real:   # the run's setting only (each compile of a 7B step takes minutes on CPU)
        result["compiled"] = {
            ("remat" if on else "no_remat"): _compiled_memory(
                with_remat(model_config, on), lora_cfg, mesh, rules, learning_rate, batch)
            for on in ((False, True) if remat is None else (bool(remat),))}
    if print_table:
        print(format_table(result))
    return result


def _layout(model_config, lora_cfg, mesh, rules, learning_rate):
    """Abstract adapted params, their shardings, the split, and the train state {params: the
    trainable half, opt: AdamW's state} with its shardings; and the optimizer."""
    shapes, axes, _, _, _ = _model_fns(model_config)
    base_sh = sh.param_shardings(shapes, axes, mesh, rules)
    adapted = adapted_shapes(shapes, lora_cfg)
    all_sh = sh.adapted_shardings(adapted, base_sh)
    trainable, frozen = lx.split(adapted, lora_cfg)
    tx = optax.adamw(learning_rate)
    t_sh = sh.subtree_shardings(all_sh, trainable)
    state = {"params": trainable, "opt": jax.eval_shape(tx.init, trainable)}
    state_sh = {"params": t_sh, "opt": sh.opt_state_shardings(state["opt"], t_sh, mesh)}
    return adapted, all_sh, trainable, frozen, state, state_sh, tx


def _compiled_memory(model_config, lora_cfg, mesh, rules, learning_rate, batch) -> dict:
    """XLA's per-device memory of the compiled, sharded train step (abstract inputs)."""
    _, _, loss, _, _ = _model_fns(model_config)
    _, all_sh, _, frozen, state, state_sh, tx = _layout(model_config, lora_cfg, mesh, rules,
                                                        learning_rate)
    f_sh = sh.subtree_shardings(all_sh, frozen)

    def step(state, frozen, batch):
        value, grads = jax.value_and_grad(lambda t: loss(lx.combine(t, frozen), batch))(
            state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, value

    def abstract(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            tree, shardings)

    jitted = sh.jit_train_step(step, mesh, state_sh, f_sh, rules)
    b_sh = sh.batch_sharding(mesh)
    m = jitted.lower(abstract(state, state_sh), abstract(frozen, f_sh),
                     jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=b_sh),
                                  batch)).compile().memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    return {f: int(getattr(m, f)) for f in fields if m is not None and hasattr(m, f)}


def _fmt(n: float) -> str:
    for unit, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= s:
            return f"{n / s:8.2f} {unit}"
    return f"{n:8.0f} B  "


def format_table(r: dict) -> str:
    """The plan as a text table (per device and in total)."""
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [f"mesh {mesh} ({r['devices']} devices), batch {r['batch_size']} x "
             f"{r['seq_len']} tokens",
             f"{'':24}{'count':>16}{'total':>14}{'per device':>14}"]
    c, tot, dev = r["counts"], r["total_bytes"], r["per_device_bytes"]
    rows = [("base params", c["base_params"], "base_params"), ("bases A, B", c["bases"], "bases"),
            ("R (trainable)", c["R"], "R"), ("AdamW mu, nu", c["opt_state"], "opt_state"),
            ("activations, no remat", None, "activations_no_remat"),
            ("activations, remat", None, "activations_remat")]
    for name, n, key in rows:
        mark = " *" if (key == "activations_remat" and r["remat"]) or (
            key == "activations_no_remat" and r["remat"] is False) else ""
        lines.append(f"{name + mark:24}{'' if n is None else f'{n:,}':>16}{_fmt(tot[key]):>14}"
                     f"{_fmt(dev[key]):>14}")
    static = dev["base_params"] + dev["bases"] + dev["R"] + dev["opt_state"]
    for label, key in (("no remat", "activations_no_remat"), ("remat", "activations_remat")):
        lines.append(f"{'sum, ' + label:24}{'':16}{'':14}{_fmt(static + dev[key]):>14}")
    for label, m in r["compiled"].items():
        lines.append(f"compiled ({label}): " + ", ".join(
            f"{k.replace('_in_bytes', '')} {_fmt(v).strip()}" for k, v in m.items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def model_config(name_or_path: str, kind: str = "decoder", **options: Any) -> ModelConfig:
    """The architecture of a preset ("mistral-7b", "roberta-large"), a hub id of the paper's
    models (``presets.HUB_IDS``), an "asset:NAME" or a local folder (its config.json; no weights
    are read). ``options`` set DecoderConfig/EncoderConfig fields (dtype, scan_layers, ...)."""
    name = presets.HUB_IDS.get(name_or_path, name_or_path)
    if name in presets.PAPER_CONFIGS:
        return decoder.DecoderConfig.from_hf(presets.PAPER_CONFIGS[name](), **options)
    if name == "roberta-large":
        return encoder.roberta_large_config(**options)
    path = name_or_path
    if path.startswith("asset:"):
        from loraxs_jax.experiments.assets import asset_path
        path = str(asset_path(path.split(":", 1)[1]))
    if not (os.path.isdir(path) or path.endswith(".json")):
        raise ValueError(f"plan cannot get the architecture of {name_or_path!r} offline: give a "
                         f"preset ({sorted(presets.PAPER_CONFIGS) + ['roberta-large']}), one "
                         f"of {sorted(presets.HUB_IDS)}, asset:NAME or a local folder with "
                         "config.json")
    from transformers import AutoConfig
    hf = AutoConfig.from_pretrained(path)
    if kind == "encoder":
        return encoder.EncoderConfig.from_hf(hf, **options)
    return decoder.DecoderConfig.from_hf(hf, **options)


def _get(section: Any, key: str, default: Any = None) -> Any:
    if section is None:
        return default
    if isinstance(section, Mapping) or hasattr(section, "get"):
        return section.get(key, default)
    return getattr(section, key, default)


def _model_from(config: Any) -> ModelConfig:
    m = _get(config, "model")
    if isinstance(m, (decoder.DecoderConfig, encoder.EncoderConfig)):
        return m
    if isinstance(m, str):
        return model_config(m, dtype="bfloat16", param_dtype="bfloat16")
    kind = _get(m, "kind", "decoder")
    if kind not in ("decoder", "encoder"):
        raise ValueError(f"config.model.kind must be 'decoder' or 'encoder', got {kind!r}")
    options = {k: _get(m, k) for k in ("dtype", "param_dtype", "scan_layers")
               if _get(m, k) is not None}
    return model_config(_get(m, "path"), kind, **options)


def _lora_from(config: Any, model: ModelConfig) -> LoraXSConfig:
    return lora_config_from(_get(config, "loraxs"), model.scan_layers)


def plan_from_config(config: Any, devices: int | None = None, compile: bool = True) -> dict:
    """``plan`` for an experiment config (``configs/base.py`` fields):

    ``model``: ``kind`` ("decoder"/"encoder"), ``path`` (a hub id of ``presets.HUB_IDS``, a preset
    name, "asset:NAME" or a local HF folder), ``dtype``, ``param_dtype``, ``scan_layers``,
    ``remat`` (marked in the table); or a DecoderConfig/EncoderConfig or preset name.
    ``loraxs``: LoraXSConfig fields (``bases_dtype`` "" = the kernel's; ``stacked_axes`` follows
    ``scan_layers``). ``mesh``: data, fsdp, tensor. ``batch_size`` / ``optim.grad_accum``: the
    micro-batch one step holds activations for. ``task.max_length`` (or ``max_length``):
    tokens per example.
    """
    model = _model_from(config)
    accum = int(_get(_get(config, "optim"), "grad_accum", 1) or 1)
    batch = int(_get(config, "batch_size", 8)) // accum
    seq = _get(config, "max_length") or _get(_get(config, "task"), "max_length", 512)
    remat = _get(_get(config, "model"), "remat", None)
    remat = None if remat is None else remat not in ("none", False)
    return plan(model, _lora_from(config, model), _get(config, "mesh", {}), batch, int(seq),
                remat, devices=devices, compile=compile)


def main(argv: list[str] | None = None) -> dict:
    from absl import flags
    from ml_collections import config_dict, config_flags

    fl = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "experiment config file", flag_values=fl)
    flags.DEFINE_integer("devices", None, "devices the mesh spans (virtual CPU devices are "
                         "created when the platform is CPU)", flag_values=fl)
    flags.DEFINE_string("model", "mistral-7b", "preset or hub id without --config "
                        "(see models.presets)", flag_values=fl)
    flags.DEFINE_integer("rank", 64, "LoRA-XS rank without --config", flag_values=fl)
    flags.DEFINE_integer("batch_size", 8, "global batch without --config", flag_values=fl)
    flags.DEFINE_integer("max_length", 512, "tokens per example without --config",
                         flag_values=fl)
    for axis in sh.MESH_AXES:
        flags.DEFINE_integer(axis, -1 if axis == "fsdp" else 1, f"mesh {axis} without --config",
                             flag_values=fl)
    flags.DEFINE_boolean("compile", True, "also compile and report memory_analysis()",
                         flag_values=fl)
    argv = list(argv if argv is not None else sys.argv)
    importable_configs(argv)
    fl(argv)
    if fl.config is not None:
        validate(fl.config, partial=True)      # plan reads only some fields
        return plan_from_config(fl.config, fl.devices, fl.compile)
    model = _model_from({"model": fl.model})
    targets = decoder.PAPER_TARGETS if isinstance(model, decoder.DecoderConfig) else (
        encoder.PAPER_TARGETS)
    cfg = config_dict.ConfigDict({
        "model": fl.model, "loraxs": {"rank": fl.rank, "alpha": float(fl.rank),
                                      "targets": list(targets)},
        "mesh": {a: getattr(fl, a) for a in sh.MESH_AXES},
        "batch_size": fl.batch_size, "max_length": fl.max_length})
    return plan_from_config(cfg, fl.devices, fl.compile)


def _set_virtual_devices(argv: list[str]) -> None:
    """``--devices=N`` on CPU: N virtual devices, set before JAX starts its backend."""
    for a in argv:
        if a.startswith("--devices="):
            n = a.split("=", 1)[1]
            flags_ = os.environ.get("XLA_FLAGS", "")
            if "xla_force_host_platform_device_count" not in flags_:
                os.environ["XLA_FLAGS"] = (flags_ + f" --xla_force_host_platform_device_count={n}"
                                           ).strip()


def cli_main() -> None:
    """``loraxs-plan``: see the module docstring."""
    _set_virtual_devices(sys.argv)
    try:
        main()
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    cli_main()
