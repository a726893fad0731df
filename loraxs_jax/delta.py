"""The LoRA-XS term: factored for forward passes, dense for merges.

Forward passes add (α/r)·((x·A)·R)·B without ever forming W + ΔW (three thin matmuls through the
rank-r bottleneck); merges form ΔW = (α/r)·A·R·B once, in float32, in the kernel's shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


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


def delta_weight(a: jax.Array, r: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """ΔW = (α/r)·A·R·B in float32, shaped like the kernel: A (*stack, *in, r), R (*stack, r, r),
    B (*stack, r, *out) → (*stack, *in, *out)."""
    n_stack = r.ndim - 2
    stack, rank = r.shape[:n_stack], r.shape[-1]
    in_dims, out_dims = a.shape[n_stack:-1], b.shape[n_stack + 1:]
    a2 = a.astype(jnp.float32).reshape(stack + (-1, rank))
    b2 = b.astype(jnp.float32).reshape(stack + (rank, -1))
    rs = r.astype(jnp.float32) * scale.astype(jnp.float32)[..., None, None]
    return (a2 @ rs @ b2).reshape(stack + in_dims + out_dims)


def merged_kernel(w: jax.Array, a: jax.Array, r: jax.Array, b: jax.Array,
                  scale: jax.Array, sign: float = 1.0) -> jax.Array:
    """W ± ΔW computed in float32 and cast back to W's dtype (``sign=-1`` unmerges)."""
    return (w.astype(jnp.float32) + sign * delta_weight(a, r, b, scale)).astype(w.dtype)
