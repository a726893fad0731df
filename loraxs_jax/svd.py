"""Truncated SVD for LoRA-XS bases: exact or randomized, batched, float32, sign-canonical.

Every function takes W of shape (..., m, n) (leading axes are a batch of independent matrices)
and returns U (..., m, r), S (..., r), Vt (..., r, n) with W ≈ U · diag(S) · Vt.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def sign_canonical(u: jax.Array, vt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Fix the sign of each singular pair: the entry of largest |value| in each column of U is
    positive (ties broken by the first such entry). Flipping u_i and v_i together leaves
    U Σ Vᵀ unchanged, so the same W gives the same A, B on every run, backend and machine
    (as scikit-learn's ``svd_flip``).
    """
    idx = jnp.argmax(jnp.abs(u), axis=-2, keepdims=True)          # (..., 1, r)
    signs = jnp.sign(jnp.take_along_axis(u, idx, axis=-2))          # (..., 1, r)
    signs = jnp.where(signs == 0, 1.0, signs).astype(u.dtype)
    return u * signs, vt * jnp.swapaxes(signs, -1, -2)


@partial(jax.jit, static_argnames=("rank", "bottom"))
def exact_svd(w: jax.Array, rank: int, bottom: bool = False):
    """Top (or, with ``bottom``, last) ``rank`` singular triplets of W from a full thin SVD."""
    u, s, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
    sl = slice(-rank, None) if bottom else slice(0, rank)
    u, s, vt = u[..., :, sl], s[..., sl], vt[..., sl, :]
    u, vt = sign_canonical(u, vt)
    return u, s, vt


def _orthonormal(y: jax.Array) -> jax.Array:
    q, _ = jnp.linalg.qr(y)
    return q


@partial(jax.jit, static_argnames=("rank", "oversample", "power_iters"))
def randomized_svd(w: jax.Array, rank: int, key: jax.Array, oversample: int = 10,
                   power_iters: int = 10):
    """Halko, Martinsson & Tropp (2011), Alg. 4.4 + 5.1: a Gaussian range finder of
    rank + oversample columns, ``power_iters`` re-orthonormalised power iterations, then the
    exact SVD of the small projected matrix. The paper initialises LoRA-XS this way.
    Cost O(m·n·k) per iteration instead of O(m·n·min(m, n)).
    """
    w = w.astype(jnp.float32)
    m, n = w.shape[-2:]
    k = min(rank + oversample, m, n)
    omega = jax.random.normal(key, w.shape[:-2] + (n, k), jnp.float32)
    wt = jnp.swapaxes(w, -1, -2)
    q = _orthonormal(w @ omega)                                    # (..., m, k)

    def power(q, _):
        z = _orthonormal(wt @ q)                                   # (..., n, k)
        return _orthonormal(w @ z), None

    q, _ = jax.lax.scan(power, q, None, length=power_iters)
    small = jnp.swapaxes(q, -1, -2) @ w                            # (..., k, n)
    ub, s, vt = jnp.linalg.svd(small, full_matrices=False)
    u = q @ ub
    u, s, vt = u[..., :, :rank], s[..., :rank], vt[..., :rank, :]
    u, vt = sign_canonical(u, vt)
    return u, s, vt


def truncated_svd(w: jax.Array, rank: int, *, method: str = "exact", key: jax.Array | None = None,
                  oversample: int = 10, power_iters: int = 10, bottom: bool = False):
    """Dispatch to ``exact_svd`` or ``randomized_svd``; the bottom triplets always need the
    exact SVD (a range finder only sees the top of the spectrum)."""
    if method == "exact" or bottom:
        return exact_svd(w, rank, bottom=bottom)
    if method == "randomized":
        if key is None:
            raise ValueError("randomized SVD needs a PRNG key")
        return randomized_svd(w, rank, key, oversample=oversample, power_iters=power_iters)
    raise ValueError(f"unknown svd method {method!r}; choose 'exact' or 'randomized'")
