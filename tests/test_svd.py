"""svd.py against numpy's SVD: exact, randomized and block-Krylov truncations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loraxs_jax import svd


def _decaying(rng, m, n, decay=0.7):
    """A matrix with a geometrically decaying spectrum, like trained weights' top subspace."""
    u, _ = np.linalg.qr(rng.normal(size=(m, m)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    k = min(m, n)
    s = decay ** np.arange(k) + 0.01
    return (u[:, :k] * s) @ v[:, :k].T


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_exact_matches_numpy_top_subspace(shape):
    rng = np.random.default_rng(0)
    w = rng.normal(size=shape).astype(np.float32)
    r = 6
    u, s, vt = jax.device_get(svd.exact_svd(jnp.asarray(w), r))
    un, sn, vtn = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(s, sn[:r], rtol=1e-5)
    # sign-invariant: each singular vector equals numpy's up to sign
    np.testing.assert_allclose(np.abs(np.sum(u * un[:, :r], 0)), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.abs(np.sum(vt * vtn[:r], 1)), 1.0, atol=1e-5)
    # and the rank-r reconstruction is numpy's, which no sign choice can change
    np.testing.assert_allclose((u * s) @ vt, (un[:, :r] * sn[:r]) @ vtn[:r], atol=1e-5)


def test_sign_convention_is_canonical_and_deterministic():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(40, 24)), jnp.float32)
    u, s, vt = svd.exact_svd(w, 5)
    idx = jnp.argmax(jnp.abs(u), axis=0)
    assert bool(jnp.all(u[idx, jnp.arange(5)] > 0))
    # flipping the sign of W flips U or V; the canonical form keeps U's largest entries positive
    u2, _, vt2 = svd.exact_svd(-w, 5)
    np.testing.assert_allclose(u2, u, atol=1e-5)
    np.testing.assert_allclose(vt2, -vt, atol=1e-5)
    # same input, same bits
    u3, s3, vt3 = svd.exact_svd(w, 5)
    assert np.array_equal(u3, u) and np.array_equal(vt3, vt) and np.array_equal(s3, s)


def test_randomized_matches_exact_subspace():
    rng = np.random.default_rng(2)
    w = jnp.asarray(_decaying(rng, 256, 192, decay=0.8), jnp.float32)
    r = 16
    ue, se, vte = svd.exact_svd(w, r)
    ur, sr, vtr = svd.randomized_svd(w, r, jax.random.key(0), oversample=8, power_iters=4)
    # principal angles between the top-r left subspaces: cosines all ~1
    cos = np.linalg.svd(np.asarray(ue).T @ np.asarray(ur), compute_uv=False)
    assert cos.min() > 0.9999, cos.min()
    # the energy of W it captures equals the exact subspace's
    captured = np.linalg.norm(np.asarray(ur).T @ w) / np.linalg.norm(np.asarray(ue).T @ w)
    assert captured > 0.99999
    np.testing.assert_allclose(sr, se, rtol=1e-3)
    err_e = np.linalg.norm(w - (ue * se) @ vte)
    err_r = np.linalg.norm(w - (ur * sr) @ vtr)
    assert err_r <= err_e * 1.001
    # same key, same result; signs canonical as for the exact path
    np.testing.assert_allclose(ur, ue, atol=5e-3)


def _power_law(rng, m, n, decay):
    """Singular values (1 + i)^-decay: for a small decay nearly equal around r, as in trained
    weights, the hard case for a range finder."""
    u, _ = np.linalg.qr(rng.normal(size=(m, m)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    k = min(m, n)
    return (u[:, :k] * (1.0 + np.arange(k)) ** -decay) @ v[:, :k].T


def _numpy_truncation(w, r):
    """numpy's float64 SVD: (U_r, S_r, V_rᵀ, ‖W − W_r‖_F)."""
    u, s, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    return u[:, :r], s[:r], vt[:r], np.sqrt(np.sum(s[r:] ** 2))


def _error(w, u, s, vt):
    return np.linalg.norm(np.asarray(w, np.float64) - (np.asarray(u, np.float64) * s) @ vt)


def _max_angle_deg(a, b):
    """Largest principal angle between the column spaces of two orthonormal bases."""
    cos = np.linalg.svd(np.asarray(a, np.float64).T @ np.asarray(b, np.float64), compute_uv=False)
    return np.degrees(np.arccos(np.clip(cos.min(), 0.0, 1.0)))


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_block_krylov_matches_numpy_with_a_spectral_gap(shape):
    rng = np.random.default_rng(5)
    w = jnp.asarray(_decaying(rng, *shape, decay=0.8), jnp.float32)
    r = 12
    un, sn, vtn, best = _numpy_truncation(w, r)
    u, s, vt = jax.device_get(svd.block_krylov_svd(w, r, jax.random.key(0), krylov_iters=3))
    assert u.shape == (shape[0], r) and s.shape == (r,) and vt.shape == (r, shape[1])
    # float32 rounding alone (exact_svd) leaves these subspaces ~0.05° from numpy's
    assert _max_angle_deg(un, u) < 0.2 and _max_angle_deg(vtn.T, vt.T) < 0.2
    np.testing.assert_allclose(s, sn, rtol=1e-5)
    np.testing.assert_allclose((u * s) @ vt, (un * sn) @ vtn, atol=1e-5)
    np.testing.assert_allclose(u.T @ u, np.eye(r), atol=1e-5)
    np.testing.assert_allclose(vt @ vt.T, np.eye(r), atol=1e-5)
    assert _error(w, u, s, vt) <= best * (1 + 1e-6)


@pytest.mark.parametrize("shape", [(300, 800), (800, 300)])
def test_block_krylov_beats_randomized_on_a_flat_spectrum(shape):
    """Singular values (1+i)^-0.05, nearly equal as in real weights (σ_r/σ_{r+1} = 1.003):
    subspace iteration with the official n_iter=10 stays ~1.0008x off the best rank-r error;
    block Krylov with fewer than half its products with W gets within 1.00001x."""
    rng = np.random.default_rng(6)
    w = jnp.asarray(_power_law(rng, *shape, decay=0.05), jnp.float32)
    r = 16
    *_, best = _numpy_truncation(w, r)
    kr = svd.block_krylov_svd(w, r, jax.random.key(1), krylov_iters=6)
    rd = svd.randomized_svd(w, r, jax.random.key(1), oversample=10, power_iters=10)
    assert (2 * 6 + 2) * r < (2 * 10 + 2) * (r + 10) / 2.5          # matvecs: 224 vs 572
    ratio_kr, ratio_rd = _error(w, *kr) / best, _error(w, *rd) / best
    assert ratio_kr < 1 + 1e-5, ratio_kr
    assert ratio_kr - 1 < (ratio_rd - 1) / 10, (ratio_kr, ratio_rd)


def test_block_krylov_is_seeded_sign_canonical_and_float32():
    rng = np.random.default_rng(7)
    w = jnp.asarray(_decaying(rng, 120, 90), jnp.bfloat16)
    u, s, vt = svd.block_krylov_svd(w, 6, jax.random.key(3), krylov_iters=4)
    assert u.dtype == s.dtype == vt.dtype == jnp.float32
    u2, s2, vt2 = svd.block_krylov_svd(w, 6, jax.random.key(3), krylov_iters=4)
    assert np.array_equal(u, u2) and np.array_equal(s, s2) and np.array_equal(vt, vt2)
    idx = jnp.argmax(jnp.abs(u), axis=0)
    assert bool(jnp.all(u[idx, jnp.arange(6)] > 0))
    # another key: other rounding, same canonical triplets (a gap at r)
    u3, _, vt3 = svd.block_krylov_svd(w, 6, jax.random.key(4), krylov_iters=4)
    np.testing.assert_allclose(u3, u, atol=1e-4)
    # -W: U keeps its signs (largest entries positive), V flips
    u4, _, vt4 = svd.block_krylov_svd(-w, 6, jax.random.key(3), krylov_iters=4)
    np.testing.assert_allclose(u4, u, atol=1e-4)
    np.testing.assert_allclose(vt4, -vt, atol=1e-4)


def test_block_krylov_batched_equals_one_at_a_time():
    rng = np.random.default_rng(8)
    w = jnp.asarray(np.stack([_decaying(rng, 80, 130) for _ in range(3)]), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 3)
    u, s, vt = jax.vmap(lambda x, k: svd.block_krylov_svd(x, 5, k, krylov_iters=3))(w, keys)
    ub, sb, vtb = svd.block_krylov_svd(w, 5, keys, krylov_iters=3)   # leading axes, key each
    np.testing.assert_allclose(ub, u, atol=1e-5)
    np.testing.assert_allclose(vtb, vt, atol=1e-5)
    for i in range(3):
        ui, si, vti = svd.block_krylov_svd(w[i], 5, keys[i], krylov_iters=3)
        np.testing.assert_allclose(u[i], ui, atol=1e-5)
        np.testing.assert_allclose(s[i], si, rtol=1e-5)
        np.testing.assert_allclose(vt[i], vti, atol=1e-5)
        np.testing.assert_allclose(s[i], np.linalg.svd(np.asarray(w[i]), compute_uv=False)[:5],
                                   rtol=1e-5)


@pytest.mark.parametrize("shape,rank_w", [((200, 300), 20), ((300, 200), 12), ((200, 300), 0)])
def test_block_krylov_on_matrices_of_rank_below_its_space(shape, rank_w):
    """rank(W) < (q+1)·r: the Krylov space runs out of W's directions midway; the basis must
    stay orthonormal (random directions fill it), or U·S·Vᵀ is not a projection of W."""
    rng = np.random.default_rng(9)
    w = rng.normal(size=(shape[0], rank_w)) @ rng.normal(size=(rank_w, shape[1]))
    w = jnp.asarray(w, jnp.float32)
    r = 8
    u, s, vt = jax.device_get(svd.block_krylov_svd(w, r, jax.random.key(0), krylov_iters=5))
    un, sn, vtn, best = _numpy_truncation(w, r)
    np.testing.assert_allclose(u.T @ u, np.eye(r), atol=1e-5)
    np.testing.assert_allclose(vt @ vt.T, np.eye(r), atol=1e-5)
    np.testing.assert_allclose(s, sn, rtol=1e-5, atol=1e-6)
    assert _error(w, u, s, vt) <= best * (1 + 1e-5) + 1e-4


def test_block_krylov_takes_the_gram_eigh_when_its_space_would_near_the_short_side():
    w = jnp.asarray(np.random.default_rng(10).normal(size=(30, 50)), jnp.float32)
    got = svd.block_krylov_svd(w, 5, jax.random.key(0), krylov_iters=1)  # 1.25·2·16 = 40 ≥ 30
    gram = svd.gram_svd(w, 5)
    for g, x in zip(got, gram):
        assert np.array_equal(g, x)
    for g, x in zip(got, svd.exact_svd(w, 5)):
        np.testing.assert_allclose(g, x, atol=2e-5)


@pytest.mark.parametrize("shape", [(60, 140), (140, 60)])
@pytest.mark.parametrize("rank_w", [40, 3, 0])
def test_gram_svd_matches_numpy_and_stays_orthonormal_below_rank_r(shape, rank_w):
    """W of rank 3 (or 0) < r = 6: the singular values beyond its rank are 0 and their vectors
    must still be orthonormal (B = V_rᵀ carries them into R's columns)."""
    rng = np.random.default_rng(11)
    w = rng.normal(size=(shape[0], rank_w)) @ rng.normal(size=(rank_w, shape[1]))
    w = jnp.asarray(w, jnp.float32)
    r = 6
    u, s, vt = jax.device_get(svd.gram_svd(w, r))
    un, sn, vtn, best = _numpy_truncation(w, r)
    assert u.shape == (shape[0], r) and vt.shape == (r, shape[1])
    np.testing.assert_allclose(u.T @ u, np.eye(r), atol=1e-5)
    np.testing.assert_allclose(vt @ vt.T, np.eye(r), atol=1e-5)
    np.testing.assert_allclose(s, sn, rtol=1e-5, atol=1e-4)
    assert _error(w, u, s, vt) <= best * (1 + 1e-5) + 1e-4
    if rank_w > r:   # a spectral gap: the same subspaces as numpy's
        assert _max_angle_deg(un, u) < 0.2 and _max_angle_deg(vtn.T, vt.T) < 0.2


def test_bottom_and_batched():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(3, 20, 12)).astype(np.float32)
    u, s, vt = svd.exact_svd(jnp.asarray(w), 4, bottom=True)
    for i in range(3):
        sn = np.linalg.svd(w[i], compute_uv=False)
        np.testing.assert_allclose(s[i], sn[-4:], rtol=1e-5)
        ui, si, vti = svd.exact_svd(jnp.asarray(w[i]), 4, bottom=True)
        np.testing.assert_allclose(u[i], ui, atol=1e-5)
    with pytest.raises(ValueError, match="unknown svd method 'lanczos'; choose one of exact, "
                                         "randomized, block_krylov"):
        svd.truncated_svd(jnp.asarray(w[0]), 2, method="lanczos")
    with pytest.raises(ValueError, match="block_krylov SVD needs a PRNG key"):
        svd.truncated_svd(jnp.asarray(w[0]), 2, method="block_krylov")
    # the bottom triplets are the exact SVD's whatever the method
    got = svd.truncated_svd(jnp.asarray(w[0]), 4, method="block_krylov", key=jax.random.key(0),
                            bottom=True)
    np.testing.assert_allclose(got[1], np.linalg.svd(w[0], compute_uv=False)[-4:], rtol=1e-5)


def test_float32_whatever_the_input_dtype():
    w = jnp.asarray(np.random.default_rng(4).normal(size=(16, 8)), jnp.bfloat16)
    u, s, vt = svd.truncated_svd(w, 3)
    assert u.dtype == s.dtype == vt.dtype == jnp.float32


@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (576, 192)])
@pytest.mark.parametrize("decay", [0.88, 0.8, 0.7])
def test_block_krylov_on_steep_spectra_is_as_good_as_the_full_svd(shape, decay):
    """σ_i = decay^i: σ_32/σ_1 = 0.019, 1e-3, 1.6e-5. Products with WᵀW (and the squared
    Rayleigh–Ritz and Gram matrices) lose directions with σ² near float32's rounding of σ₁²:
    the rank-r errors were 1.0002-1.5x and 20-40x the full SVD's. Such matrices take the full
    SVD, one by one in a batch that holds flat ones too."""
    rng = np.random.default_rng(14)
    m, n = shape
    k = min(m, n)
    u0, _ = np.linalg.qr(rng.normal(size=(m, k)))
    v0, _ = np.linalg.qr(rng.normal(size=(n, k)))
    steep = (u0 * decay ** np.arange(k)) @ v0.T
    flat = _power_law(rng, m, n, decay=0.05)
    w = jnp.asarray(np.stack([steep, flat]), jnp.float32)
    r = 32
    got = svd.block_krylov_svd(w, r, jax.random.split(jax.random.key(0), 2))
    full = svd.exact_svd(w, r)
    for i, x in enumerate((steep, flat)):
        *_, best = _numpy_truncation(jnp.asarray(x, jnp.float32), r)
        mine = _error(x, *(g[i] for g in got)) / best
        exact = _error(x, *(f[i] for f in full)) / best
        assert mine <= max(exact, 1.0) * (1 + 2e-4), (i, mine, exact)
