"""svd.py against numpy's SVD."""

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


def test_bottom_and_batched():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(3, 20, 12)).astype(np.float32)
    u, s, vt = svd.exact_svd(jnp.asarray(w), 4, bottom=True)
    for i in range(3):
        sn = np.linalg.svd(w[i], compute_uv=False)
        np.testing.assert_allclose(s[i], sn[-4:], rtol=1e-5)
        ui, si, vti = svd.exact_svd(jnp.asarray(w[i]), 4, bottom=True)
        np.testing.assert_allclose(u[i], ui, atol=1e-5)
    with pytest.raises(ValueError, match="unknown svd method"):
        svd.truncated_svd(jnp.asarray(w[0]), 2, method="lanczos")


def test_float32_whatever_the_input_dtype():
    w = jnp.asarray(np.random.default_rng(4).normal(size=(16, 8)), jnp.bfloat16)
    u, s, vt = svd.truncated_svd(w, 3)
    assert u.dtype == s.dtype == vt.dtype == jnp.float32
