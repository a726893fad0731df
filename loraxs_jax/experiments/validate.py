"""The one place that decides whether an experiment config can run, and whether a workdir may
continue with it. ``train``, ``evaluate``, ``sweep`` and ``plan`` call :func:`validate` before
anything is loaded or written, and ``train`` calls :func:`resume_changes` before it touches a
workdir.

:func:`validate` checks every field of ``defaults.base()`` (type, range, choices, finite
numbers), refuses keys that are not fields (a misspelt ``c.optim.learning_rate = ...`` in a
config file would otherwise be ignored), builds the ``loraxs`` section's ``LoraXSConfig`` (which
checks its own fields) and checks what spans fields (``grad_accum`` divides ``batch_size``, the
task fits the model kind, one mesh axis fills). Each error is a :class:`ConfigError` naming the
field, its value and what is allowed.

A workdir belongs to one config. Its ``config.json`` is compared with the new config field by
field: fields that only say how a run is watched or placed (:data:`FREE`) may change freely;
fields that the checkpoint or the data stream depend on (:data:`FIXED`: the model, the method,
every ``loraxs`` field, the data) never change in a workdir; any other change (a learning rate,
the number of steps, evaluation settings) is made only when ``config.resume`` names it, e.g.
``--config.resume=optim.lr`` after a NaN stop.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_collections

from loraxs_jax.config import LoraXSConfig
from loraxs_jax.experiments import runtime
from loraxs_jax.experiments.assets import ASSETS
from loraxs_jax.experiments.data.commonsense import COMMONSENSE_TASKS
from loraxs_jax.experiments.data.glue import GLUE_TASKS
from loraxs_jax.experiments.lm_tasks import MATH_EVAL_SETS
from loraxs_jax.experiments.methods import METHODS, lora_config_from
from loraxs_jax.experiments.modeling import FAMILIES
from loraxs_jax.experiments.tasks import TASKS
from loraxs_jax.models.decoder import REMAT_POLICIES
from loraxs_jax.models.encoder import HEADS

# A check returns None when the value is fine, else what is allowed ("an int >= 1").
Check = Callable[[Any], "str | None"]
DTYPES = ("float32", "bfloat16", "float16")
SOURCES = ("auto", "assets", "hub", "gsm_symbolic")


class ConfigError(ValueError):
    """A config field (or workdir) we cannot honour: names the field, its value and the fix."""


# ----------------------------------------------------------------------------- field checks
def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def integer(minimum: int, *also: int) -> Check:
    """An int >= ``minimum`` (or one of ``also``, e.g. -1 for "fill")."""
    extra = f" or {' or '.join(map(str, also))}" if also else ""
    return lambda v: None if _is_int(v) and (v >= minimum or v in also) else (
        f"an int >= {minimum}{extra}")


def real(low: float, high: float = math.inf, *, low_open: bool = False,
         high_open: bool = True) -> Check:
    """A finite number in the interval; bools and strings refused."""
    def check(v):
        ok = _is_real(v) and (v > low if low_open else v >= low) and (
            v < high if high_open else v <= high)
        if ok:
            return None
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        return f"a finite number in {lo}{low}, {high}{hi}"
    return check


def choice(options: Any) -> Check:
    options = tuple(options)
    return lambda v: None if isinstance(v, str) and v in options else (
        f"one of {', '.join(options)}")


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "True or False"


def strings(options: Any = None, *, empty: bool = True) -> Check:
    """A tuple or list of strings (from ``options`` when given, no repeats)."""
    allowed = f"a list of names from {', '.join(options)}" if options else "a list of strings"

    def check(v):
        ok = (isinstance(v, (tuple, list)) and (empty or v) and len(set(v)) == len(v)
              and all(isinstance(x, str) and (options is None or x in options) for x in v))
        return None if ok else allowed + ("" if empty else ", not empty")
    return check


def dropout(v: Any) -> str | None:
    ok = _is_real(v) and (v == -1 or 0 <= v < 1)
    return None if ok else "-1 (keep the checkpoint's) or a finite number in [0, 1)"


def model_path(v: Any) -> str | None:
    if not isinstance(v, str) or not v:
        return "an HF folder, a hub id, a .gguf file or asset:NAME (it is empty)"
    if v.startswith("asset:"):
        return None if v[6:] in ASSETS else f"asset:NAME with NAME one of {', '.join(ASSETS)}"
    looks_local = v.startswith(("/", "./", "../", "~")) or v.endswith(".gguf")
    if looks_local and not Path(v).expanduser().exists():
        return "an existing folder or .gguf file (no such path)"
    return None


def source(v: Any) -> str | None:
    if isinstance(v, str) and (v in SOURCES or Path(v).expanduser().exists()):
        return None
    return f"one of {', '.join(SOURCES)} or an existing path"


def resume_list(v: Any) -> str | None:
    if not isinstance(v, str):
        return "a comma-separated list of field names (a string)"
    for name in _resume_names(v):
        if name not in FIELDS:
            return f"names of config fields; {_unknown(name)}"
        if name in FREE:
            return f"fields that need it; {name} may change on any resume without it"
        if _is_fixed(name):
            return (f"fields a resume can change; {name} cannot change in a workdir (the "
                    "checkpoint or the data depend on it): start a new --workdir")
    return None


def _unknown(name: str) -> str:
    """``name`` is no field: the closest field of its section, and that section's fields."""
    section = name.rpartition(".")[0]
    siblings = [f for f in FIELDS if f.rpartition(".")[0] == section]
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.7)
    return (f"{name!r} is no field" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; the fields{' of ' + section if section else ''} are "
            + ", ".join(f.rpartition(".")[2] for f in siblings))


def _resume_names(v: str) -> list[str]:
    return [x.strip() for x in v.split(",") if x.strip()]


def _fields() -> dict[str, Check | None]:
    fields = {
        "method": choice(METHODS), "seed": integer(0), "resume": resume_list,
        "model.kind": choice(FAMILIES), "model.path": model_path, "model.head": choice(HEADS),
        "model.fresh_head": boolean, "model.dtype": choice(DTYPES),
        "model.param_dtype": choice(DTYPES), "model.scan_layers": boolean,
        "model.remat": choice(REMAT_POLICIES),
        "model.dropout": dropout,
        "task.name": choice(TASKS), "task.glue": choice(GLUE_TASKS), "task.train_source": source,
        "task.eval_source": source, "task.max_length": integer(2),
        "task.train_limit": integer(0), "task.tasks": strings(COMMONSENSE_TASKS, empty=False),
        "task.eval_sets": strings(MATH_EVAL_SETS, empty=False), "task.eval_limit": integer(0),
        "task.bucket": boolean,
        "optim.lr": real(0, low_open=True), "optim.head_lr": real(0, low_open=True),
        "optim.weight_decay": real(0), "optim.b1": real(0, 1), "optim.b2": real(0, 1),
        "optim.eps": real(0, low_open=True), "optim.schedule": choice(("linear", "cosine")),
        "optim.warmup_ratio": real(0, 1, high_open=False), "optim.warmup_steps": integer(0, -1),
        "optim.grad_clip": real(0), "optim.grad_accum": integer(1),
        "batch_size": integer(1), "eval_batch_size": integer(1), "num_epochs": integer(1),
        "num_train_steps": integer(1, -1), "eval_every_steps": integer(0),
        "log_every_steps": integer(1), "checkpoint_every_steps": integer(0),
        "keep_checkpoints": integer(1),
        "generation.max_new_tokens": integer(1), "generation.batch_size": integer(1),
        "mesh.data": integer(1, -1), "mesh.fsdp": integer(1, -1), "mesh.tensor": integer(1, -1),
        "runtime.host_devices": integer(0), "runtime.xla_flags": runtime.check_xla_flags,
        "runtime.compile_cache": runtime.check_cache,
    }
    # the loraxs section holds LoraXSConfig's fields; LoraXSConfig itself checks them
    fields.update({f"loraxs.{f.name}": None for f in dataclasses.fields(LoraXSConfig)})
    return fields


FIELDS: dict[str, Check | None] = _fields()
SECTIONS = sorted({name.split(".")[0] for name in FIELDS if "." in name})
# Fields that only say how a run is watched or placed: they may change on any resume.
FREE = frozenset({"resume", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                  "eval_batch_size", "generation.batch_size", "mesh.data", "mesh.fsdp",
                  "mesh.tensor", "runtime.host_devices", "runtime.xla_flags",
                  "runtime.compile_cache"})
# Fields the checkpoint (its tree, shapes, dtypes) or the data stream depend on: never changed
# in a workdir. Every loraxs field is one of them.
FIXED = frozenset({"method", "seed", "model.kind", "model.path", "model.head",
                   "model.scan_layers", "task.name", "task.glue", "task.train_source",
                   "task.max_length", "task.train_limit", "task.tasks", "task.bucket",
                   "batch_size", "optim.grad_accum"})


def _is_fixed(name: str) -> bool:
    return name in FIXED or name.startswith("loraxs.")


# ----------------------------------------------------------------------------- validate
def flat_fields(config: Mapping | ml_collections.ConfigDict) -> dict[str, Any]:
    """{dotted field name: value} of a config (a ConfigDict or its JSON), leaves as in
    :data:`FIELDS` (a per-kernel ``loraxs.rank`` mapping stays one value); a key that is no
    field is kept under its own dotted name, for :func:`validate` to refuse."""
    d = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    out: dict[str, Any] = {}
    for key, value in d.items():
        if key in SECTIONS and isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in dict(value).items()})
        else:
            out[key] = value
    return out


def validate(config: ml_collections.ConfigDict, *, partial: bool = False
             ) -> LoraXSConfig | None:
    """Refuse a config that cannot run, naming the field; return its ``LoraXSConfig``.

    ``partial``: the config holds only the fields a program reads (``loraxs-plan`` reads a
    handful); those are checked, and the checks across fields whose fields are all there.

    Raises:
      ConfigError: an unknown key, a missing field, a value of the wrong type, out of range,
        not finite or not one of the choices, or fields that disagree with each other.
    """
    flat = flat_fields(config)
    for name in flat:
        if name not in FIELDS:
            raise ConfigError(f"config.{name}: unknown field: {_unknown(name)} (every field is "
                              "documented in loraxs_jax/experiments/defaults.py)")
    missing = [n for n, check in FIELDS.items() if check is not None and n not in flat]
    if missing and not partial:
        raise ConfigError(f"config lacks the fields {missing}: start it from "
                          "experiments.defaults.base()")
    for name, value in flat.items():
        check = FIELDS.get(name)
        allowed = check(value) if check is not None else None
        if allowed:
            raise ConfigError(f"config.{name}={value!r}: expected {allowed}")
    lora_cfg = None
    if "loraxs" in config or not partial:
        try:
            lora_cfg = lora_config_from(config.loraxs, flat.get("model.scan_layers", False))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config.loraxs: {e}") from None

    def given(*names):
        return all(n in flat for n in names)

    if given("batch_size", "optim.grad_accum") and flat["batch_size"] % flat["optim.grad_accum"]:
        raise ConfigError(f"config.batch_size={flat['batch_size']} is not divisible by "
                          f"config.optim.grad_accum={flat['optim.grad_accum']}")
    if given("task.name", "model.kind") and (
            flat["model.kind"] != TASKS[flat["task.name"]].model_kind):
        raise ConfigError(f"config.task.name={flat['task.name']!r} needs config.model.kind="
                          f"{TASKS[flat['task.name']].model_kind!r}, got {flat['model.kind']!r}")
    if flat.get("model.kind") == "encoder" and flat.get("model.remat") == "dots_saveable":
        raise ConfigError("config.model.remat='dots_saveable': the encoder rematerialises "
                          "whole layers; expected none or full")
    fills = [a for a in ("data", "fsdp", "tensor") if flat.get(f"mesh.{a}") == -1]
    if len(fills) > 1:
        raise ConfigError(f"config.mesh: only one axis may be -1 (fill), got {fills}")
    return lora_cfg


# ----------------------------------------------------------------------------- workdirs
def resume_changes(workdir: str | Path, config: ml_collections.ConfigDict
                   ) -> dict[str, tuple[Any, Any]]:
    """{field: (old, new)} of the changes ``config`` makes to the run in ``workdir`` (its
    config.json) that ``config.resume`` names; {} for a new workdir. Reads only.

    Raises:
      ConfigError: a change to a :data:`FIXED` field (never allowed: start a new workdir), or to
        any other field that ``config.resume`` does not name; the message lists every changed
        field with its old and new value.
    """
    path = Path(workdir) / "config.json"
    if not path.exists():
        return {}
    try:
        old = flat_fields(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path} is not a config this program wrote ({e}); move it away or "
                          "start a new --workdir") from None
    new = flat_fields(json.loads(config.to_json_best_effort()))
    missing = "(absent)"
    changed = {k: (old.get(k, missing), new.get(k, missing)) for k in sorted(old.keys() | new)
               if k not in FREE and old.get(k, missing) != new.get(k, missing)}

    def show(names):
        return "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in sorted(names))

    fixed = [k for k in changed if _is_fixed(k)]
    if fixed:
        raise ConfigError(
            f"{workdir} holds a run of another config: {show(fixed)}. A workdir cannot change "
            "these (its checkpoints and data position depend on them); start a new --workdir. "
            f"{path.name} was left as it was.")
    intended = set(_resume_names(config.resume))
    unlisted = [k for k in changed if k not in intended]
    if unlisted:
        raise ConfigError(
            f"{workdir} holds a run whose config differs: {show(unlisted)}. To continue it with "
            f"these changes on purpose, add --config.resume={','.join(sorted(changed))}; to "
            f"start afresh, use a new --workdir. {path.name} was left as it was.")
    return changed
