"""LoRA-XS for flax NNX models, through the same verbs as for linen param trees.

``loraxs_jax.apply(module, cfg, rng)`` returns an adapted copy of the module: each targeted
weight (any ``nnx.Param`` the model contracts: ``nnx.Linear``, ``nnx.LinearGeneral``,
``nnx.Einsum`` or a custom module's) gets sibling variables ``<name>_loraxs_{A,B,scale}``
(:class:`LoraXSBasis`, frozen) and ``<name>_loraxs_R`` (:class:`LoraXSR`, trained) on the module
that owns it, so ``nnx.state(adapted)`` has exactly the layout of an adapted linen tree. Calling
the adapted module runs its own ``__call__`` with the LoRA-XS term added at every contraction of
an adapted weight (``intercept.replay``, the same mechanism as ``loraxs_jax.wrap``); other
methods run adapted through ``loraxs_jax.wrap(lambda m, x: m.encode(x))(adapted, x)``.

Train R alone with ``nnx.Optimizer(model, tx, wrt=LoraXSR)`` and
``nnx.grad(loss, argnums=nnx.DiffState(0, LoraXSR))``. ``loraxs_jax.merge(adapted)`` returns a
plain module of the original class with W' = W + (α/r)·A·R·B; ``loraxs_jax.save_adapter`` and
``loraxs_jax.load_adapter`` read and write the same files as for linen.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from loraxs_jax.tree import flatten, leaf_role, unflatten


class LoraXSBasis(nnx.Variable):
    """Frozen LoRA-XS leaves (A, B and the scale): not an ``nnx.Param``, so optimizers and
    ``nnx.grad`` filters on ``nnx.Param`` skip them."""


class LoraXSR(nnx.Param):
    """The trainable r×r matrix (an ``nnx.Param``). Train with ``wrt=LoraXSR``."""


def params(module: nnx.Module) -> dict:
    """The module's variables as a plain nested dict (``nnx.to_pure_dict``): the tree form
    ``count``, ``save_adapter`` and ``fingerprint`` read, as for linen."""
    return nnx.to_pure_dict(nnx.state(module))


def is_adapted(module: nnx.Module) -> bool:
    return getattr(type(module), "loraxs_base", None) is not None


@functools.cache
def _adapted_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` is ``cls.__call__`` with LoRA-XS added."""

    def __call__(self, *args, **kwargs):
        return call(self, cls.__call__, *args, **kwargs)

    return type(f"LoraXS{cls.__name__}", (cls,), {
        "__call__": __call__, "loraxs_base": cls, "__module__": cls.__module__,
        "__doc__": f"{cls.__name__} with LoRA-XS (loraxs_jax.nnx)."})


def _owner(root: nnx.Module, path: tuple) -> Any:
    node = root
    for k in path:
        node = node[k] if isinstance(k, int) or not hasattr(node, str(k)) else getattr(
            node, str(k))
    return node


def _copy(module: nnx.Module) -> nnx.Module:
    """A structurally new module tree sharing the same arrays (jax arrays are immutable)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, state)


def apply(module: nnx.Module, cfg: Any, rng: Any = 0, *, bases: Mapping | None = None,
          forward: Callable[[nnx.Module], Any] | None = None) -> nnx.Module:
    """An adapted copy of ``module`` (see the module docstring); ``loraxs_jax.apply`` on an NNX
    module lands here. ``forward(module)`` runs the model on example inputs (e.g.
    ``lambda m: m(x)``) so each weight's geometry is read from its contraction."""
    from loraxs_jax.apply import apply as apply_params

    if is_adapted(module):
        raise ValueError("this module is already adapted (LoRA-XS variables present): merge it "
                         "(loraxs_jax.merge) or start from the base module")
    graphdef, _ = nnx.split(module)
    tree = params(module)
    fwd = None if forward is None else (lambda p: forward(nnx.merge(graphdef, p)))
    adapted = apply_params(tree, cfg, rng, bases=bases, forward=fwd)
    return _with_adapters(module, adapted)


def _with_adapters(module: nnx.Module, adapted: Mapping) -> nnx.Module:
    """A copy of the plain ``module`` carrying the LoRA-XS leaves of the adapted tree."""
    new = _copy(module)
    for path, value in flatten(adapted).items():
        role = leaf_role(path[-1])
        if role:
            kind = LoraXSR if role[1] == "R" else LoraXSBasis
            setattr(_owner(new, path[:-1]), str(path[-1]), kind(value))
    new.__class__ = _adapted_class(type(new))
    return new


def call(module: nnx.Module, method: Callable, *args: Any, **kwargs: Any) -> Any:
    """``method(module, *args, **kwargs)`` with LoRA-XS active: the module's state goes through
    ``intercept.replay`` as a param tree; variables the method updates (caches, batch
    statistics, RNG counts) are written back to ``module``."""
    from loraxs_jax.intercept import AdaptError, adapters_of, replay

    graphdef, state = nnx.split(module)
    tree = nnx.to_pure_dict(state)
    _, adapters = adapters_of(tree)
    if not adapters:
        raise AdaptError(f"{type(module).__name__} holds no LoRA-XS variables: adapt it with "
                         "loraxs_jax.apply(module, cfg) first")
    frozen = nnx.Not(nnx.Any(nnx.Param, LoraXSBasis))

    def run(tree, *a, **k):
        m = nnx.merge(graphdef, tree)
        out = method(m, *a, **k)
        return out, nnx.to_pure_dict(nnx.state(m, frozen))

    out, updates = replay(run, tree, adapters, args, kwargs)
    if flatten(updates):
        nnx.update(module, updates)
    return out


def merge(module: nnx.Module) -> nnx.Module:
    """A plain module of the original class with every adapted weight merged
    (W' = W + (α/r)·A·R·B) and the LoRA-XS variables removed; ``loraxs_jax.merge`` on an NNX
    module lands here."""
    from loraxs_jax.merge import merge as merge_params

    if not is_adapted(module):
        raise ValueError(f"{type(module).__name__} holds no LoRA-XS variables: nothing to merge")
    merged = flatten(merge_params(params(module)))
    new = _copy(module)
    new.__class__ = type(module).loraxs_base
    for path in flatten(params(module)):
        if leaf_role(path[-1]):
            delattr(_owner(new, path[:-1]), str(path[-1]))
    graphdef, state = nnx.split(new)
    nnx.replace_by_pure_dict(state, unflatten(merged))
    return nnx.merge(graphdef, state)


def load_into(module: nnx.Module, adapted: Mapping) -> nnx.Module:
    """The plain NNX ``module`` adapted with the LoRA-XS leaves (and any other values) of an
    adapted tree of its params (what ``loraxs_jax.load_adapter`` returns for it)."""
    if is_adapted(module):
        raise ValueError("load an adapter into the base module, not an adapted one "
                         "(loraxs_jax.merge it, or start from the base)")
    new = _with_adapters(module, adapted)
    graphdef, state = nnx.split(new)
    nnx.replace_by_pure_dict(state, adapted)
    return nnx.merge(graphdef, state)
