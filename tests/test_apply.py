"""apply / count: leaves inserted beside the kernels, purity, R's init, abstract trees, boxes and
shardings."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

import loraxs_jax as lx

CFG = lx.LoraXSConfig(rank=4, alpha=8.0, targets=(r"(q|v|o)/kernel$",))


def test_apply_inserts_leaves_and_is_pure(small_params):
    p = small_params()
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


def test_r_init_statistics_and_seed(small_params):
    p = small_params(3, {"q": (64, 64)})
    cfg = lx.LoraXSConfig(rank=32, targets=("q/kernel$",))
    r1 = lx.apply(p, cfg, jax.random.key(0))["layer"]["q"]["kernel_loraxs_R"]
    r2 = lx.apply(p, cfg, jax.random.key(0))["layer"]["q"]["kernel_loraxs_R"]
    r3 = lx.apply(p, cfg, jax.random.key(1))["layer"]["q"]["kernel_loraxs_R"]
    assert np.array_equal(r1, r2) and not np.array_equal(r1, r3)
    assert 0.9e-5 < float(jnp.std(r1)) < 1.1e-5 and abs(float(jnp.mean(r1))) < 1e-6
    assert r1.dtype == jnp.float32


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


def test_bad_config_and_trees(small_params):
    with pytest.raises(ValueError, match="init='kaiming': unknown; choose one of svd"):
        lx.LoraXSConfig(targets=("q",), init="kaiming")
    with pytest.raises(ValueError, match="targets is empty"):
        lx.LoraXSConfig()
    with pytest.raises(ValueError, match="bad regex"):
        lx.LoraXSConfig(targets=("q(",))
    p = small_params()
    p["layer"]["v"]["kernel"] = p["layer"]["v"]["kernel"].at[3, 2].set(jnp.nan)
    with pytest.raises(ValueError, match=r"NaN or Inf.*layer/v/kernel"):
        lx.apply(p, CFG, 0)
    ap = lx.apply(small_params(), CFG, 0)
    with pytest.raises(ValueError, match="already carry LoRA-XS leaves"):
        lx.apply(ap, CFG, 0)
    p3 = {"attn": {"kernel": jnp.ones((4, 2, 3))}}
    with pytest.raises(ValueError, match=r"attn/kernel has shape \(4, 2, 3\).*in_axes"):
        lx.apply(p3, lx.LoraXSConfig(rank=2, targets=("attn",)), 0)
