"""The LoRA-XS term against numpy: factored (forward) and dense (merge), with stack axes and
several input/output axes."""

import numpy as np
import pytest

from loraxs_jax import delta


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_factored_term_equals_numpy(rng):
    x = rng.normal(size=(2, 5, 3, 4)).astype(np.float32)         # contracted axes (2, 3) of x
    a = rng.normal(size=(3, 4, 6)).astype(np.float32)            # A (*in=(3, 4), r=6)
    r = rng.normal(size=(6, 6)).astype(np.float32)
    b = rng.normal(size=(6, 7, 2)).astype(np.float32)            # B (r, *out=(7, 2))
    got = delta.loraxs_delta(x, a, r, b, np.float32(0.5), x_axes=(2, 3))
    want = 0.5 * np.einsum("ptij,ijr,rs,sok->ptok", x, a, r, b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dense_term_and_merged_kernel_equal_numpy(rng):
    a = rng.normal(size=(3, 8, 4)).astype(np.float32)     # 3 stacked matrices, in 8, r 4
    r = rng.normal(size=(3, 4, 4)).astype(np.float32)
    b = rng.normal(size=(3, 4, 2, 5)).astype(np.float32)  # out axes (2, 5)
    scale = np.array([1.0, 2.0, 0.5], np.float32)
    dw = delta.delta_weight(a, r, b, scale)
    want = np.einsum("kir,krs,ksoq->kioq", a, r * scale[:, None, None], b)
    assert dw.shape == (3, 8, 2, 5)
    np.testing.assert_allclose(dw, want, rtol=1e-5, atol=1e-5)
    w = rng.normal(size=(3, 8, 2, 5)).astype(np.float32)
    np.testing.assert_allclose(delta.merged_kernel(w, a, r, b, scale), w + want, atol=1e-5)
    np.testing.assert_allclose(delta.merged_kernel(w, a, r, b, scale, sign=-1.0), w - want,
                               atol=1e-5)
