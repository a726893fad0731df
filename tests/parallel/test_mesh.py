"""Meshes, partition rules, param and optimizer-state shardings, and their errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import loraxs_jax as lx
from loraxs_jax import parallel as sh
from loraxs_jax.models import decoder as dec
from loraxs_jax.tree import flatten, path_str


def test_merge_under_sharding_keeps_shardings_and_values(setup_222):
    _, adapted, *_ = setup_222
    merged = lx.merge(adapted)
    plain = lx.merge(jax.device_get(adapted))
    base = flatten(adapted)
    for path, leaf in flatten(merged).items():
        assert leaf.sharding.is_equivalent_to(base[path].sharding, leaf.ndim), path_str(path)
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(flatten(plain)[path]),
                                   rtol=1e-6, atol=1e-6, err_msg=path_str(path))


def test_mesh_sizes_and_fill(sharded):
    assert dict(sharded.mesh_of((2, 2, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sh.make_mesh({"data": -1, "tensor": 2}).shape) == {
        "data": 4, "fsdp": 1, "tensor": 2}
    assert sh.make_mesh({"fsdp": -1}).axis_types == (jax.sharding.AxisType.Auto,) * 3


@pytest.mark.parametrize("mesh_cfg, match", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, r"data\*fsdp\*tensor = 3 devices but 8"),
    ({"data": -1, "fsdp": 3}, r"'data'=-1 cannot fill 8 devices.*multiply to 3"),
    ({"data": -1, "fsdp": -1}, r"only one mesh axis may be -1"),
    ({"data": 0}, r"positive or -1"),
])
def test_bad_mesh_sizes(mesh_cfg, match):
    with pytest.raises(ValueError, match=match):
        sh.make_mesh(mesh_cfg)


def test_indivisible_dimension_names_axis_path_and_sizes(sharded, caplog):
    cfg = dec.DecoderConfig(**{**sharded.cfg.__dict__, "vocab_size": 50265})   # RoBERTa-like vocab
    mesh = sharded.mesh_of((2, 2, 2))
    shapes, axes = dec.param_shapes(cfg), dec.param_logical_axes(cfg)
    with pytest.raises(ValueError, match=r"mesh axis 'tensor' of size 2 does not divide dimension "
                       r"1 \('vocab', size 50265\) of lm_head/kernel \(32, 50265\)"):
        sh.param_shardings(shapes, axes, mesh, on_indivisible="raise")
    with caplog.at_level("WARNING", logger="loraxs_jax.parallel.mesh"):
        got = sh.param_shardings(shapes, axes, mesh)   # default: replicate that axis, warn
    assert got["model"]["embed_tokens"]["embedding"].spec == P(None, "fsdp")
    assert got["lm_head"]["kernel"].spec == P("fsdp", None)
    assert "replicating it along 'tensor'" in caplog.text and "lm_head/kernel" in caplog.text


def test_multi_axis_dimension_keeps_the_dividing_prefix(sharded):
    mesh = sharded.mesh_of((2, 4, 1))
    # batch 6 over (data=2, fsdp=4): data divides, data*fsdp=8 does not
    assert sh.spec_for(("batch", None), (6, 3), mesh) == P("data", None)
    with pytest.raises(ValueError, match=r"'fsdp' of size 4 .* \('batch', size 6\).*already "
                       r"split 2-way over \['data'\]"):
        sh.spec_for(("batch",), (6,), mesh, on_indivisible="raise")


def test_unknown_logical_name_and_missing_axes(sharded):
    mesh = sharded.mesh_of((8, 1, 1))
    with pytest.raises(ValueError, match=r"logical axis names \['hidden'\] have no rule"):
        sh.spec_for(("hidden",), (8,), mesh)
    with pytest.raises(KeyError, match="adapted_shardings"):
        sh.param_shardings({"k_loraxs_R": jnp.zeros((2, 2))}, {}, mesh)


def test_opt_state_shardings_read_masked_multi_transform_states(sharded):
    """The train.py optimizer (multi_transform R/head groups, MultiSteps accumulation): every
    per-param leaf gets its param's sharding, counts are replicated, and init lands there."""
    import ml_collections

    from loraxs_jax.experiments.methods import LoraXS
    from loraxs_jax.experiments.train import make_optimizer

    mesh = sharded.mesh_of((2, 2, 2))
    lora = lx.LoraXSConfig(rank=4, alpha=8.0, stacked_axes=1, trainable=(r"^lm_head/",),
                           targets=sharded.lora.targets)
    base_sh = sh.param_shardings(dec.param_shapes(sharded.cfg), dec.param_logical_axes(sharded.cfg),
                                 mesh)
    adapted = lx.apply(sh.shard_params(sharded.base_params(), base_sh), lora, 1)
    trainable, _ = lx.split(adapted, lora)
    t_sh = sh.subtree_shardings(sh.adapted_shardings(adapted, base_sh), trainable)
    config = ml_collections.ConfigDict({"method": "loraxs", "optim": {
        "lr": 1e-2, "head_lr": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
        "warmup_steps": 0, "warmup_ratio": 0.0, "schedule": "linear", "grad_clip": 1.0,
        "grad_accum": 2}})
    tx = make_optimizer(config, trainable, LoraXS(adapted, lora), 10)
    abstract = jax.eval_shape(tx.init, trainable)
    got = sh.opt_state_shardings(abstract, t_sh, mesh)
    suffix = {"".join(f"['{k}']" for k in p): s for p, s in flatten(t_sh).items()}
    matched = 0
    for path, s in jax.tree_util.tree_flatten_with_path(got)[0]:
        name = jax.tree_util.keystr(path)
        owner = [v for k, v in suffix.items() if name.endswith(k)]
        if owner:
            assert s == owner[0], name
            matched += 1
        else:
            assert s.spec == P(), name                  # counts, schedule state: replicated
    # per param: MultiSteps accumulator + the group's mu and nu (the other group's are masked)
    assert matched == 3 * len(flatten(trainable))
    head = [s for p, s in flatten(t_sh).items() if p[0] == "lm_head"]
    assert head and head[0].spec == P("fsdp", "tensor")
    state = jax.jit(tx.init, in_shardings=(t_sh,), out_shardings=got)(
        sh.shard_params(trainable, t_sh))
    assert jax.tree.map(lambda x: x.sharding, state) == got
