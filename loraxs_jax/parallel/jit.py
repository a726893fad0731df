"""Jitted programs with explicit shardings: train and eval steps, predictions, generation.

Every program is a plain ``jax.jit`` with ``in_shardings``/``out_shardings`` given, traced under
``jax.set_mesh(mesh)`` and flax's ``logical_axis_rules`` so the models' logical constraints on
activations take effect.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh

from loraxs_jax.parallel.mesh import DEFAULT_RULES, batch_sharding, replicated


def hashable(shardings: Any) -> tuple:
    """(treedef, leaves) of a tree of shardings, to key a cache of jitted programs; rebuild
    the tree with ``jax.tree.unflatten(*key)``."""
    leaves, treedef = jax.tree.flatten(shardings)
    return treedef, tuple(leaves)


def jit_sharded(fn: Callable, mesh: Mesh, in_shardings: Any, out_shardings: Any,
                donate_argnums: Sequence[int] = (), rules: Sequence = DEFAULT_RULES) -> Callable:
    """``jax.jit(fn)`` with explicit shardings, traced under ``jax.set_mesh(mesh)`` and flax's
    ``logical_axis_rules(rules)`` so the models' ``with_logical_constraint`` on activations take
    effect. The returned function also has ``.lower(*args)`` (for ``memory_analysis``)."""
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=tuple(donate_argnums))

    @functools.wraps(fn)
    def call(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(*args)

    def lower(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted.lower(*args)

    call.lower = lower
    return call


def jit_train_step(step: Callable, mesh: Mesh, state_shardings: Any, frozen_shardings: Any,
                   rules: Sequence = DEFAULT_RULES) -> Callable:
    """Jit ``step(state, frozen, batch) -> (state, metrics)``: state (trainable params, optimizer
    state, step...) is donated and keeps its shardings, the frozen params (base weights, A, B) are
    read-only, the batch is split along data+fsdp, metrics come back replicated."""
    return jit_sharded(step, mesh, (state_shardings, frozen_shardings, batch_sharding(mesh)),
                       (state_shardings, replicated(mesh)), donate_argnums=(0,), rules=rules)


def jit_eval_step(step: Callable, mesh: Mesh, state_shardings: Any, frozen_shardings: Any,
                  rules: Sequence = DEFAULT_RULES) -> Callable:
    """Jit ``step(state, frozen, batch) -> outputs``; nothing donated, outputs replicated."""
    return jit_sharded(step, mesh, (state_shardings, frozen_shardings, batch_sharding(mesh)),
                       replicated(mesh), rules=rules)


def jit_predict(fn: Callable, mesh: Mesh, param_shardings_: Any, n_replicated: int = 0,
                rules: Sequence = DEFAULT_RULES) -> Callable:
    """Jit ``fn(params, batch, *extras) -> outputs`` for evaluation and generation: params at
    their shardings (nothing donated), every array of ``batch`` split along data+fsdp on its
    leading axis, ``n_replicated`` further arguments (PRNG keys, scalars) replicated, and the
    outputs replicated so every process holds all predictions."""
    return jit_sharded(fn, mesh, (param_shardings_, batch_sharding(mesh),
                                  *(replicated(mesh),) * n_replicated),
                       replicated(mesh), rules=rules)
