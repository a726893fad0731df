"""Op-level adaptation (intercept.py): wrap, discover and replay on models we did not write.

Every path asserts against an independent numpy computation: R = 0 gives the base output bit for
bit; random R gives the adapted output equal to the model run on W + s·A·R·B merged in float64
(1e-5, float32); the gradient reaches every R and nothing else; the count is r² per matrix.
Engine tests (discover/replay on plain functions: jit, scan, remat, while, cond, custom
derivatives, vmap) follow the library-level ones; errors are never silent.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import loraxs_jax as lx
from loraxs_jax import intercept as ic
from loraxs_jax.apply import adapted_geometries
from loraxs_jax.geometry import Geometry


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


# ----------------------------------------------------------------------------- library-level paths
KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(1), (2, 3))
X3 = jax.random.normal(jax.random.key(2), (2, 5, 3))


def numpy_merged(adapted):
    """The adapted tree merged in float64 numpy from its stored leaves and their roles (an
    independent computation of W + s·A·R·B in W's own axis order)."""
    out = {}
    kernels = lx.tree.adapted_kernels(adapted)
    geoms = adapted_geometries(adapted)
    for path, leaf in lx.tree.flatten(adapted).items():
        if lx.tree.leaf_role(path[-1]):
            continue
        if path not in kernels:
            out[path] = leaf
            continue
        d, g = kernels[path], geoms[lx.tree.path_str(path)]
        a, b, r, sc = (np.asarray(d[k], np.float64) for k in ("A", "B", "R", "scale"))
        w = np.asarray(leaf, np.float64)
        letters = "abcdefghij"[:w.ndim]
        sub = {x: letters[x] for x in range(w.ndim)}
        a_sub = "".join(sub[x] for x in range(w.ndim)) + "y" if not g.standard else "".join(
            sub[x] for x in g.stack + g.inputs) + "y"
        b_sub = "z" + "".join(sub[x] for x in range(w.ndim)) if not g.standard else "".join(
            sub[x] for x in g.stack) + "z" + "".join(sub[x] for x in g.outputs)
        st = "".join(sub[x] for x in g.stack)
        if not g.standard:   # the kept size-1 axes broadcast; squeeze them through einsum sums
            a = a.reshape(tuple(w.shape[x] if x in g.stack + g.inputs else 1
                                for x in range(w.ndim)) + (a.shape[-1],))
        delta = np.einsum(f"{a_sub},{st}yz,{st},{b_sub}->{letters}", a, r, sc, b)
        out[path] = jnp.asarray(w + delta, leaf.dtype)
    return lx.tree.unflatten(out)


def check_path(fn, params, x, targets, roles, rank=2, tol=1e-5):
    """apply(forward=...) reads ``roles`` ({path: roles}); then the four assertions above."""
    cfg = lx.LoraXSConfig(rank=rank, targets=targets, r_std=0.5)
    forward = lambda p: fn(p, x)  # noqa: E731
    adapted = lx.apply(params, cfg, 1, forward=forward)
    assert {k: g.roles for k, g in adapted_geometries(adapted).items()} == roles
    zero = lx.apply(params, dataclasses.replace(cfg, r_std=0.0), 1, forward=forward)
    np.testing.assert_array_equal(lx.wrap(fn)(zero, x), fn(params, x))
    y = jax.jit(lx.wrap(fn))(adapted, x)
    assert np.abs(np.asarray(y) - np.asarray(fn(params, x))).max() > 1e-3      # R matters
    np.testing.assert_allclose(y, fn(numpy_merged(adapted), x), rtol=tol, atol=tol)
    np.testing.assert_allclose(y, fn(lx.merge(adapted), x), rtol=tol, atol=tol)
    trainable, frozen = lx.split(adapted, cfg)
    grads = jax.grad(lambda t: jnp.sum(jnp.sin(lx.wrap(fn)(lx.combine(t, frozen), x))))(trainable)
    flat = lx.tree.flatten(grads)
    assert all(lx.tree.leaf_role(p[-1])[1] == "R" for p in flat) and len(flat) == len(roles)
    assert all(np.abs(g).max() > 0 for g in flat.values())
    matrices = sum(g.count for g in adapted_geometries(adapted).values())
    assert lx.count(adapted)["R"] == rank * rank * matrices
    return adapted


def linen_fn(module, x):
    params = module.init(KEY, x)["params"]
    return (lambda p, x: module.apply({"params": p}, x)), params


class GemmaEinsum(nn.Module):
    """gemma's attention projection: a param named ``w`` used through ``jnp.einsum``, the
    contracted axis in the middle."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(1.0), (2, 3, 4))
        return jnp.einsum("BTD,NDH->BTNH", x, w)


class HandDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(jnp.dot(x, self.param("kernel", nn.initializers.normal(1.0), (3, 4))))


class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
        d = nn.Dense(3)
        return d(jnp.tanh(d(x)))


def test_gemma_style_einsum_param_w():
    fn, p = linen_fn(GemmaEinsum(), X3)
    ad = check_path(fn, p, X3, ("w$",), {"w": "oio"})
    assert ad["w_loraxs_A"].shape == (1, 3, 1, 2) and ad["w_loraxs_B"].shape == (2, 2, 1, 4)


def test_flax_nn_einsum():
    fn, p = linen_fn(nn.Einsum((2, 3, 4), "BTD,NDH->BTNH"), X3)
    check_path(fn, p, X3, ("kernel$",), {"kernel": "oio"})


def test_hand_written_dense():
    fn, p = linen_fn(HandDense(), X)
    ad = check_path(fn, p, X, ("kernel$",), {"kernel": "io"})
    assert ad["kernel_loraxs_A"].shape == (3, 2)            # standard: the compact layout


def test_torch_layout_x_at_w_transposed():
    p = {"W": jax.random.normal(KEY, (4, 3)), "V": jax.random.normal(KEY, (5, 4))}
    check_path(lambda p, x: (p["V"] @ (x @ p["W"].T).T).T, p, X, ("W$", "V$"),
               {"W": "oi", "V": "oi"})


def test_shared_dense_called_twice():
    fn, p = linen_fn(Shared(), X)
    check_path(fn, p, X, ("kernel$",), {"Dense_0/kernel": "io"})


def test_dense_general_without_in_axes():
    x = jax.random.normal(KEY, (2, 5, 3, 4))
    fn, p = linen_fn(nn.DenseGeneral((2, 6), axis=(-2, -1)), x)
    check_path(fn, p, x, ("kernel$",), {"kernel": "iioo"})


def test_mixed_precision_bf16_compute_f32_params():
    fn, p = linen_fn(nn.Dense(4, dtype=jnp.bfloat16), X)
    adapted = lx.apply(p, lx.LoraXSConfig(rank=2, targets=("kernel",), r_std=0.5), 0,
                       forward=lambda q: fn(q, X))
    y = lx.wrap(fn)(adapted, X)
    assert y.dtype == jnp.bfloat16
    want = fn(numpy_merged(adapted), X)
    assert np.linalg.norm(np.asarray(y, np.float32) - np.asarray(want, np.float32)) < 1e-2 * \
        np.linalg.norm(np.asarray(want, np.float32))
    text = str(jax.make_jaxpr(lx.wrap(fn))(adapted, X))   # the term runs in bf16, like W·x
    assert "bf16[3,2]" in text and "bf16[2,4]" in text


class JitModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.jit(nn.Dense)(4, name="d")(x))


@pytest.mark.parametrize("adapted_first", [False, True])
def test_nn_jit_cache_cannot_leak(adapted_first):
    """gemma's Transformer runs under nn.jit, which caches traces: plain and adapted calls in
    either order each give their own result, eager and under jax.jit."""
    model = JitModel()
    v = model.init(KEY, X)
    adapted = lx.apply(v["params"], lx.LoraXSConfig(rank=2, targets=("kernel",), r_std=0.5), 0)
    want_plain = np.tanh(np.asarray(X) @ np.asarray(v["params"]["d"]["kernel"])
                         + np.asarray(v["params"]["d"]["bias"]))
    want_adapted = model.apply({"params": numpy_merged(adapted)}, X)
    calls = [("adapted", lambda: lx.wrap(model.apply)({"params": adapted}, X)),
             ("plain", lambda: model.apply(v, X))]
    for name, call in (calls if adapted_first else calls[::-1]) * 2:
        want = want_adapted if name == "adapted" else want_plain
        np.testing.assert_allclose(call(), want, rtol=1e-5, atol=1e-5, err_msg=name)
    for _ in range(2):
        np.testing.assert_allclose(jax.jit(lx.wrap(model.apply))({"params": adapted}, X),
                                   want_adapted, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(jax.jit(model.apply)(v, X), want_plain, rtol=1e-5, atol=1e-5)


def test_never_silent_elementwise_use_and_untouched_target():
    p = {"w": jnp.ones((3, 3)), "k": jnp.ones((3, 3)), "unused": jnp.ones((3, 3))}
    cfg = lx.LoraXSConfig(rank=1, targets=("w$",))
    with pytest.raises(ic.AdaptError, match=r"'w' reaches `mul`"):      # x * w: not adaptable
        lx.apply(p, cfg, forward=lambda q: (X @ q["k"]) @ (2.0 * q["w"]))
    adapted = lx.apply(p, cfg)                                           # 2-D: no trace needed
    with pytest.raises(ic.AdaptError, match=r"'w' reaches `mul`"):
        lx.wrap(lambda q, x: (x @ q["k"]) @ (2.0 * q["w"]))(adapted, X)
    with pytest.raises(ic.AdaptError, match=r"\['w'\] are never consumed"):
        lx.wrap(lambda q, x: x @ q["k"])(adapted, X)                     # the forward never uses w
    with pytest.raises(ic.AdaptError, match=r"\['unused'\] are never consumed"):
        lx.apply(p, lx.LoraXSConfig(rank=1, targets=("w$", "unused")),
                 forward=lambda q: X @ q["w"])
    with pytest.raises(ic.AdaptError, match="hold no LoRA-XS leaves"):
        lx.wrap(lambda q, x: x @ q["w"])(p, X)                           # base params: no-op


def test_geometry_mismatch_is_named():
    p = {"W": jax.random.normal(KEY, (3, 3))}
    adapted = lx.apply(p, lx.LoraXSConfig(rank=1, targets=("W",)))      # assumed (in, out)
    with pytest.raises(ic.AdaptError, match=r"param 'W': its LoRA-XS bases were built for .* "
                                            r"io .* contracts it as .* oi.*forward="):
        lx.wrap(lambda q, x: x @ q["W"].T)(adapted, X)


def test_gemma_style_stacked_kv_with_stacked_axes():
    """k and v in one weight (2, K, D, H) contracting D: stacked_axes=1 makes them two matrices,
    each with its own SVD and R."""
    p = {"kv": jax.random.normal(KEY, (2, 4, 3, 5))}
    x = jax.random.normal(KEY, (2, 6, 3))
    fn = lambda p, x: jnp.einsum("BSD,CKDH->CBSKH", x, p["kv"])  # noqa: E731
    cfg = lx.LoraXSConfig(rank=2, targets=("kv",), r_std=0.5, stacked_axes=1)
    adapted = lx.apply(p, cfg, forward=lambda q: fn(q, x))
    assert adapted_geometries(adapted)["kv"].roles == "soio"
    assert adapted["kv_loraxs_R"].shape == (2, 2, 2) and lx.count(adapted)["R"] == 8
    np.testing.assert_allclose(lx.wrap(fn)(adapted, x), fn(numpy_merged(adapted), x), atol=1e-5)


def test_scanned_layers_found_by_the_trace():
    m = Scanned()
    x = jax.random.normal(KEY, (2, 8))
    p = m.init(jax.random.key(1), x)["params"]
    ad = check_path(lambda q, x: m.apply({"params": q}, x), p, x, ("mlp/kernel$",),
                    {"layers/mlp/kernel": "sio"})
    assert ad["layers"]["mlp"]["kernel_loraxs_R"].shape == (3, 2, 2)


def test_optax_steps_on_r_lower_a_loss():
    fn, p = linen_fn(GemmaEinsum(), X3)
    cfg = lx.LoraXSConfig(rank=2, targets=("w$",))
    adapted = lx.apply(p, cfg, 0, forward=lambda q: fn(q, X3))
    target = fn(p, X3) * 1.1
    trainable, frozen = lx.split(adapted, cfg)

    def loss(t):
        return jnp.mean((lx.wrap(fn)(lx.combine(t, frozen), X3) - target) ** 2)

    tx = optax.adam(1e-2)
    state = tx.init(trainable)
    first = float(loss(trainable))
    step = jax.jit(lambda t, s: (lambda g: (optax.apply_updates(t, tx.update(g, s)[0]),
                                            tx.update(g, s)[1]))(jax.grad(loss)(t)))
    for _ in range(20):
        trainable, state = step(trainable, state)
    assert float(loss(trainable)) < 0.5 * first


# ----------------------------------------------------------------------------- engine: discover/replay
RANK = 2


def geo(shape, stack, inputs, outputs):
    g = Geometry.make(shape, stack, inputs)
    assert g.outputs == tuple(outputs)
    return g


def make_adapters(geoms, rank=RANK, seed=0, zero_r=False):
    """{path: stored A, B, R, scale} with random values (A scaled by 1/sqrt(fan-in))."""
    out = {}
    for i, (path, g) in enumerate(sorted(geoms.items())):
        ka, kb, kr, ks = jax.random.split(jax.random.fold_in(jax.random.key(seed), i), 4)
        sh = g.canonical_shapes(rank)
        a = jax.random.normal(ka, sh["A"]) / math.sqrt(g.m)
        b = jax.random.normal(kb, sh["B"])
        a, b = g.store(a, b)
        out[path] = {"A": a, "B": b,
                     "R": jnp.zeros(sh["R"]) if zero_r else 0.5 * jax.random.normal(kr, sh["R"]),
                     "scale": jax.random.uniform(ks, sh["scale"], minval=0.5, maxval=1.5)}
    return out


def np_merged(params, geoms, adapters):
    """params with every adapted W replaced by W + ΔW, ΔW from canonical bases in float64."""
    def merge(keypath, w):
        p = lx.tree.path_str(keypath)
        if p not in geoms:
            return w
        g, ad = geoms[p], adapters[p]
        a, b = (np.asarray(v, np.float64) for v in g.canonical(ad["A"], ad["B"]))
        r, s = np.asarray(ad["R"], np.float64), np.asarray(ad["scale"], np.float64)
        n, k = g.count, r.shape[-1]
        d = np.einsum("nir,nrs,n,nso->nio", a.reshape(n, g.m, k), r.reshape(n, k, k),
                      s.reshape(n), b.reshape(n, k, g.n))
        d = d.reshape(g.sizes(g.stack) + g.sizes(g.inputs) + g.sizes(g.outputs))
        d = np.transpose(d, np.argsort(g.stack + g.inputs + g.outputs))
        return jnp.asarray(np.asarray(w, np.float64) + d, w.dtype)
    return jax.tree_util.tree_map_with_path(merge, params)


def run(fn, params, ads, *args):
    return ic.replay(fn, params, ads, args)


def check(fn, params, args, expected, hints=None, tol=1e-5, rel=False):
    geoms = ic.discover(fn, params, *args, targets=set(expected), stack_hints=hints)
    assert geoms == expected
    base = fn(params, *args)
    jax.tree.map(np.testing.assert_array_equal,
                 run(fn, params, make_adapters(geoms, zero_r=True), *args), base)
    ads = make_adapters(geoms)
    got = run(fn, params, ads, *args)
    want = fn(np_merged(params, geoms, ads), *args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert not np.allclose(g, np.asarray(jax.tree.leaves(base)[0], np.float32))
        if rel:
            assert np.linalg.norm(g - w) / np.linalg.norm(w) < tol
        else:
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    jitted = jax.jit(lambda p, a, *x: run(fn, p, a, *x))(params, ads, *args)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), jitted, got)
    rs = {p: a["R"] for p, a in ads.items()}

    def loss(rs):
        outs = jax.tree.leaves(run(fn, params, {p: {**a, "R": rs[p]} for p, a in ads.items()},
                                   *args))
        return sum(jnp.sum(jnp.sin(o.astype(jnp.float32) * 3.0)) for o in outs)

    for p, g in jax.grad(loss)(rs).items():
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, p
    return ads


def linen(module, x):
    return module.apply, module.init(KEY, x)


def test_engine_dense_and_abstract_discovery():
    fn, v = linen(nn.Dense(4), X)
    expected = {"params/kernel": geo((3, 4), (), (0,), (1,))}
    check(fn, v, (X,), expected)
    abstract = jax.eval_shape(lambda: v)
    assert ic.discover(fn, abstract, jax.ShapeDtypeStruct(X.shape, X.dtype),
                       targets=set(expected)) == expected


def test_engine_batched_contraction_is_a_stack_axis():
    w = {"w": jax.random.normal(KEY, (2, 3, 4))}
    x = jax.random.normal(KEY, (5, 2, 7, 3))
    check(lambda p, x: jnp.einsum("BNTD,NDH->BNTH", x, p["w"]), w, (x,),
          {"w": geo((2, 3, 4), (0,), (1,), (2,))})


@pytest.mark.parametrize("x_batched", [True, False])
def test_engine_nn_vmap_ensemble(x_batched):
    ens = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True},
                  in_axes=0 if x_batched else None, out_axes=0, axis_size=3)
    x = jnp.stack([X, -X, 2 * X]) if x_batched else X
    fn, v = linen(ens(4), x)
    expected = {"params/kernel": geo((3, 3, 4), (0,), (1,), (2,))}
    check(fn, v, (x,), expected, hints=None if x_batched else {"params/kernel": [0]})
    if not x_batched:
        assert ic.discover(fn, v, x, targets=set(expected))["params/kernel"].stack == ()


class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(3)(x)), None


@pytest.mark.parametrize("axis", [0, 1])
def test_engine_nn_scan_keeps_the_scan(axis):
    scan = nn.scan(Layer, variable_axes={"params": axis}, split_rngs={"params": True}, length=4)

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            return scan()(x, None)[0]

    fn, v = linen(Stack(), X)
    shape = (4, 3, 3) if axis == 0 else (3, 4, 3)
    ins = (1,) if axis == 0 else (0,)
    ads = check(fn, v, (X,), {"params/ScanLayer_0/Dense_0/kernel": geo(shape, (axis,), ins,
                                                                       (2,))})
    assert "scan[" in str(jax.make_jaxpr(lambda p, a: run(fn, p, a, X))(v, ads))


def test_engine_jit_of_scan_over_remat_keeps_the_policy():
    policy = jax.checkpoint_policies.dots_saveable
    scan = nn.scan(nn.remat(Layer, policy=policy), variable_axes={"params": 0},
                   split_rngs={"params": True}, length=3)

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            return scan()(x, None)[0]

    fn, v = linen(Stack(), X)
    ads = check(jax.jit(fn), v, (X,), {"params/ScanCheckpointLayer_0/Dense_0/kernel":
                                       geo((3, 3, 3), (0,), (1,), (2,))})
    text = str(jax.make_jaxpr(lambda p, a: run(jax.jit(fn), p, a, X))(v, ads))
    assert "scan[" in text and "remat2[" in text


def test_engine_vmap_over_inputs_and_adapters():
    fn, v = linen(nn.Dense(4), X)
    geoms = ic.discover(fn, v, X, targets={"params/kernel"})
    ads = make_adapters(geoms)
    f2 = lambda v, a, x: run(fn, v, a, x)  # noqa: E731
    xs = jnp.stack([X, 2 * X])
    np.testing.assert_allclose(jax.vmap(f2, in_axes=(None, None, 0))(v, ads, xs),
                               jnp.stack([f2(v, ads, X), f2(v, ads, 2 * X)]), rtol=1e-6)
    two = jax.tree.map(lambda a, b: jnp.stack([a, b]), ads, make_adapters(geoms, seed=1))
    per = jax.vmap(f2, in_axes=(None, 0, None))(v, two, X)
    np.testing.assert_allclose(per[1], f2(v, make_adapters(geoms, seed=1), X), rtol=1e-6)


def test_engine_while_loop_kv_cache_style():
    def fn(p, x):
        w = p["w"]
        return lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)),
                              (0, x))[1]

    p = {"w": jax.random.normal(KEY, (3, 3))}
    geoms = {"w": geo((3, 3), (), (0,), (1,))}
    assert ic.discover(fn, p, X, targets={"w"}) == geoms
    ads = make_adapters(geoms)
    np.testing.assert_array_equal(run(fn, p, make_adapters(geoms, zero_r=True), X), fn(p, X))
    np.testing.assert_allclose(run(fn, p, ads, X), fn(np_merged(p, geoms, ads), X), rtol=1e-5,
                               atol=1e-5)
    assert "while[" in str(jax.make_jaxpr(lambda p, a: run(fn, p, a, X))(p, ads))
    jac = jax.jacfwd(lambda r: run(fn, p, {"w": {**ads["w"], "R": r}}, X))(ads["w"]["R"])
    assert np.abs(jac).max() > 0         # (reverse mode cannot go through while_loop)


@pytest.mark.parametrize("dynamic_bounds", [False, True])
def test_engine_fori_loop(dynamic_bounds):
    def fn(p, x, n):
        return lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ p["w"]), x)

    p = {"w": jax.random.normal(KEY, (3, 3))}
    n = jnp.int32(3) if dynamic_bounds else 3     # a Python int bound makes it a scan
    geoms = {"w": geo((3, 3), (), (0,), (1,))}
    if dynamic_bounds:
        assert ic.discover(fn, p, X, n, targets={"w"}) == geoms
        ads = make_adapters(geoms)
        np.testing.assert_allclose(run(fn, p, ads, X, n), fn(np_merged(p, geoms, ads), X, n),
                                   rtol=1e-5, atol=1e-5)
    else:
        check(fn, p, (X, n), geoms)


def test_engine_cond_custom_vjp_custom_jvp_and_transparent_ops():
    from jax.ad_checkpoint import checkpoint_name
    from jax.sharding import NamedSharding, PartitionSpec

    @jax.custom_vjp
    def mm(x, w):
        return x @ w

    mm.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))

    @jax.custom_jvp
    def mj(x, w):
        return x @ w

    mj.defjvp(lambda prim, tan: (mj(*prim), tan[0] @ prim[1] + prim[0] @ tan[1]))
    sharding = NamedSharding(jax.make_mesh((1,), ("d",)), PartitionSpec())

    def fn(p, x):
        h = lax.cond(x.sum() > 0, lambda a: a @ p["w"], lambda a: -(a @ p["w"]), x)
        u = lax.reduce_precision(jnp.copy(p["u"]), exponent_bits=8, mantissa_bits=23)
        u = lax.with_sharding_constraint(checkpoint_name(u, "u"), sharding)
        return mm(jnp.tanh(mj(h, u)), p["v"])

    p = {"w": jax.random.normal(KEY, (3, 3)), "u": jax.random.normal(KEY, (3, 3)),
         "v": jax.random.normal(KEY, (3, 2))}
    check(fn, p, (X,), {"w": geo((3, 3), (), (0,), (1,)), "u": geo((3, 3), (), (0,), (1,)),
                        "v": geo((3, 2), (), (0,), (1,))})


def test_engine_size1_reshapes():
    p = {"w": jax.random.normal(KEY, (3, 4))}

    def fn(p, x):
        w = jnp.squeeze(p["w"][None], 0).reshape(3, 1, 4)
        return jnp.einsum("bd,dxh->bxh", x, w)

    check(fn, p, (X,), {"w": geo((3, 4), (), (0,), (1,))})


def test_engine_errors_name_the_param():
    p = {"w": jnp.ones((3,)), "k": jnp.ones((3, 3)), "emb": jnp.ones((10, 3))}
    with pytest.raises(ic.AdaptError, match=r"'k' reaches `reduce_sum`"):
        ic.discover(lambda p, x: x @ p["k"] + p["k"].sum(), p, X, targets={"k"})
    with pytest.raises(ic.AdaptError, match=r"'emb' reaches `gather`"):
        ic.discover(lambda p, ids: p["emb"][ids] @ p["emb"].T, p, jnp.array([1, 2]),
                    targets={"emb"})
    with pytest.raises(ic.AdaptError, match=r"did you mean \['k'\]"):
        ic.discover(lambda p, x: x @ p["k"], p, X, targets={"kk"})
    with pytest.raises(ic.AdaptError, match=r"'k' is contracted in two different ways"):
        ic.discover(lambda p, x: x @ p["k"] + x @ p["k"].T, p, X, targets={"k"})
    g = ic.discover(lambda p, x: x @ p["k"] + (x @ p["k"]) @ p["k"], p, X, targets={"k"})
    assert g["k"] == geo((3, 3), (), (0,), (1,))          # same geometry twice: fine

    def carry(p, x):
        return lax.fori_loop(0, 2, lambda i, c: (c[0] @ c[1], c[1].T), (x, p["k"]))[0]

    with pytest.raises(ic.AdaptError, match=r"'k' reaches `scan`.*loop carry"):
        ic.discover(carry, p, X, targets={"k"})
    good = {"k": geo((3, 3), (), (0,), (1,))}
    ads = make_adapters(good)
    ads["k"]["B"] = ads["k"]["B"][:, :2]
    with pytest.raises(ic.AdaptError, match=r"the LoRA-XS leaves of 'k' have shapes"):
        run(lambda p, x: x @ p["k"], p, ads, X)


# ----------------------------------------------------------------------------- cost: the same program
def _old_interceptor(next_fun, args, kwargs, context):
    """The nn.intercept_methods mechanism loraxs-jax used before op-level interception (the
    reference program): Dense/DenseGeneral calls holding kernel_loraxs_R add the factored term."""
    module = context.module
    if context.method_name != "__call__" or not module.has_variable("params", "kernel_loraxs_R"):
        return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    a, r, b, s = (module.get_variable("params", f"kernel_loraxs_{k}")
                  for k in ("A", "R", "B", "scale"))
    axes = (-1,) if isinstance(module, nn.Dense) else tuple(np.atleast_1d(module.axis))
    dtype = module.dtype or jnp.result_type(x.dtype, a.dtype)
    axes = tuple(ax % x.ndim for ax in axes)
    h = lax.dot_general(x.astype(dtype), a.astype(dtype), ((axes, tuple(range(a.ndim - 1))),
                                                            ((), ())))
    h = h @ (r * s.astype(r.dtype)).astype(dtype)
    d = lax.dot_general(h, b.astype(dtype), (((h.ndim - 1,), (0,)), ((), ())))
    return y + d.astype(y.dtype)


def _flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_our_models_train_step_is_the_same_program(family):
    """The compiled train step (grad w.r.t. R) of our encoder and (scanned) decoder costs what
    the previous module-interception mechanism's did: FLOPs within 1%, same loss and grads."""
    from loraxs_jax.models import decoder, encoder

    if family == "encoder":
        cfg = encoder.EncoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                    intermediate_size=64, max_positions=32, num_labels=2)
        model, targets = encoder.Encoder(cfg), encoder.PAPER_TARGETS
        params = encoder.init_encoder(cfg, KEY)
        ids = jax.random.randint(KEY, (4, 16), 0, 64)
        call = lambda m_apply, p: m_apply({"params": p}, ids, jnp.ones_like(ids))  # noqa: E731
        lcfg = lx.LoraXSConfig(rank=4, targets=targets, r_std=0.1)
    else:
        cfg = decoder.DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                                    scan_layers=True)
        model = decoder.DecoderForCausalLM(cfg)
        params = decoder.init_params(cfg, KEY)
        ids = jax.random.randint(KEY, (4, 16), 0, 64)
        call = lambda m_apply, p: m_apply({"params": p}, ids)  # noqa: E731
        lcfg = lx.LoraXSConfig(rank=4, targets=decoder.PAPER_TARGETS, r_std=0.1, stacked_axes=1)
    adapted = lx.apply(params, lcfg, 0)
    trainable, frozen = lx.split(adapted, lcfg)

    def step(apply_fn):
        def loss(t, f):
            return jnp.mean(jnp.sin(call(apply_fn, lx.combine(t, f)).astype(jnp.float32)))
        return jax.value_and_grad(loss)

    def old_apply(*a, **k):
        with nn.intercept_methods(_old_interceptor):
            return model.apply(*a, **k)

    new, old = step(lx.wrap(model.apply)), step(old_apply)
    (l_new, g_new), (l_old, g_old) = new(trainable, frozen), old(trainable, frozen)
    np.testing.assert_allclose(l_new, l_old, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_new,
                 g_old)
    f_new, f_old = _flops(new, trainable, frozen), _flops(old, trainable, frozen)
    assert abs(f_new - f_old) / f_old < 0.01, (f_new, f_old)


def test_scan_kernels_with_in_axes_but_no_stacked_axes_are_named():
    """The nn.scan kernel (layers, in, out) given in_axes=1 but not stacked_axes would be SVD'd
    as one (layers, in·out) matrix; the first trace names it instead of failing obscurely."""
    m = Scanned()
    x = jax.random.normal(KEY, (2, 8))
    p = m.init(jax.random.key(1), x)["params"]
    wrong = lx.apply(p, lx.LoraXSConfig(rank=2, targets=("mlp/kernel$",), in_axes=1), 0)
    with pytest.raises(ic.AdaptError, match=r"'params/layers/mlp/kernel' is scanned over its "
                                            r"axis 0 .* built for .* ioo.*stacked_axes"):
        lx.wrap(m.apply)({"params": wrong}, x)


def test_per_row_adapters_share_a_and_b():
    """replay(rows=...): a bank of R's over one base; each batch row equals its adapter alone
    (the scanned decoder: rows meet the scan-sliced stack axes)."""
    from loraxs_jax.models import decoder as dec

    cfg = dec.DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=8, scan_layers=True)
    model, params = dec.DecoderForCausalLM(cfg), dec.init_params(cfg, KEY)
    lcfg = lx.LoraXSConfig(rank=4, targets=dec.PAPER_TARGETS, stacked_axes=1, r_std=0.3)
    adapted = [ic.adapters_of({"params": lx.apply(params, lcfg, k)}) for k in range(3)]
    base, first = adapted[0]
    bank = {p: {**a, "R": jnp.stack([ad[p]["R"] for _, ad in adapted]),
                "scale": jnp.stack([ad[p]["scale"] for _, ad in adapted])}
            for p, a in first.items()}
    ids = jax.random.randint(jax.random.key(1), (3, 6), 0, 64)
    rows = jnp.array([2, 0, 1])
    out = jax.jit(lambda b, i, r: ic.replay(model.apply, base, b, (i,), rows=r))(bank, ids, rows)
    for b, k in enumerate(rows.tolist()):
        alone = ic.replay(model.apply, base, adapted[k][1], (ids[b:b + 1],))
        np.testing.assert_allclose(out[b:b + 1], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ic.AdaptError, match=r"per-row adapters .* batch of 3 rows"):
        ic.replay(model.apply, base, bank, (ids[:2],), rows=rows)
