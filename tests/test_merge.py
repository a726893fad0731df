"""merge / unmerge against numpy, dtypes, donation, and shardings (a merge keeps each W's layout or
lands in another mesh's)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import loraxs_jax as lx
from loraxs_jax import parallel as sh
from loraxs_jax.models import decoder as dec
from loraxs_jax.models.generate import generate
from loraxs_jax.tree import flatten, path_str


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


MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]


def test_merge_into_another_mesh_layout(tiny_decoder, mesh_of, place):
    """Adapted params sharded on (2,2,2); the merge writes the kernels straight into the
    (1,8,1) layout of a serving mesh over the same devices."""
    d = tiny_decoder
    train_mesh, serve_mesh = mesh_of((2, 2, 2)), mesh_of((1, 8, 1))
    shapes, axes = dec.param_shapes(d.config), dec.param_logical_axes(d.config)
    params, _ = place(d.params, sh.param_shardings(shapes, axes, train_mesh))
    serve_sh = sh.param_shardings(shapes, axes, serve_mesh)
    merged = lx.merge(params, out_shardings=serve_sh)
    plain = flatten(lx.merge(jax.device_get(d.params)))
    want_sh = flatten(serve_sh)
    q = ("model", "layers", "self_attn", "q_proj", "kernel")
    assert want_sh[q].spec == P(None, "fsdp", "tensor")     # tensor has size 1 here
    assert merged["model"]["layers"]["self_attn"]["q_proj"]["kernel"].addressable_shards[
        0].data.shape == (2, 32 // 8, 32)
    for path, leaf in flatten(merged).items():
        assert leaf.sharding == want_sh[path], path_str(path)
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(plain[path]), rtol=1e-6,
                                   atol=1e-6, err_msg=path_str(path))
    # the merged tree runs as a plain model and agrees with the adapted one
    ids, mask = d.prompts(8)
    adapted_out = generate(d.apply, d.params, d.config, ids, mask, 4)
    merged_out = generate(dec.DecoderForCausalLM(d.config).apply, jax.device_get(merged), d.config, ids,
                          mask, 4)
    np.testing.assert_array_equal(np.asarray(merged_out), np.asarray(adapted_out))


def test_merge_out_shardings_errors(tiny_decoder, mesh_of, place):
    mesh = mesh_of((2, 2, 2))
    shapes, axes = dec.param_shapes(tiny_decoder.config), dec.param_logical_axes(tiny_decoder.config)
    base_sh = sh.param_shardings(shapes, axes, mesh)
    params, _ = place(tiny_decoder.params, base_sh)
    partial = {k: v for k, v in base_sh.items() if k != "lm_head"}
    with pytest.raises(ValueError, match=r"out_shardings has no entry for \['lm_head/kernel'\]"):
        lx.merge(params, out_shardings=partial)
    # host params: merged on one device, then placed in the requested layout
    merged = flatten(lx.merge(jax.device_get(tiny_decoder.params), out_shardings=base_sh))
    assert all(merged[p].sharding == s for p, s in flatten(base_sh).items())


def test_unscanned_decoder_merge_keeps_each_kernels_sharding(tiny_decoder, mesh_of, place):
    cfg = dataclasses.replace(tiny_decoder.config, scan_layers=False)
    lora = dataclasses.replace(tiny_decoder.lora, stacked_axes=0)
    mesh = mesh_of((1, 4, 2))
    base = dec.init_params(cfg, jax.random.key(4))
    base_sh = sh.param_shardings(base, dec.param_logical_axes(cfg), mesh)
    params, _ = place(lx.apply(base, lora, jax.random.key(5)), base_sh)
    merged = flatten(lx.merge(params, donate=True))
    for path, s in flatten(base_sh).items():
        assert merged[path].sharding.is_equivalent_to(s, merged[path].ndim), path_str(path)
    o = ("model", "layers_0", "self_attn", "o_proj", "kernel")
    assert merged[o].sharding.spec == P("tensor", "fsdp")
