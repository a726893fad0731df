"""Truncated SVD for LoRA-XS bases: exact, randomized or block Krylov (the Gram matrix's
eigendecomposition where a short side makes that cheaper); batched, float32, sign-canonical.

Every function takes W of shape (..., m, n) (leading axes are a batch of independent matrices)
and returns U (..., m, r), S (..., r), Vt (..., r, n) with W ≈ U · diag(S) · Vt.

Cost of the rank-r approximations, counted in products of W or Wᵀ with one vector ("matvecs"):
``randomized_svd`` (subspace iteration) takes (2·power_iters + 2)·(r + oversample) of them,
``block_krylov_svd`` (block Lanczos) (2·krylov_iters + 2)·max(⌈r/2⌉, 16). The Krylov space keeps
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


# Size of the random block added to each new Krylov block between its Gram–Schmidt passes,
# relative to σ₁² (the largest column of the first block (WᵀW)P₀). A block the space already
# holds (W of rank below K) would otherwise leave only rounding noise inside that space, which
# QR turns into unit vectors that are not orthogonal to it; with the noise they become fresh
# random directions instead. It sits above the rounding of (WᵀW)P in float32 (~1e-7·σ₁²) and far
# below the new directions of a block that carries W's energy.
_DEFLATION = 1e-5


# Fewest columns of a Krylov block. On real weights (nearly equal singular values around r) a
# block of r = 4 or 8 columns left rank-r errors up to 1.0006x the exact one's after 6 iterations;
# 16 columns, for the same small cost, 1.00003x. Wider blocks also use the matrix units better.
_MIN_BLOCK = 16

# A shorter side below this many times the Krylov space's dimension K gets the Gram matrix's
# eigendecomposition instead: its (s, s) eigh then costs about what the (K, K) one would, and
# no pass over W is needed (on SmolLM2's 576×192 k/v matrices at r = 32: 98 ms for 60 against
# 200 ms for block Krylov and 300 ms for the full SVD).
_GRAM_BELOW = 1.25


# Smallest λ_r/λ_1 (= (σ_r/σ_1)²) for which the eigendecomposition of a squared matrix (the Gram
# matrix; the Rayleigh–Ritz matrix (Op P)ᵀ(Op P)) and a Krylov space built from products with
# WᵀW are trusted in float32. Their rounding is ~1e-7·λ_1 (block Krylov's deflation noise
# 1e-5·λ_1), so directions with λ_r near that are lost: at σ_r/σ_1 = 1.3e-2 block Krylov's rank-r
# error came out 1.0008x the exact one's, at 1e-3 1.5x, at 1.6e-5 34x. Below it (σ_r/σ_1 < 0.032;
# real weights sit at 0.1-0.5) the full SVD runs instead.
_SQUARED_FLOOR = 1e-3


def krylov_block(rank: int) -> int:
    """Columns b of each Krylov block for rank r: max(⌈r/2⌉, 16). Half of r with twice the
    iterations reaches a higher polynomial degree for the same products with W, and keeps the
    (K, K) Rayleigh–Ritz eigh small (SmolLM2 at r = 32: b = 16, q = 10 took 1.0 s with a worst
    error 1.00025x the exact one's; b = 32, q = 5: 1.16 s, 1.00054x)."""
    return max(-(-rank // 2), _MIN_BLOCK)


def _project_out(y: jax.Array, basis: jax.Array) -> jax.Array:
    """y − Q Qᵀ y for an orthonormal basis Q (.., s, K) and a block y (.., s, b)."""
    return y - basis @ (_t(basis) @ y)


def _cholesky_qr(y: jax.Array, shift: bool) -> jax.Array:
    """Q of y = Q R from the Cholesky factor of yᵀy (one (b, b) Gram, a Cholesky and a
    triangular solve: a fraction of Householder QR's cost on a tall block). ``shift`` adds
    1e-5·tr(yᵀy)/b to the Gram's diagonal first (Fukaya et al. 2020, shifted CholeskyQR), so a
    block of condition number up to ~1/ε still factors; its Q is then only nearly orthonormal
    and another unshifted pass makes it so."""
    g = _t(y) @ y
    if shift:
        b = y.shape[-1]
        tr = jnp.trace(g, axis1=-2, axis2=-1)[..., None, None]
        g = g + (1e-5 / b) * tr * jnp.eye(b, dtype=y.dtype)
    low = jnp.linalg.cholesky(g)
    # y L⁻ᵀ as a product with the (b, b) inverse: XLA's CPU triangular solve of a tall block
    # took 3x the time of the product
    eye = jnp.broadcast_to(jnp.eye(low.shape[-1], dtype=y.dtype), low.shape)
    inv = jax.lax.linalg.triangular_solve(low, eye, left_side=True, lower=True)
    return y @ _t(inv)


def _orthonormal_block(y: jax.Array) -> jax.Array:
    """Orthonormal basis of a full-rank block (condition number below ~1e6): shifted
    CholeskyQR, then a plain pass (CholeskyQR2)."""
    return _cholesky_qr(_cholesky_qr(y, True), False)


def _factor(left: jax.Array, small: jax.Array):
    """The SVD of left @ small, for ``left`` (.., s, r) with orthonormal columns and any
    ``small`` (.., r, l): QR of smallᵀ, then the SVD of the (r, r) triangle. Exact when small's
    rows are already orthogonal (Ritz vectors), and a zero singular value still gets an
    orthonormal singular vector (W of rank below r), which dividing rows by their norms would
    not."""
    q, tri = jnp.linalg.qr(_t(small))                             # smallᵀ = Q T: small = Tᵀ Qᵀ
    x, s, yt = jnp.linalg.svd(_t(tri))                             # Tᵀ = X S Yᵀ
    return left @ x, s, _t(q @ _t(yt))


@partial(jax.jit, static_argnames=("rank",))
def gram_svd(w: jax.Array, rank: int):
    """Top ``rank`` singular triplets from the eigendecomposition of the Gram matrix of W's
    shorter side (s, s), then ``_factor`` for S and the other side. For short sides of a few
    hundred it is 3x cheaper than the full SVD. Like block Krylov's Rayleigh–Ritz step it squares
    the condition number, so a spectrum steeper than σ_r/σ_1 = 0.032 (``_SQUARED_FLOOR``) takes
    the full SVD instead."""
    w = w.astype(jnp.float32)
    m, n = w.shape[-2:]
    lam, e = jnp.linalg.eigh(w @ _t(w) if m <= n else _t(w) @ w)     # ascending
    top = e[..., :, ::-1][..., :, :rank]

    def from_gram(w, top):
        if m <= n:
            return _factor(top, _t(top) @ w)
        v, s, ut = _factor(top, _transposed(w @ top))               # Wᵀ ≈ V (W V)ᵀ
        return _t(ut), s, _t(v)

    # a steep spectrum (σ_r/σ_1 < 0.032): the squared matrix cannot resolve it, the SVD can
    steep = lam[..., -rank] < _SQUARED_FLOOR * lam[..., -1]
    u, s, vt = _branch(steep, lambda w, top: exact_svd(w, rank), from_gram, w, top)
    u, vt = sign_canonical(u, vt)
    return u, s, vt


def _branch(pred: jax.Array, if_true, if_false, *args):
    """``if_true`` for the matrices where ``pred`` holds, else ``if_false``, computing
    ``if_true`` only if some matrix needs it: ``lax.cond`` for one matrix, and for a batch
    (leading axes) a cond on any of them around a per-matrix ``jnp.where``. Under ``vmap`` a
    cond computes both branches, so batches are best passed with their leading axes."""
    if pred.ndim == 0:
        return jax.lax.cond(pred, if_true, if_false, *args)

    def both(*args):
        yes, no = if_true(*args), if_false(*args)
        return jax.tree.map(lambda a, b: jnp.where(
            pred.reshape(pred.shape + (1,) * (a.ndim - pred.ndim)), a, b), yes, no)

    return jax.lax.cond(jnp.any(pred), both, if_false, *args)


def _draw(sampler, key: jax.Array, batch: tuple[int, ...], shape: tuple[int, ...]) -> jax.Array:
    """(*batch, *shape) float32 draws: from one key, or one key per matrix (keys of shape
    ``batch``: the same draws as each matrix alone with its key)."""
    if key.shape == batch and batch:
        flat = key.reshape(-1)
        out = jax.vmap(lambda k: sampler(k, shape, jnp.float32))(flat)
        return out.reshape(batch + shape)
    return sampler(key, batch + shape, jnp.float32)


@partial(jax.jit, static_argnames=("rank", "krylov_iters"))
def block_krylov_svd(w: jax.Array, rank: int, key: jax.Array, krylov_iters: int = 10):
    """Musco & Musco (2015), "Randomized Block Krylov Methods for Stronger and Faster
    Approximate Singular Value Decomposition", Alg. 2, in its stable block-Lanczos form.

    Let Op be Wᵀ (m ≤ n) or W (m > n), so that the Krylov basis lives on the shorter side s of
    W. From a random ±1 block Ω of b = ``krylov_block(r)`` columns (``key``: one key, or one
    per matrix of a batch), the space
    span[P₀, (OpᵀOp)P₀, …, (OpᵀOp)^q P₀] with P₀ = orth(Opᵀ Ω) (q = ``krylov_iters``,
    dimension K = (q + 1)·b) is built one block at a time, each new block orthogonalised against
    all earlier ones (classical Gram–Schmidt and QR, twice; a random block of 1e-5·σ₁² between
    the passes keeps the basis orthonormal when W has rank below K). The products (Op Pᵢ)ᵀ made
    along the way, stacked, are (Op P)ᵀ (K, l) itself, so Rayleigh–Ritz needs no further pass
    over W: the top-r eigenvectors E of the (K, K) matrix (Op P)ᵀ(Op P) pick the best rank-r
    subspace P E inside the Krylov space, and ``_factor`` of Eᵀ(Op P)ᵀ gives S and the long
    side's singular vectors. Cost: (2q + 2)·b matvecs, one (K, K) eigh, one (l, r) QR.

    When s < 1.25·K the Gram matrix's eigendecomposition (``gram_svd``) is both as accurate
    and cheaper, so that is what runs (a static choice, made from the shape).
    """
    m, n = w.shape[-2:]
    short, long, block = min(m, n), max(m, n), krylov_block(rank)
    if (krylov_iters + 1) * block * _GRAM_BELOW >= short:
        return gram_svd(w, rank)
    w = w.astype(jnp.float32)
    if m <= n:                        # Op = Wᵀ; both products in layouts XLA's CPU dot runs fast
        to_long, to_short = (lambda p: _t(p) @ w), (lambda x: w @ _t(x))
    else:                             # Op = W
        to_long, to_short = (lambda p: _transposed(w @ p)), (lambda x: _transposed(x @ w))
    # one draw of ±1 (threefry's Gaussians cost more than the products on small matrices): Ω,
    # and, in windows rolled along it, the deflation noise of each iteration
    omega = _draw(jax.random.rademacher, key, w.shape[:-2], (block, long))

    def noise(i):
        return _t(jnp.roll(omega, 7 * i, axis=-1)[..., :short])

    def deflation(y):                 # 1e-5 of y's largest column, relative to ‖noise column‖
        level = jnp.linalg.norm(y, axis=-2, keepdims=True).max(axis=-1, keepdims=True)
        level = level * (_DEFLATION / math.sqrt(short))
        return jnp.where(level > 0, level, 1.0)            # W = 0: the noise is the block

    start = to_short(omega)                                         # (.., s, b)
    p = _orthonormal_block(start + deflation(start) * noise(1))
    ps, rows = [p], []
    for i in range(krylov_iters):
        rows.append(to_long(p))                                     # (.., b, l) = (Op p)ᵀ
        y = to_short(rows[-1])                                      # (Opᵀ Op) p
        if i == 0:                    # ≈ σ₁²: the first block is W's top directions
            level = deflation(y)
        basis = jnp.concatenate(ps, axis=-1)
        # Gram–Schmidt twice is enough (Giraud et al. 2005); the second pass runs on the
        # normalised block: where y is almost inside the space (W of low rank), the first
        # pass's rounding (relative to ‖y‖) would otherwise survive QR's rescaling of the small
        # remainder and leave the new block visibly non-orthogonal to the old ones
        p = _cholesky_qr(_project_out(y, basis) + level * noise(i + 2), True)
        p = _orthonormal_block(_project_out(p, basis))
        ps.append(p)
    rows.append(to_long(p))
    basis, rows = jnp.concatenate(ps, axis=-1), jnp.concatenate(rows, axis=-2)
    lam, e = jnp.linalg.eigh(rows @ _t(rows))                       # ascending
    e = e[..., :, ::-1][..., :, :rank]                              # (.., K, r)

    def ritz(w, basis, rows, e):
        u, s, vt = _factor(basis @ e, _t(e) @ rows)                 # (.., s, r), (.., r, l)
        return (_t(vt), s, _t(u)) if m > n else (u, s, vt)

    # A steep spectrum (σ_r/σ_1 < 0.032): the Krylov space itself, built from products with WᵀW
    # (and its deflation noise at 1e-5·σ₁²), cannot hold directions with σ² that small; the
    # full SVD of such (rare) matrices does, whatever it costs (W's weights are ill-conditioned
    # at r, their rank-r error was up to 34x the exact one's otherwise)
    steep = lam[..., -rank] < _SQUARED_FLOOR * lam[..., -1]
    u, s, vt = _branch(steep, lambda w, *_: exact_svd(w, rank), ritz, w, basis, rows, e)
    u, vt = sign_canonical(u, vt)
    return u, s, vt


METHODS = ("exact", "randomized", "block_krylov")

# The version of each method's algorithm: what, besides W and the config, decides its A and B.
# An adapter file records it, and loading refuses a file whose R was trained against the bases
# of another version (its R would silently meet other bases). block_krylov 2: ±1 start, blocks
# of max(⌈r/2⌉, 16) columns, CholeskyQR, the Gram eigh below 1.25·K, the full SVD for steep
# spectra (1: Gaussian start, blocks of max(r, 16), Householder QR, the full SVD below K).
ALGORITHM_VERSIONS = {"exact": 1, "randomized": 1, "block_krylov": 2}


def algorithm(method: str) -> str:
    """``"<method>-<version>"``: the tag adapter files and the bases cache key carry."""
    return f"{method}-{ALGORITHM_VERSIONS[method]}"


def truncated_svd(w: jax.Array, rank: int, *, method: str = "exact", key: jax.Array | None = None,
                  oversample: int = 10, power_iters: int = 10, krylov_iters: int = 10,
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
