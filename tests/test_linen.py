"""wrap: the adapted forward of linen models we did not write (flax's own attention, DenseGeneral,
nn.scan) against an independent numpy computation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraxs_jax as lx


class Block(nn.Module):
    """A pre-LN transformer block built from flax's own modules (MultiHeadDotProductAttention
    uses DenseGeneral with (in, heads, head_dim) and (heads, head_dim, out) kernels)."""

    d: int = 32
    heads: int = 4

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(self.heads, name="attn")(h, h)
        h = nn.LayerNorm(name="ln2")(x)
        h = nn.Dense(4 * self.d, name="up")(h)
        return x + nn.Dense(self.d, name="down")(nn.gelu(h))


BLOCK_CFG = dict(targets=(r"attn/(query|value|out)/kernel$", r"(up|down)/kernel$"),
                 in_axes={r"attn/out/": 2, r"attn/": 1})


def _block():
    m = Block()
    x = jax.random.normal(jax.random.key(0), (2, 7, 32))
    return m, m.init(jax.random.key(1), x)["params"], x


def test_zero_R_equals_base_exactly():
    m, p, x = _block()
    ap = lx.apply(p, lx.LoraXSConfig(rank=4, r_std=0.0, **BLOCK_CFG), 0)
    assert np.array_equal(lx.wrap(m.apply)({"params": ap}, x), m.apply({"params": p}, x))


def test_dense_matches_numpy_reference():
    rng = np.random.default_rng(0)
    m = nn.Dense(24)
    x = rng.normal(size=(3, 5, 16)).astype(np.float32)
    p = m.init(jax.random.key(0), x)["params"]
    ap = lx.apply(p, lx.LoraXSConfig(rank=6, alpha=12.0, targets=("kernel",), r_std=0.3), 1)
    y = lx.wrap(m.apply)({"params": ap}, x)
    f64 = lambda k: np.asarray(ap[k], np.float64)
    ref = x @ f64("kernel") + f64("bias") + 2.0 * (x @ f64("kernel_loraxs_A")
                                                  @ f64("kernel_loraxs_R") @ f64("kernel_loraxs_B"))
    np.testing.assert_allclose(y, ref, atol=2e-5)
    assert np.abs(ref - (x @ f64("kernel") + f64("bias"))).max() > 1e-2   # the term is real
    np.testing.assert_allclose(m.apply({"params": lx.merge(ap)}, x), y, atol=2e-5)


def test_third_party_block_adapted_and_merged():
    m, p, x = _block()
    ap = lx.apply(p, lx.LoraXSConfig(rank=4, r_std=0.5, **BLOCK_CFG), 2)
    assert ap["attn"]["out"]["kernel_loraxs_A"].shape == (4, 8, 4)     # (heads, head_dim, r)
    y = jax.jit(lx.wrap(m.apply))({"params": ap}, x)
    y0 = m.apply({"params": p}, x)
    assert np.abs(y - y0).max() > 1e-3
    merged = lx.merge(ap)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(p)
    np.testing.assert_allclose(m.apply({"params": merged}, x), y, atol=1e-5)


def test_dense_general_matches_numpy():
    rng = np.random.default_rng(1)
    m = nn.DenseGeneral((3, 5), axis=(-2, -1))
    x = rng.normal(size=(2, 4, 6)).astype(np.float32)
    p = m.init(jax.random.key(0), x)["params"]
    ap = lx.apply(p, lx.LoraXSConfig(rank=3, alpha=3.0, targets=("kernel",), in_axes=2,
                                     r_std=0.2), 0)
    y = lx.wrap(m.apply)({"params": ap}, x)
    w = np.asarray(p["kernel"], np.float64).reshape(24, 15)
    a = np.asarray(ap["kernel_loraxs_A"], np.float64).reshape(24, 3)
    b = np.asarray(ap["kernel_loraxs_B"], np.float64).reshape(3, 15)
    xf = x.reshape(2, 24)
    ref = xf @ w + np.asarray(p["bias"]).reshape(15) + xf @ a @ np.asarray(
        ap["kernel_loraxs_R"], np.float64) @ b
    np.testing.assert_allclose(np.asarray(y).reshape(2, 15), ref, atol=2e-5)


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        class Layer(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return h + nn.Dense(h.shape[-1], name="mlp")(jnp.tanh(h)), None

        stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=3)
        return stack(name="layers")(x, None)[0]


def test_scanned_layers_with_stacked_axes():
    m = Scanned()
    x = jax.random.normal(jax.random.key(0), (2, 8))
    p = m.init(jax.random.key(1), x)["params"]
    assert p["layers"]["mlp"]["kernel"].shape == (3, 8, 8)
    cfg = lx.LoraXSConfig(rank=2, targets=("mlp/kernel$",), stacked_axes=1, r_std=0.5)
    ap = lx.apply(p, cfg, 0)
    y = lx.wrap(m.apply)({"params": ap}, x)
    # reference: unrolled numpy with each layer's own A, R, B
    h = np.asarray(x, np.float64)
    n = {k: np.asarray(v, np.float64) for k, v in ap["layers"]["mlp"].items()}
    for i in range(3):
        t = np.tanh(h)
        h = h + t @ n["kernel"][i] + n["bias"][i] + n["kernel_loraxs_scale"][i] * (
            t @ n["kernel_loraxs_A"][i] @ n["kernel_loraxs_R"][i] @ n["kernel_loraxs_B"][i])
    np.testing.assert_allclose(y, h, atol=1e-5)
    np.testing.assert_allclose(m.apply({"params": lx.merge(ap)}, x), y, atol=1e-5)


def test_unsupported_module_is_refused_not_densified():
    m = nn.Einsum((4, 6), "ab,bc->ac")
    x = jnp.ones((3, 4))
    p = m.init(jax.random.key(0), x)["params"]
    ap = lx.apply(p, lx.LoraXSConfig(rank=2, targets=("kernel",)), 0)
    with pytest.raises(NotImplementedError, match="Einsum holding LoRA-XS params"):
        lx.wrap(m.apply)({"params": ap}, x)
