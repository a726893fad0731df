"""The adapted matmul, and how unmodified Flax models pick it up.

linen: ``wrap(model.apply)`` runs the model under ``nn.intercept_methods``; every ``nn.Dense`` or
``nn.DenseGeneral`` call whose module holds ``kernel_loraxs_R`` returns its own output plus the
LoRA-XS term read from the sibling params. The model's code is untouched, and W + ΔW is never
formed: the extra cost is three thin matmuls through the rank-r bottleneck.

NNX: ``nnx_apply`` replaces each targeted ``nnx.Linear`` in a copy of the model by a
``LoraXSLinear`` (an ``nnx.Linear`` with four more variables and the extra term); ``nnx_merge``
turns them back into plain ``nnx.Linear`` with merged kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from loraxs_jax.transform import adapter_key

KERNEL = "kernel"


def loraxs_delta(x: jax.Array, a: jax.Array, r: jax.Array, b: jax.Array, scale: jax.Array,
                 x_axes: Sequence[int] = (-1,), dtype: Any = None) -> jax.Array:
    """(α/r)·((x·A)·R)·B for A (*in_dims, r), R (r, r), B (r, *out_dims).

    ``x_axes`` are the axes of x contracted with A's input axes (the layer's ``axis``). The
    scale multiplies R (r×r) rather than an activation; matmuls run in ``dtype`` (the layer's
    compute dtype), and R's float32 master copy is cast to it.
    """
    dtype = dtype or jnp.result_type(x.dtype, a.dtype)
    x_axes = tuple(ax % x.ndim for ax in x_axes)
    n_in = a.ndim - 1
    h = jax.lax.dot_general(x.astype(dtype), a.astype(dtype),
                            ((x_axes, tuple(range(n_in))), ((), ())))
    h = h @ (r * scale.astype(r.dtype)).astype(dtype)
    return jax.lax.dot_general(h, b.astype(dtype), (((h.ndim - 1,), (0,)), ((), ())))


def _linen_delta(module: nn.Module, x: jax.Array) -> jax.Array:
    leaves = {role: module.get_variable("params", adapter_key(KERNEL, role))
              for role in ("A", "B", "R", "scale")}
    if isinstance(module, nn.Dense):
        axes = (-1,)
    elif isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            raise NotImplementedError(
                f"LoRA-XS on DenseGeneral with batch_dims={module.batch_dims} "
                f"({'/'.join(module.path)}) is not supported")
        axes = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
    else:  # pragma: no cover - guarded by the caller
        raise TypeError(type(module))
    n_in = leaves["A"].ndim - 1
    if len(axes) != n_in:
        raise ValueError(f"{'/'.join(module.path)} contracts {len(axes)} input axes but its "
                         f"LoRA-XS A has {n_in}; re-apply with in_axes={len(axes)}")
    return loraxs_delta(x, leaves["A"], leaves["R"], leaves["B"], leaves["scale"], axes,
                        module.dtype)


def _interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not module.has_variable(
            "params", adapter_key(KERNEL, "R")):
        return next_fun(*args, **kwargs)
    if not isinstance(module, (nn.Dense, nn.DenseGeneral)):
        raise NotImplementedError(
            f"{'/'.join(module.path)} is a {type(module).__name__} holding LoRA-XS params; "
            "wrap() adapts nn.Dense and nn.DenseGeneral only. Call loraxs_jax.loraxs_delta "
            "yourself in that module, or merge (loraxs_jax.merge) to run it dense.")
    y = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    return y + _linen_delta(module, x).astype(y.dtype)


def wrap(fn: Callable) -> Callable:
    """Return ``fn`` (typically ``model.apply``) running with LoRA-XS active in every adapted
    ``nn.Dense``/``nn.DenseGeneral``. Same signature and outputs as ``fn``; jit it as usual.

    Example::
        params = loraxs_jax.apply(params, cfg, rng)
        logits = loraxs_jax.wrap(model.apply)({"params": params}, tokens)
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with nn.intercept_methods(_interceptor):
            return fn(*args, **kwargs)

    return wrapped


# ----------------------------------------------------------------------------- NNX
class LoraXSBasis(nnx.Variable):
    """Frozen LoRA-XS leaves (A, B and the scale): not an ``nnx.Param``, so optimizers and
    ``nnx.grad`` filters on ``nnx.Param`` skip them."""


class LoraXSR(nnx.Param):
    """The trainable r×r matrix. Train with ``wrt=LoraXSR`` (or ``loraxs_jax.nnx_trainable``)."""


class LoraXSLinear(nnx.Linear):
    """``nnx.Linear`` + (α/r)·((x·A)·R)·B. Made by ``nnx_apply`` from an existing Linear."""

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


def nnx_linears(model: nnx.Module, cls: type = nnx.Linear) -> dict[tuple, nnx.Linear]:
    return {tuple(p): m for p, m in nnx.iter_modules(model) if isinstance(m, cls) and p}


def nnx_apply(model: nnx.Module, cfg, rng: Any = 0) -> nnx.Module:
    """LoRA-XS for an NNX model: a copy whose targeted ``nnx.Linear`` are ``LoraXSLinear``.

    Targets are matched against '<module path>/kernel'. The input model is not modified.
    """
    from loraxs_jax.transform import apply, path_str

    model = _copy(model)
    linears = nnx_linears(model)
    kernels = {(*p, KERNEL): lin.kernel[...] for p, lin in linears.items()}
    others = [path_str(p) for p, _ in nnx.iter_modules(model)
              if p and not isinstance(_, nnx.Linear) and hasattr(_, "kernel")]
    tree = {}
    for path, k in kernels.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[path[-1]] = k
    try:
        adapted = apply(tree, cfg, rng)
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


def nnx_merge(model: nnx.Module) -> nnx.Module:
    """A copy of an NNX model with every ``LoraXSLinear`` merged back into a plain ``nnx.Linear``
    (W' = W + (α/r)·A·R·B)."""
    from loraxs_jax.merge import merged_kernel

    model = _copy(model)
    for path, lin in nnx_linears(model, LoraXSLinear).items():
        w = merged_kernel(lin.kernel[...], lin.kernel_loraxs_A[...], lin.kernel_loraxs_R[...],
                          lin.kernel_loraxs_B[...], lin.kernel_loraxs_scale[...])
        drop = [adapter_key(KERNEL, r) for r in ("A", "B", "R", "scale")]
        new = _swap_class(lin, nnx.Linear, drop)
        new.kernel = nnx.Param(w)
        _set_child(model, path, new)
    return model




def nnx_params(model: nnx.Module) -> dict:
    """The model's variables as a plain nested dict (``nnx.state(model).to_pure_dict()``), the
    tree form ``count``, ``save_adapter`` and ``fingerprint`` read."""
    return nnx.state(model).to_pure_dict()


def nnx_load_adapter(path, model: nnx.Module, **kwargs) -> nnx.Module:
    """An adapted copy of the NNX ``model`` with the adapter file's R's (and extras) in place;
    checks the base fingerprint and config like ``load_adapter``."""
    from loraxs_jax.adapters import adapter_info, load_adapter

    loaded = load_adapter(path, nnx_params(model), **kwargs)
    adapted = nnx_apply(model, adapter_info(path)["config"])
    graphdef, state = nnx.split(adapted)
    state.replace_by_pure_dict(loaded)
    return nnx.merge(graphdef, state)
