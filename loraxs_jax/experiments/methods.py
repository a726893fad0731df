"""The methods an experiment can train, on the same model, data and machinery.

* ``loraxs``: LoRA-XS (R trains; A, B frozen), saved as an R-only adapter file;
* ``lora``: LoRA (Hu et al. 2021) on the same targets and rank;
* ``full``: full fine-tuning of every weight;
* ``head``: a frozen model and a trained task head.

Each is a :class:`Method`: it adapts the base params, says which leaves train and which of those
get the head's learning rate, counts what it trains, and saves what it trained. Experiments pick
one by ``config.method`` from :data:`METHODS`; nothing else branches on the name.

LoRA is LoRA-XS with the roles swapped: ΔW = (α/r)·A·B with A (in, r) Kaiming-uniform and B
(r, out) zeros, both trained, and no r×r matrix. It is stored in the very same leaves
(``*_loraxs_A``, ``*_loraxs_B``, with R fixed to the identity), so ``wrap``, ``merge``, sharding
and counting apply unchanged; only what is trained differs. The identity R costs one r×r matmul
per layer.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

import loraxs_jax as lx
from loraxs_jax.bases import as_key, find_targets, path_key
from loraxs_jax.io import save_tensors
from loraxs_jax.parallel import to_host
from loraxs_jax.partition import is_trainable
from loraxs_jax.tree import flatten, leaf_role, path_str, unflatten

LORA_TRAINABLE = (r"_loraxs_(A|B)$",)


def lora_config(config: ml_collections.ConfigDict) -> lx.LoraXSConfig:
    """The ``LoraXSConfig`` of an experiment config (its ``loraxs`` section)."""
    return lora_config_from(config.loraxs, config.model.scan_layers)


def lora_config_from(section: Any, scan_layers: bool = False) -> lx.LoraXSConfig:
    """A ``loraxs`` section (ConfigDict or mapping) as a ``LoraXSConfig``: '' means None for
    ``bases_dtype``; scanned layers get ``stacked_axes=1`` unless the section says otherwise."""
    if isinstance(section, lx.LoraXSConfig):
        return section
    d = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    d["bases_dtype"] = d.get("bases_dtype") or None
    d.setdefault("stacked_axes", 1 if scan_layers else 0)
    return lx.LoraXSConfig.from_dict(d)


def lora_apply(params: Mapping, cfg: lx.LoraXSConfig, rng: Any = 0) -> Mapping:
    """Insert LoRA factors for ``cfg``'s targets and ranks: A ~ U(±1/√in) (PEFT's default),
    B = 0 (so the model starts as the base), R = I; A and B in float32 (they are trained)."""
    targets = find_targets(params, cfg)
    key = as_key(rng)
    bases = {}
    for t in targets:
        lim = 1.0 / math.sqrt(t.m)
        a = jax.random.uniform(path_key(key, t.name), t.stack + t.in_dims + (t.rank,),
                               jnp.float32, -lim, lim)
        bases[t.name] = (a, jnp.zeros(t.stack + (t.rank,) + t.out_dims, jnp.float32))
    adapted = lx.apply(params, dataclasses.replace(cfg, r_std=0.0, bases_dtype="float32"), rng,
                       bases=bases)
    flat = dict(flatten(adapted))
    for p, v in flat.items():
        role = leaf_role(p[-1])
        if role and role[1] == "R":
            flat[p] = jnp.broadcast_to(jnp.eye(v.shape[-1], dtype=v.dtype), v.shape)
    return unflatten(flat, adapted)


@dataclasses.dataclass
class Method:
    """The adapted params of one method, and what of them trains.

    Attributes:
      params: the base params as the method trains them (adapted for LoRA-XS and LoRA).
      lora_cfg: the experiment's ``LoraXSConfig`` (targets, rank, the head's regexes).
    """

    name: ClassVar[str]
    trained: ClassVar[tuple[str, ...]] = ()   # regexes of the method's own trained leaves
    train_r: ClassVar[bool] = False
    adapted: ClassVar[bool] = False            # the params carry *_loraxs_* leaves
    head_separate: ClassVar[bool] = True       # the head gets ``optim.head_lr``
    params: dict
    lora_cfg: lx.LoraXSConfig

    @classmethod
    def build(cls, params: dict, lora_cfg: lx.LoraXSConfig, rng: jax.Array) -> Method:
        return cls(params, lora_cfg)

    def apply_fn(self, module_apply: Callable) -> Callable:
        """The function that runs the model with this method's params: ``lx.wrap`` of it when
        the params carry LoRA-XS leaves (LoRA-XS, LoRA), the model's own apply otherwise."""
        return lx.wrap(module_apply) if self.adapted else module_apply

    @property
    def trainable(self) -> tuple[str, ...]:
        """Regexes of every trained leaf besides R: the method's own and the task head's."""
        return self.lora_cfg.trainable + self.trained

    def split(self, params: dict | None = None) -> tuple[dict, dict]:
        return lx.split(self.params if params is None else params, trainable=self.trainable,
                        train_r=self.train_r)

    def is_head(self, path: tuple) -> bool:
        """Whether a trained leaf is the task head's (it gets ``optim.head_lr``)."""
        return self.head_separate and is_trainable(path, self.lora_cfg.trainable, train_r=False)

    def counts(self) -> dict[str, int]:
        """Trainable numbers: the method's own (R; LoRA's A, B; all weights) and the head's."""
        t, _ = self.split()
        flat = flatten(t)
        n_head = sum(v.size for p, v in flat.items()
                     if is_trainable(p, self.lora_cfg.trainable, train_r=False))
        n_all = sum(v.size for v in flat.values())
        return {"trainable": n_all - (n_head if self.head_separate else 0), "head": n_head,
                "adapter_bytes": lx.count(self.params)["adapter_bytes"]}

    def summary(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
        """The method's columns in a run's summary."""
        return {"rank": "-", "init": "-"}

    def save(self, path: Path, trainable: dict, frozen: dict) -> Path | None:
        """Write what was trained (the ``.safetensors`` suffix is added); None if nothing is
        saved."""
        tensors = {path_str(p): to_host(v) for p, v in flatten(trainable).items()}
        return save_tensors(path.with_name(path.name + ".safetensors"), tensors,
                            {"method": self.name})


def _rank(config: ml_collections.ConfigDict) -> Any:
    rank = config.loraxs.rank
    return rank if isinstance(rank, int) else json.dumps(dict(rank), sort_keys=True)


class LoraXS(Method):
    name = "loraxs"
    train_r = True
    adapted = True

    @classmethod
    def build(cls, params, lora_cfg, rng):
        return cls(lx.apply(params, lora_cfg, rng), lora_cfg)

    def summary(self, config):
        return {"rank": _rank(config), "init": config.loraxs.init}

    def save(self, path, trainable, frozen):
        return lx.save_adapter(path, lx.combine(trainable, frozen), self.lora_cfg)


class Lora(Method):
    name = "lora"
    trained = LORA_TRAINABLE
    adapted = True

    @classmethod
    def build(cls, params, lora_cfg, rng):
        return cls(lora_apply(params, lora_cfg, rng), lora_cfg)

    def summary(self, config):
        return {"rank": _rank(config), "init": "-"}


class Full(Method):
    name = "full"
    trained = (".*",)
    head_separate = False      # one learning rate for every weight

    def save(self, path, trainable, frozen):
        return None            # a whole model per task: not written


class Head(Method):
    name = "head"


METHODS: dict[str, type[Method]] = {m.name: m for m in (LoraXS, Lora, Full, Head)}


def build_method(config: ml_collections.ConfigDict, params: dict) -> Method:
    """The method ``config.method`` names, built on the base ``params``."""
    if config.method not in METHODS:
        raise ValueError(f"config.method={config.method!r}: expected one of {', '.join(METHODS)}")
    return METHODS[config.method].build(params, lora_config(config), jax.random.key(config.seed))
