"""merge / unmerge: exact to float32 round-off, structure-preserving, sharding-preserving."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import loraxs_jax as lx


def _adapted(seed=0, r_std=0.1):
    rng = np.random.default_rng(seed)
    p = {"enc": {"q": {"kernel": jnp.asarray(rng.normal(size=(32, 48)), jnp.float32),
                       "bias": jnp.zeros(48)},
                 "o": {"kernel": jnp.asarray(rng.normal(size=(48, 32)), jnp.float32)}}}
    cfg = lx.LoraXSConfig(rank=5, alpha=10.0, targets=(r"(q|o)/kernel$",), r_std=r_std)
    return p, lx.apply(p, cfg, seed)


def test_merge_equals_numpy_and_keeps_structure():
    p, ap = _adapted()
    merged = lx.merge(ap)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(p)
    for k in ("q", "o"):
        n = {a: np.asarray(b, np.float64) for a, b in ap["enc"][k].items()}
        ref = n["kernel"] + 2.0 * n["kernel_loraxs_A"] @ n["kernel_loraxs_R"] @ n[
            "kernel_loraxs_B"]
        np.testing.assert_allclose(merged["enc"][k]["kernel"], ref, atol=1e-5)
    assert np.array_equal(merged["enc"]["q"]["bias"], p["enc"]["q"]["bias"])


def test_unmerge_round_trip_and_donation():
    p, ap = _adapted(1)
    merged = lx.merge(ap)
    back = lx.unmerge(merged, ap)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(ap)
    np.testing.assert_allclose(back["enc"]["q"]["kernel"], p["enc"]["q"]["kernel"], atol=2e-6)
    np.testing.assert_array_equal(back["enc"]["o"]["kernel_loraxs_R"],
                                  ap["enc"]["o"]["kernel_loraxs_R"])
    copy = jax.tree_util.tree_map(jnp.copy, ap)
    donated = lx.merge(copy, donate=True)
    np.testing.assert_allclose(donated["enc"]["q"]["kernel"], merged["enc"]["q"]["kernel"],
                               atol=0)
    assert copy["enc"]["q"]["kernel"].is_deleted()        # the buffer was reused


def test_bf16_kernel_merge_accumulates_in_float32():
    p, ap = _adapted(2)
    ap = jax.tree_util.tree_map(lambda x: x, ap)
    ap["enc"]["q"]["kernel"] = ap["enc"]["q"]["kernel"].astype(jnp.bfloat16)
    m = lx.merge(ap)
    assert m["enc"]["q"]["kernel"].dtype == jnp.bfloat16
    n = {a: np.asarray(b, np.float64) for a, b in ap["enc"]["q"].items()}
    ref = n["kernel"] + 2.0 * n["kernel_loraxs_A"] @ n["kernel_loraxs_R"] @ n["kernel_loraxs_B"]
    np.testing.assert_allclose(np.asarray(m["enc"]["q"]["kernel"], np.float64), ref,
                               rtol=1 / 128, atol=1e-2)


def test_merge_under_sharding_keeps_shardings():
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"))
    p, _ = _adapted(3)
    sp = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.device_put(x, NamedSharding(
            mesh, P("fsdp", "tensor") if x.ndim == 2 else P())), p)
    cfg = lx.LoraXSConfig(rank=5, alpha=10.0, targets=(r"(q|o)/kernel$",), r_std=0.1)
    ap = lx.apply(sp, cfg, 3)
    merged = lx.merge(ap)
    assert merged["enc"]["q"]["kernel"].sharding.spec == P("fsdp", "tensor")
    ref = lx.merge(jax.device_get(ap))
    np.testing.assert_allclose(merged["enc"]["q"]["kernel"], ref["enc"]["q"]["kernel"], atol=1e-5)


def test_merge_errors():
    p, _ = _adapted()
    with pytest.raises(ValueError, match="nothing to merge"):
        lx.merge(p)
    with pytest.raises(ValueError, match="holds no LoRA-XS leaves"):
        lx.unmerge(p, p)
