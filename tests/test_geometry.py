"""Geometry: how a kernel of any shape is viewed as matrices, and how A and B are stored (compact
when standard, W's own axes otherwise); ΔW against numpy for every layout."""

import numpy as np
import pytest

from loraxs_jax.geometry import Geometry

CASES = [((6, 4), "io"), ((6, 4), "oi"), ((3, 5, 4), "oio"), ((2, 3, 5, 4), "soio"),
         ((3, 4, 5), "sio"), ((4, 3, 5), "ios"), ((2, 3, 4, 5), "iioo"), ((3, 2, 5), "sio")]


@pytest.mark.parametrize("shape,roles", CASES)
def test_store_is_self_describing_and_delta_equals_numpy(shape, roles):
    rng = np.random.default_rng(len(roles))
    g = Geometry.from_roles(shape, roles)
    assert g.roles == roles and g.standard == (roles in ("io", "sio", "iioo"))
    rank = 2
    c = g.canonical_shapes(rank)
    f32 = lambda x: x.astype(np.float32)  # noqa: E731  (jax computes in float32)
    a, b = f32(rng.normal(size=c["A"])), f32(rng.normal(size=c["B"]))
    r, s = f32(rng.normal(size=c["R"])), f32(rng.uniform(0.5, 2, size=c["scale"]))
    sa, sb = g.store(a, b)
    assert (sa.shape, sb.shape) == (g.stored_shapes(rank)["A"], g.stored_shapes(rank)["B"])
    if not g.standard:       # W's axes stay in place: the stored leaves have W's rank + 1
        assert sa.ndim == sb.ndim == len(shape) + 1
    assert Geometry.from_leaves(shape, sa.shape, sb.shape, r.shape) == g
    ca, cb = g.canonical(sa, sb)
    np.testing.assert_array_equal(ca, a)
    np.testing.assert_array_equal(cb, b)
    # ΔW in W's own axis order: per stack index, s·A·R·B of the (m, n) matrix view
    n = g.count
    mats = np.einsum("kir,krs,k,kso->kio", a.reshape(n, g.m, rank), r.reshape(n, rank, rank),
                     s.reshape(n), b.reshape(n, rank, g.n))
    want = np.transpose(mats.reshape(g.sizes(g.stack) + g.sizes(g.inputs) + g.sizes(g.outputs)),
                        np.argsort(g.stack + g.inputs + g.outputs))
    np.testing.assert_allclose(g.delta(sa, r, sb, s), want, rtol=1e-5, atol=1e-5)
    w = f32(rng.normal(size=shape))
    got = np.asarray(g.matrices(w))
    assert got.shape == (n, g.m, g.n)
    np.testing.assert_array_equal(
        got, np.transpose(w, g.stack + g.inputs + g.outputs).reshape(n, g.m, g.n))


def test_constructors_and_size1_axes():
    assert Geometry.leading((3, 4, 5), 1, 1) == Geometry.from_roles((3, 4, 5), "sio")
    g = Geometry.make((2, 1, 5), stack=(0,), inputs=(1,))   # a size-1 input axis stays the input
    assert g.roles == "sio" and (g.m, g.n, g.count) == (1, 5, 2)
    assert Geometry.make((4, 1, 5), stack=(), inputs=(0, 1)).roles == "ioo"   # size 1: output
    with pytest.raises(ValueError, match=r"roles 'ix' do not describe a kernel of shape \(3, 4\)"):
        Geometry.from_roles((3, 4), "ix")
    assert "as oio" in str(Geometry.from_roles((3, 5, 4), "oio"))
