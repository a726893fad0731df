"""Truncated SVD for LoRA-XS bases: exact, randomized or block Krylov; batched, float32,
sign-canonical.

Every function takes W of shape (..., m, n) (leading axes are a batch of independent matrices)
and returns U (..., m, r), S (..., r), Vt (..., r, n) with W ≈ U · diag(S) · Vt.

Cost of the rank-r approximations, counted in products of W or Wᵀ with one vector ("matvecs"):
``randomized_svd`` (subspace iteration) takes (2·power_iters + 2)·(r + oversample) of them,
``block_krylov_svd`` (block Lanczos) (2·krylov_iters + 2)·max(r, 16). The Krylov space keeps
every block that subspace iteration throws away, so at equal error it needs far fewer passes
over W (Musco & Musco 2015: error ε after O(log(n)/√ε) iterations instead of O(log(n)/ε)).
"""

from __future__ import annotations

import math
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


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _transposed(product: jax.Array) -> jax.Array:
    """The transpose of a matrix product, kept as such. XLA folds ``(qᵀ W)ᵀ`` back into a dot
    that computes Wᵀ q directly, a form its CPU dot runs 4-7x slower than qᵀ W (it reads W
    against its layout); the barrier keeps the fast product and transposes its small result."""
    return _t(jax.lax.optimization_barrier(product))


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


# Size of the Gaussian added to each new Krylov block between its two Gram–Schmidt passes,
# relative to σ₁² (the largest column of the first block (WᵀW)P₀). A block the space already
# holds (W of rank below K) would otherwise leave only rounding noise inside that space, which
# QR turns into unit vectors that are not orthogonal to it; with the Gaussian they become fresh
# random directions instead. It sits above the rounding of (WᵀW)P in float32 (~1e-7·σ₁²) and far
# below the new directions of a block that carries W's energy.
_DEFLATION = 1e-5


# Fewest columns of a Krylov block. On real weights (nearly equal singular values around r) a
# block of r = 4 or 8 columns left rank-r errors up to 1.0006x the exact one's after 6 iterations;
# 16 columns, for the same small cost, 1.00003x. Wider blocks also use the matrix units better.
_MIN_BLOCK = 16


def _project_out(y: jax.Array, basis: jax.Array) -> jax.Array:
    """y − Q Qᵀ y for an orthonormal basis Q (.., s, K) and a block y (.., s, b)."""
    return y - basis @ (_t(basis) @ y)


@partial(jax.jit, static_argnames=("rank", "krylov_iters"))
def block_krylov_svd(w: jax.Array, rank: int, key: jax.Array, krylov_iters: int = 6):
    """Musco & Musco (2015), "Randomized Block Krylov Methods for Stronger and Faster
    Approximate Singular Value Decomposition", Alg. 2, in its stable block-Lanczos form.

    Let Op be Wᵀ (m ≤ n) or W (m > n), so that the Krylov basis lives on the shorter side s of
    W. From a Gaussian block Ω of b = max(r, 16) columns, the space
    span[P₀, (OpᵀOp)P₀, …, (OpᵀOp)^q P₀] with P₀ = orth(Opᵀ Ω) (q = ``krylov_iters``,
    dimension K = (q + 1)·b) is built one block at a time, each new block orthogonalised against
    all earlier ones (classical Gram–Schmidt and QR, twice; a Gaussian of 1e-5·σ₁² between the
    passes keeps the basis orthonormal when W has rank below K). The products (Op Pᵢ)ᵀ made
    along the way, stacked, are (Op P)ᵀ (K, l) itself, so Rayleigh–Ritz needs no further pass
    over W: the top-r eigenvectors E of the (K, K) matrix (Op P)ᵀ(Op P) pick the best rank-r
    subspace P E inside the Krylov space, and the SVD of the small (r, l) matrix Eᵀ(Op P)ᵀ
    gives S and the long side's singular vectors without squaring W's condition number.
    Cost: (2q + 2)·b matvecs, one (K, K) eigh, one (r, l) SVD.

    When K would reach s the Krylov space is the whole space and ``exact_svd`` is both exact
    and cheaper, so that is what runs (a static choice, made from the shape).
    """
    m, n = w.shape[-2:]
    short, long, block = min(m, n), max(m, n), max(rank, _MIN_BLOCK)
    if (krylov_iters + 1) * block >= short:
        return exact_svd(w, rank)
    w = w.astype(jnp.float32)
    if m <= n:                        # Op = Wᵀ; both products in layouts XLA's CPU dot runs fast
        to_long, to_short = (lambda p: _t(p) @ w), (lambda x: w @ _t(x))
    else:                             # Op = W
        to_long, to_short = (lambda p: _transposed(w @ p)), (lambda x: _transposed(x @ w))
    # one draw (each random-number program costs seconds of compile time): Ω, then the noise
    gauss = jax.random.normal(key, w.shape[:-2] + (block, long + krylov_iters * short))
    p = _orthonormal(to_short(gauss[..., :long]))                   # (.., s, b)
    ps, rows = [p], []
    for i in range(krylov_iters):
        rows.append(to_long(p))                                     # (.., b, l) = (Op p)ᵀ
        y = to_short(rows[-1])                                      # (Opᵀ Op) p
        if i == 0:                    # ≈ σ₁²: the first block is W's top directions
            level = jnp.linalg.norm(y, axis=-2, keepdims=True).max(axis=-1, keepdims=True)
            level = level * (_DEFLATION / math.sqrt(short))
        basis = jnp.concatenate(ps, axis=-1)
        noise = _t(gauss[..., long + i * short:long + (i + 1) * short])
        # Gram–Schmidt twice is enough (Giraud et al. 2005); the second pass runs on the
        # normalised block: where y is almost inside the space (W of low rank), the first
        # pass's rounding (relative to ‖y‖) would otherwise survive QR's rescaling of the small
        # remainder and leave the new block visibly non-orthogonal to the old ones
        p = _orthonormal(_project_out(y, basis) + level * noise)
        p = _orthonormal(_project_out(p, basis))
        ps.append(p)
    rows.append(to_long(p))
    basis, rows = jnp.concatenate(ps, axis=-1), jnp.concatenate(rows, axis=-2)
    _, e = jnp.linalg.eigh(rows @ _t(rows))                         # ascending
    e = e[..., :, ::-1][..., :, :rank]                              # (.., K, r)
    ub, s, vt = jnp.linalg.svd(_t(e) @ rows, full_matrices=False)   # (.., r, l)
    u = basis @ (e @ ub)                                            # (.., s, r)
    if m > n:
        u, vt = _t(vt), _t(u)
    u, vt = sign_canonical(u, vt)
    return u, s, vt


METHODS = ("exact", "randomized", "block_krylov")


def truncated_svd(w: jax.Array, rank: int, *, method: str = "exact", key: jax.Array | None = None,
                  oversample: int = 10, power_iters: int = 10, krylov_iters: int = 6,
                  bottom: bool = False):
    """Dispatch to ``exact_svd``, ``randomized_svd`` or ``block_krylov_svd``; the bottom
    triplets always need the exact SVD (a range finder only sees the top of the spectrum)."""
    if method not in METHODS:
        raise ValueError(f"unknown svd method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "exact" or bottom:
        return exact_svd(w, rank, bottom=bottom)
    if key is None:
        raise ValueError(f"{method} SVD needs a PRNG key")
    if method == "randomized":
        return randomized_svd(w, rank, key, oversample=oversample, power_iters=power_iters)
    return block_krylov_svd(w, rank, key, krylov_iters=krylov_iters)
