"""apply / count / find_targets: shapes, purity, the init variants against numpy, bad input."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

import loraxs_jax as lx


def _params(seed=0, shapes=None):
    rng = np.random.default_rng(seed)
    shapes = shapes or {"q": (24, 16), "v": (24, 16), "o": (16, 24)}
    return {"layer": {k: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32),
                          "bias": jnp.zeros(s[-1])} for k, s in shapes.items()}}


CFG = lx.LoraXSConfig(rank=4, alpha=8.0, targets=(r"(q|v|o)/kernel$",))


def test_apply_inserts_leaves_and_is_pure():
    p = _params()
    before = jax.tree_util.tree_structure(p)
    ap = lx.apply(p, CFG, jax.random.key(1))
    assert jax.tree_util.tree_structure(p) == before           # input untouched
    for k in ("q", "v", "o"):
        node = ap["layer"][k]
        assert node["kernel"] is p["layer"][k]["kernel"]       # same array, not a copy
        m, n = p["layer"][k]["kernel"].shape
        assert node["kernel_loraxs_A"].shape == (m, 4)
        assert node["kernel_loraxs_B"].shape == (4, n)
        assert node["kernel_loraxs_R"].shape == (4, 4)
        assert float(node["kernel_loraxs_scale"]) == 8.0 / 4
    c = lx.count(ap, CFG)
    assert c["R"] == 3 * 16 and c["adapted_matrices"] == 3 and c["adapter_bytes"] == 3 * 16 * 4


def test_svd_init_is_numpy_rank_r_approximation():
    p = _params(1)
    ap = lx.apply(p, CFG, 0)
    for k in ("q", "v", "o"):
        w = np.asarray(p["layer"][k]["kernel"], np.float64)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        a, b = ap["layer"][k]["kernel_loraxs_A"], ap["layer"][k]["kernel_loraxs_B"]
        np.testing.assert_allclose(a @ b, (u[:, :4] * s[:4]) @ vt[:4], atol=1e-5)
        np.testing.assert_allclose(b @ b.T, np.eye(4), atol=1e-5)       # B = V_rᵀ orthonormal
        np.testing.assert_allclose(np.linalg.norm(a, axis=0), s[:4], rtol=1e-5)   # A = U_r Σ_r


@pytest.mark.parametrize("init", ["svd_no_sigma", "svd_bottom", "random", "svd_random"])
def test_init_variants(init):
    p = _params(2)
    ap = lx.apply(p, lx.LoraXSConfig(rank=4, targets=("q/kernel$",), init=init), 0)
    w = np.asarray(p["layer"]["q"]["kernel"], np.float64)
    a = np.asarray(ap["layer"]["q"]["kernel_loraxs_A"], np.float64)
    b = np.asarray(ap["layer"]["q"]["kernel_loraxs_B"], np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    if init == "svd_no_sigma":
        np.testing.assert_allclose(a.T @ a, np.eye(4), atol=1e-5)       # A = U_r
        np.testing.assert_allclose(a * s[:4] @ b, (u[:, :4] * s[:4]) @ vt[:4], atol=1e-5)
    elif init == "svd_bottom":
        np.testing.assert_allclose(np.linalg.norm(a, axis=0), s[-4:], rtol=1e-5)
        np.testing.assert_allclose(a @ b, (u[:, -4:] * s[-4:]) @ vt[-4:], atol=1e-5)
    elif init == "random":   # Kaiming-uniform as torch nn.Linear: bounds 1/sqrt(fan_in)
        assert np.abs(a).max() <= 1 / math.sqrt(24) and np.abs(b).max() <= 1 / math.sqrt(4)
        assert np.abs(a).max() > 0.8 / math.sqrt(24) and a.std() > 0.1
        # random bases are not W's singular subspace
        assert np.linalg.svd(u[:, :4].T @ np.linalg.qr(a)[0], compute_uv=False).min() < 0.9
    else:  # svd_random: an orthonormal SVD basis, but of a random matrix, not of W
        np.testing.assert_allclose(b @ b.T, np.eye(4), atol=1e-5)
        an = a / np.linalg.norm(a, axis=0)
        np.testing.assert_allclose(an.T @ an, np.eye(4), atol=1e-5)
        assert np.linalg.svd(u[:, :4].T @ an, compute_uv=False).min() < 0.9
        assert 0.3 < np.linalg.norm(a, axis=0)[0] / s[0] < 3   # scaled like W


def test_r_init_statistics_and_seed():
    p = _params(3, {"q": (64, 64)})
    cfg = lx.LoraXSConfig(rank=32, targets=("q/kernel$",))
    r1 = lx.apply(p, cfg, jax.random.key(0))["layer"]["q"]["kernel_loraxs_R"]
    r2 = lx.apply(p, cfg, jax.random.key(0))["layer"]["q"]["kernel_loraxs_R"]
    r3 = lx.apply(p, cfg, jax.random.key(1))["layer"]["q"]["kernel_loraxs_R"]
    assert np.array_equal(r1, r2) and not np.array_equal(r1, r3)
    assert 0.9e-5 < float(jnp.std(r1)) < 1.1e-5 and abs(float(jnp.mean(r1))) < 1e-6
    assert r1.dtype == jnp.float32


def test_per_target_rank_stacked_and_dense_general():
    rng = np.random.default_rng(4)
    p = {"attn": {"kernel": jnp.asarray(rng.normal(size=(16, 4, 8)), jnp.float32)},  # (in, H, D)
         "scan": {"mlp": {"kernel": jnp.asarray(rng.normal(size=(3, 16, 32)), jnp.float32)}}}
    cfg = lx.LoraXSConfig(rank={"attn": 4, "mlp": 6}, targets=("attn/kernel$", "mlp/kernel$"),
                          in_axes={"attn": 1}, stacked_axes={"scan/": 1})
    ap = lx.apply(p, cfg, 0)
    assert ap["attn"]["kernel_loraxs_A"].shape == (16, 4)
    assert ap["attn"]["kernel_loraxs_B"].shape == (4, 4, 8)
    assert ap["scan"]["mlp"]["kernel_loraxs_A"].shape == (3, 16, 6)
    assert ap["scan"]["mlp"]["kernel_loraxs_R"].shape == (3, 6, 6)
    assert lx.count(ap)["R"] == 16 + 3 * 36
    # each stacked matrix has its own SVD
    w = np.asarray(p["scan"]["mlp"]["kernel"])
    for i in range(3):
        u, s, vt = np.linalg.svd(w[i], full_matrices=False)
        ab = ap["scan"]["mlp"]["kernel_loraxs_A"][i] @ ap["scan"]["mlp"]["kernel_loraxs_B"][i]
        np.testing.assert_allclose(ab, (u[:, :6] * s[:6]) @ vt[:6], atol=1e-4)
    # the DenseGeneral kernel is the (16, 32) matrix
    u, s, vt = np.linalg.svd(np.asarray(p["attn"]["kernel"]).reshape(16, 32), full_matrices=False)
    ab = ap["attn"]["kernel_loraxs_A"] @ ap["attn"]["kernel_loraxs_B"].reshape(4, 32)
    np.testing.assert_allclose(ab, (u[:, :4] * s[:4]) @ vt[:4], atol=1e-4)


def test_randomized_method_close_to_exact_and_seeded():
    p = _params(5, {"q": (96, 64)})
    ex = lx.apply(p, lx.LoraXSConfig(rank=8, targets=("q/kernel$",)), 0)["layer"]["q"]
    cfg = lx.LoraXSConfig(rank=8, targets=("q/kernel$",), svd_method="randomized",
                          power_iters=6)
    rd = lx.apply(p, cfg, 0)["layer"]["q"]
    rd2 = lx.apply(p, cfg, 1)["layer"]["q"]
    assert np.array_equal(rd["kernel_loraxs_A"], rd2["kernel_loraxs_A"])  # bases ignore rng
    w = np.asarray(p["layer"]["q"]["kernel"])
    err = lambda n: np.linalg.norm(w - n["kernel_loraxs_A"] @ n["kernel_loraxs_B"])
    assert err(rd) < err(ex) * 1.02


def test_eval_shape_counts_without_weights():
    shapes = {f"layer_{i}": {k: {"kernel": jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)}
                             for k in ("q_proj", "o_proj")} for i in range(4)}
    cfg = lx.LoraXSConfig(rank=64, targets=(r"(q|o)_proj/kernel$",))
    abstract = jax.eval_shape(lambda p: lx.apply(p, cfg, 0), shapes)
    c = lx.count(abstract)
    assert c["R"] == 8 * 64 * 64 and c["adapted_matrices"] == 8
    assert abstract["layer_0"]["q_proj"]["kernel_loraxs_A"].dtype == jnp.bfloat16


def test_bases_dtype_and_boxed_leaves_inherit_axis_names():
    p = {"q": {"kernel": meta.Partitioned(jnp.ones((8, 6)) + jnp.eye(8, 6), names=("embed",
                                                                                "mlp"))}}
    ap = lx.apply(p, lx.LoraXSConfig(rank=2, targets=("q/kernel$",), bases_dtype="bfloat16"), 0)
    assert ap["q"]["kernel_loraxs_A"].names == ("embed", None)
    assert ap["q"]["kernel_loraxs_B"].names == (None, "mlp")
    assert ap["q"]["kernel_loraxs_R"].names == (None, None)
    assert ap["q"]["kernel_loraxs_A"].value.dtype == jnp.bfloat16
    unboxed = nn.meta.unbox(ap)
    assert unboxed["q"]["kernel_loraxs_R"].dtype == jnp.float32


def test_sharded_kernel_gives_adapters_the_derived_sharding():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    w = jax.device_put(jnp.asarray(np.random.default_rng(6).normal(size=(16, 32)), jnp.float32),
                       NamedSharding(mesh, P("data", "model")))
    ap = lx.apply({"q": {"kernel": w}}, lx.LoraXSConfig(rank=4, targets=("q/kernel$",)), 0)
    assert ap["q"]["kernel_loraxs_A"].sharding.spec == P("data", None)
    assert ap["q"]["kernel_loraxs_B"].sharding.spec == P(None, "model")
    assert ap["q"]["kernel_loraxs_R"].sharding.spec == P(None, None)


@pytest.mark.parametrize("bad,match", [
    (dict(rank=20), r"rank 20 exceeds min\(in, out\)=16 for layer/q/kernel"),
    (dict(targets=("nope/kernel$",)), r"matched no kernel.*layer/q/kernel"),
    (dict(targets=("q/kernel$", "zzz")), r"target patterns \['zzz'\] matched no kernel"),
    (dict(targets=("q/bias",)), r"matched only 1-D params"),
])
def test_bad_input_names_the_culprit(bad, match):
    kw = dict(rank=4, targets=("q/kernel$",)) | bad
    with pytest.raises(ValueError, match=match):
        lx.apply(_params(), lx.LoraXSConfig(**kw), 0)


def test_bad_config_and_trees():
    with pytest.raises(ValueError, match="unknown init 'kaiming'; choose one of svd"):
        lx.LoraXSConfig(targets=("q",), init="kaiming")
    with pytest.raises(ValueError, match="targets is empty"):
        lx.LoraXSConfig()
    with pytest.raises(ValueError, match="bad regex"):
        lx.LoraXSConfig(targets=("q(",))
    p = _params()
    p["layer"]["v"]["kernel"] = p["layer"]["v"]["kernel"].at[3, 2].set(jnp.nan)
    with pytest.raises(ValueError, match=r"NaN or Inf.*layer/v/kernel"):
        lx.apply(p, CFG, 0)
    ap = lx.apply(_params(), CFG, 0)
    with pytest.raises(ValueError, match="already carry LoRA-XS leaves"):
        lx.apply(ap, CFG, 0)
    p3 = {"attn": {"kernel": jnp.ones((4, 2, 3))}}
    with pytest.raises(ValueError, match=r"attn/kernel has shape \(4, 2, 3\).*in_axes"):
        lx.apply(p3, lx.LoraXSConfig(rank=2, targets=("attn",)), 0)
