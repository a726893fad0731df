"""How unmodified linen models pick LoRA-XS up: ``wrap(model.apply)``.

The model runs under ``nn.intercept_methods``; every ``nn.Dense`` or ``nn.DenseGeneral`` call
whose module holds ``kernel_loraxs_R`` returns its own output plus the LoRA-XS term read from the
sibling params. The model's code is untouched, and W + ΔW is never formed: the extra cost is
three thin matmuls through the rank-r bottleneck (``delta.loraxs_delta``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax

from loraxs_jax.delta import loraxs_delta
from loraxs_jax.tree import adapter_key

KERNEL = "kernel"


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
            "wrap() adapts nn.Dense and nn.DenseGeneral only. Call loraxs_jax.delta.loraxs_delta "
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
