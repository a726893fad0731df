"""LoRA-XS for flax NNX models, in the same verbs as for linen param trees.

``apply(model, cfg)`` returns a copy of the model whose targeted ``nnx.Linear`` are
``LoraXSLinear`` (an ``nnx.Linear`` with four more variables and the extra term); ``merge``
turns them back into plain ``nnx.Linear`` with merged kernels; ``save_adapter``/``load_adapter``
read and write the same files as the linen verbs. Train R alone with
``nnx.Optimizer(model, tx, wrt=LoraXSR)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from loraxs_jax import apply as apply_lib
from loraxs_jax import io
from loraxs_jax.config import LoraXSConfig
from loraxs_jax.delta import loraxs_delta, merged_kernel
from loraxs_jax.tree import ROLES, adapter_key, path_str

KERNEL = "kernel"


class LoraXSBasis(nnx.Variable):
    """Frozen LoRA-XS leaves (A, B and the scale): not an ``nnx.Param``, so optimizers and
    ``nnx.grad`` filters on ``nnx.Param`` skip them."""


class LoraXSR(nnx.Param):
    """The trainable r×r matrix. Train with ``wrt=LoraXSR``."""


class LoraXSLinear(nnx.Linear):
    """``nnx.Linear`` + (α/r)·((x·A)·R)·B. Made by ``apply`` from an existing Linear."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        y = super().__call__(inputs)
        d = loraxs_delta(inputs, self.kernel_loraxs_A[...], self.kernel_loraxs_R[...],
                         self.kernel_loraxs_B[...], self.kernel_loraxs_scale[...],
                         dtype=self.dtype)
        return y + d.astype(y.dtype)


def _swap_class(obj: nnx.Module, cls: type, drop: Sequence[str] = ()) -> nnx.Module:
    """A new module of ``cls`` sharing ``obj``'s variables (no array is copied)."""
    new = object.__new__(cls)
    for k, v in vars(obj).items():
        object.__setattr__(new, k, v)
    for k in drop:
        delattr(new, k)
    return new


def _set_child(root: nnx.Module, path: tuple, value: Any) -> None:
    parent = root
    for k in path[:-1]:
        parent = parent[k] if isinstance(k, int) or not hasattr(parent, str(k)) else getattr(
            parent, str(k))
    last = path[-1]
    if isinstance(last, int) or not hasattr(parent, str(last)):
        parent[last] = value
    else:
        setattr(parent, str(last), value)


def _copy(model: nnx.Module) -> nnx.Module:
    """A structurally new module tree sharing the same arrays (jax arrays are immutable)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, state)


def _linears(model: nnx.Module, cls: type = nnx.Linear) -> dict[tuple, nnx.Linear]:
    return {tuple(p): m for p, m in nnx.iter_modules(model) if isinstance(m, cls) and p}


def params(model: nnx.Module) -> dict:
    """The model's variables as a plain nested dict (``nnx.state(model).to_pure_dict()``), the
    tree form ``count``, ``save_adapter`` and ``fingerprint`` read."""
    return nnx.state(model).to_pure_dict()


def apply(model: nnx.Module, cfg: LoraXSConfig, rng: Any = 0) -> nnx.Module:
    """A copy of ``model`` whose targeted ``nnx.Linear`` are ``LoraXSLinear``.

    Targets are matched against '<module path>/kernel'. The input model is not modified.
    """
    model = _copy(model)
    linears = _linears(model)
    kernels = {(*p, KERNEL): lin.kernel[...] for p, lin in linears.items()}
    others = [path_str(p) for p, m in nnx.iter_modules(model)
              if p and not isinstance(m, nnx.Linear) and hasattr(m, "kernel")]
    tree: dict = {}
    for path, k in kernels.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[path[-1]] = k
    try:
        adapted = apply_lib.apply(tree, cfg, rng)
    except ValueError as e:
        if others and "matched no kernel" in str(e):
            raise ValueError(f"{e}. Note: NNX adaptation covers nnx.Linear only; these modules "
                             f"hold kernels but are not nnx.Linear: {others[:5]}") from None
        raise
    for path, lin in linears.items():
        node = adapted
        for key in path:
            node = node[str(key)]
        if adapter_key(KERNEL, "R") not in node:
            continue
        new = _swap_class(lin, LoraXSLinear)
        for role in ("A", "B", "scale"):
            setattr(new, adapter_key(KERNEL, role), LoraXSBasis(node[adapter_key(KERNEL, role)]))
        new.kernel_loraxs_R = LoraXSR(node[adapter_key(KERNEL, "R")])
        _set_child(model, path, new)
    return model


def merge(model: nnx.Module) -> nnx.Module:
    """A copy of an NNX model with every ``LoraXSLinear`` merged back into a plain ``nnx.Linear``
    (W' = W + (α/r)·A·R·B)."""
    model = _copy(model)
    for path, lin in _linears(model, LoraXSLinear).items():
        w = merged_kernel(lin.kernel[...], lin.kernel_loraxs_A[...], lin.kernel_loraxs_R[...],
                          lin.kernel_loraxs_B[...], lin.kernel_loraxs_scale[...])
        new = _swap_class(lin, nnx.Linear, [adapter_key(KERNEL, r) for r in ROLES])
        new.kernel = nnx.Param(w)
        _set_child(model, path, new)
    return model


def save_adapter(path: str | os.PathLike, model: nnx.Module, cfg: LoraXSConfig, **kwargs):
    """``loraxs_jax.save_adapter`` for an adapted NNX model (same file format)."""
    return io.save_adapter(path, params(model), cfg, **kwargs)


def load_adapter(path: str | os.PathLike, model: nnx.Module, **kwargs) -> nnx.Module:
    """An adapted copy of the NNX ``model`` with the adapter file's R's (and extras) in place;
    checks the base fingerprint and config like ``loraxs_jax.load_adapter``."""
    loaded = io.load_adapter(path, params(model), **kwargs)
    adapted = apply(model, io.adapter_info(path)["config"])
    graphdef, state = nnx.split(adapted)
    state.replace_by_pure_dict(loaded)
    return nnx.merge(graphdef, state)
