"""Sharded train and eval steps on (data, fsdp, tensor) meshes equal the single-device step; every
leaf carries its promised sharding."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import loraxs_jax as lx
from loraxs_jax import parallel as sh
from loraxs_jax.models import decoder as dec
from loraxs_jax.tree import flatten, leaf_role, path_str

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]






@pytest.mark.parametrize("shape", MESHES)
def test_sharded_train_step_matches_single_device(sharded, shape, ref):
    mesh = sharded.mesh_of(shape)
    _, _, state, state_sh, frozen, f_sh = sharded.sharded_setup(mesh)
    step = sharded.compiled_step(shape, state_sh, f_sh)
    losses = []
    for b in sharded.batches(2):
        state, m = step(state, frozen, sh.global_batch(b, mesh))
        losses.append(float(m["loss"]))
    ref_state, ref_losses = ref
    np.testing.assert_allclose(losses, ref_losses, rtol=sharded.loss_rtol)
    got, want = sharded.r_leaves(state["params"]), sharded.r_leaves(ref_state["params"])
    assert got.keys() == want.keys() and len(got) == 7
    for p in got:
        np.testing.assert_allclose(got[p], want[p], atol=sharded.r_atol, err_msg=path_str(p))
    # the state comes back on the shardings it went in with (donated, updated in place)
    for leaf, s in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh)):
        assert leaf.sharding.is_equivalent_to(s, leaf.ndim)


def test_every_leaf_carries_the_promised_spec(setup_222):
    _, adapted, all_sh, *_ = setup_222
    want = {  # kernel specs by the rules; A keeps in, B keeps out, rank axis and R unsharded
        "q_proj": ("fsdp", "tensor"), "k_proj": ("fsdp", "tensor"), "v_proj": ("fsdp", "tensor"),
        "gate_proj": ("fsdp", "tensor"), "up_proj": ("fsdp", "tensor"),
        "o_proj": ("tensor", "fsdp"), "down_proj": ("tensor", "fsdp")}
    flat, flat_sh = flatten(adapted), flatten(all_sh)
    seen = set()
    for path, leaf in flat.items():
        assert leaf.sharding.spec == flat_sh[path].spec, path_str(path)
        name, role = path[-2], leaf_role(path[-1])
        if name in want:
            i, o = want[name]
            spec = {None: P(None, i, o), "A": P(None, i, None), "B": P(None, None, o),
                    "R": P(None, None, None), "scale": P(None)}[role and role[1]]
            assert leaf.sharding.spec == spec, path_str(path)
            seen.add(role and role[1])
    assert seen == {None, "A", "B", "R", "scale"}
    assert flat[("model", "embed_tokens", "embedding")].sharding.spec == P("tensor", "fsdp")
    assert flat[("lm_head", "kernel")].sharding.spec == P("fsdp", "tensor")
    assert flat[("model", "norm", "weight")].sharding.spec == P("fsdp")


def test_unscanned_layers(sharded):
    cfg = dec.DecoderConfig(**{**sharded.cfg.__dict__, "scan_layers": False})
    mesh = sharded.mesh_of((2, 2, 2))
    base_sh = sh.param_shardings(dec.param_shapes(cfg), dec.param_logical_axes(cfg), mesh)
    assert base_sh["model"]["layers_1"]["self_attn"]["o_proj"]["kernel"].spec == P(
        "tensor", "fsdp")
    lora = lx.LoraXSConfig(rank=4, targets=(r"o_proj/kernel$",))
    adapted = jax.eval_shape(lambda p: lx.apply(p, lora, 0), dec.param_shapes(cfg))
    o = sh.adapted_shardings(adapted, base_sh)["model"]["layers_1"]["self_attn"]["o_proj"]
    assert (o["kernel_loraxs_A"].spec, o["kernel_loraxs_B"].spec, o["kernel_loraxs_R"].spec,
            o["kernel_loraxs_scale"].spec) == (P("tensor", None), P(None, "fsdp"),
                                               P(None, None), P())


def test_eval_step_and_boxed_params(sharded, setup_222):
    mesh = setup_222[0]
    boxed = jax.eval_shape(lambda: dec.boxed_param_shapes(sharded.cfg))
    from_boxes = sh.param_shardings(boxed, None, mesh)
    from_names = sh.param_shardings(dec.param_shapes(sharded.cfg), dec.param_logical_axes(sharded.cfg), mesh)
    assert jax.tree.map(lambda s: s.spec, from_boxes) == jax.tree.map(lambda s: s.spec, from_names)
    _, _, state, state_sh, frozen, f_sh = setup_222[1:]
    ev = sh.jit_eval_step(lambda s, f, b: sharded.loss_fn(s["params"], f, b), mesh, state_sh, f_sh)
    b = sharded.batches(1)[0]
    assert np.isfinite(float(ev(state, frozen, sh.global_batch(b, mesh))))
