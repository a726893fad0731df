"""Sharded LoRA-XS training on 8 virtual CPU devices equals the single-device computation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import loraxs_jax as lx
from loraxs_jax import sharding as sh
from loraxs_jax.models import decoder as dec
from loraxs_jax.transform import flatten, leaf_role, path_str

# every adapted matrix is 32x32, so all bases come from one batched SVD (one compile)
CFG = dec.DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_layers=2,
                        num_heads=4, num_kv_heads=4, head_dim=8, scan_layers=True)
LORA = lx.LoraXSConfig(rank=4, alpha=8.0, r_std=0.05, stacked_axes=1,
                       targets=(r"(q|k|v|o|gate|up|down)_proj/kernel$",))
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
BATCH, SEQ = 16, 12
# float32; the sharded programs reduce in a different order than the single-device one.
LOSS_RTOL, R_ATOL = 1e-5, 1e-6


def mesh_of(shape):
    return sh.make_mesh(dict(zip(sh.MESH_AXES, shape)))


def make_tx():
    return optax.adamw(3e-2, weight_decay=0.01)


def loss_fn(trainable, frozen, batch):
    params = lx.combine(trainable, frozen)
    logits = lx.wrap(dec.DecoderForCausalLM(CFG).apply)({"params": params}, batch["ids"][:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["ids"][:, 1:]).mean()


def train_step(state, frozen, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], frozen, batch)
    updates, opt = make_tx().update(grads, state["opt"], state["params"])
    return ({"params": optax.apply_updates(state["params"], updates), "opt": opt,
             "step": state["step"] + 1}, {"loss": loss})


def base_params():
    return dec.init_params(CFG, jax.random.key(0))


def batches(n):
    rng = np.random.default_rng(0)
    return [{"ids": rng.integers(0, CFG.vocab_size, (BATCH, SEQ), dtype=np.int32)}
            for _ in range(n)]


def init_state(trainable):
    return {"params": trainable, "opt": make_tx().init(trainable), "step": jnp.int32(0)}


@functools.cache
def reference(n_steps):
    """Single device, no shardings."""
    trainable, frozen = lx.split(lx.apply(base_params(), LORA, 1), LORA)
    state, step, losses = init_state(trainable), jax.jit(train_step), []
    for b in batches(n_steps):
        state, m = step(state, frozen, b)
        losses.append(float(m["loss"]))
    return state, losses


def sharded_setup(mesh):
    """Base params placed by the rules, adapted on that placement, split, and the state's
    shardings (R's, AdamW's mu/nu like R, counts replicated)."""
    base_sh = sh.param_shardings(dec.param_shapes(CFG), dec.param_logical_axes(CFG), mesh)
    adapted = lx.apply(sh.shard_params(base_params(), base_sh), LORA, 1)
    all_sh = sh.adapted_shardings(adapted, base_sh)
    trainable, frozen = lx.split(adapted, LORA)
    t_sh, f_sh = sh.subtree_shardings(all_sh, trainable), sh.subtree_shardings(all_sh, frozen)
    state = init_state(trainable)
    state_sh = {"params": t_sh, "opt": sh.opt_state_shardings(state["opt"], t_sh, mesh),
                "step": sh.replicated(mesh)}
    return adapted, all_sh, sh.shard_params(state, state_sh), state_sh, frozen, f_sh


_STEPS = {}


def compiled_step(shape, state_sh, f_sh):
    """One jitted train step per mesh shape, shared by the tests of this session."""
    if shape not in _STEPS:
        _STEPS[shape] = sh.jit_train_step(train_step, mesh_of(shape), state_sh, f_sh)
    return _STEPS[shape]


@pytest.fixture(scope="module")
def setup_222():
    mesh = mesh_of((2, 2, 2))
    return (mesh, *sharded_setup(mesh))


@pytest.fixture(scope="module")
def ref():
    return reference(2)


def r_leaves(tree):
    return {p: np.asarray(v) for p, v in flatten(tree).items() if leaf_role(p[-1])}


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_train_step_matches_single_device(shape, ref):
    mesh = mesh_of(shape)
    _, _, state, state_sh, frozen, f_sh = sharded_setup(mesh)
    step = compiled_step(shape, state_sh, f_sh)
    losses = []
    for b in batches(2):
        state, m = step(state, frozen, sh.global_batch(b, mesh))
        losses.append(float(m["loss"]))
    ref_state, ref_losses = ref
    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
    got, want = r_leaves(state["params"]), r_leaves(ref_state["params"])
    assert got.keys() == want.keys() and len(got) == 7
    for p in got:
        np.testing.assert_allclose(got[p], want[p], atol=R_ATOL, err_msg=path_str(p))
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


def test_merge_under_sharding_keeps_shardings_and_values(setup_222):
    _, adapted, *_ = setup_222
    merged = lx.merge(adapted)
    plain = lx.merge(jax.device_get(adapted))
    base = flatten(adapted)
    for path, leaf in flatten(merged).items():
        assert leaf.sharding.is_equivalent_to(base[path].sharding, leaf.ndim), path_str(path)
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(flatten(plain)[path]),
                                   rtol=1e-6, atol=1e-6, err_msg=path_str(path))


def test_unscanned_layers():
    cfg = dec.DecoderConfig(**{**CFG.__dict__, "scan_layers": False})
    mesh = mesh_of((2, 2, 2))
    base_sh = sh.param_shardings(dec.param_shapes(cfg), dec.param_logical_axes(cfg), mesh)
    assert base_sh["model"]["layers_1"]["self_attn"]["o_proj"]["kernel"].spec == P(
        "tensor", "fsdp")
    lora = lx.LoraXSConfig(rank=4, targets=(r"o_proj/kernel$",))
    adapted = jax.eval_shape(lambda p: lx.apply(p, lora, 0), dec.param_shapes(cfg))
    o = sh.adapted_shardings(adapted, base_sh)["model"]["layers_1"]["self_attn"]["o_proj"]
    assert (o["kernel_loraxs_A"].spec, o["kernel_loraxs_B"].spec, o["kernel_loraxs_R"].spec,
            o["kernel_loraxs_scale"].spec) == (P("tensor", None), P(None, "fsdp"),
                                               P(None, None), P())


def test_mesh_sizes_and_fill():
    assert dict(mesh_of((2, 2, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
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


def test_indivisible_dimension_names_axis_path_and_sizes(caplog):
    cfg = dec.DecoderConfig(**{**CFG.__dict__, "vocab_size": 50265})   # RoBERTa-like vocab
    mesh = mesh_of((2, 2, 2))
    shapes, axes = dec.param_shapes(cfg), dec.param_logical_axes(cfg)
    with pytest.raises(ValueError, match=r"mesh axis 'tensor' of size 2 does not divide dimension "
                       r"1 \('vocab', size 50265\) of lm_head/kernel \(32, 50265\)"):
        sh.param_shardings(shapes, axes, mesh, on_indivisible="raise")
    with caplog.at_level("WARNING", logger="loraxs_jax.sharding"):
        got = sh.param_shardings(shapes, axes, mesh)   # default: replicate that axis, warn
    assert got["model"]["embed_tokens"]["embedding"].spec == P(None, "fsdp")
    assert got["lm_head"]["kernel"].spec == P("fsdp", None)
    assert "replicating it along 'tensor'" in caplog.text and "lm_head/kernel" in caplog.text


def test_multi_axis_dimension_keeps_the_dividing_prefix():
    mesh = mesh_of((2, 4, 1))
    # batch 6 over (data=2, fsdp=4): data divides, data*fsdp=8 does not
    assert sh.spec_for(("batch", None), (6, 3), mesh) == P("data", None)
    with pytest.raises(ValueError, match=r"'fsdp' of size 4 .* \('batch', size 6\).*already "
                       r"split 2-way over \['data'\]"):
        sh.spec_for(("batch",), (6,), mesh, on_indivisible="raise")


def test_unknown_logical_name_and_missing_axes():
    mesh = mesh_of((8, 1, 1))
    with pytest.raises(ValueError, match=r"logical axis names \['hidden'\] have no rule"):
        sh.spec_for(("hidden",), (8,), mesh)
    with pytest.raises(KeyError, match="adapted_shardings"):
        sh.param_shardings({"k_loraxs_R": jnp.zeros((2, 2))}, {}, mesh)


def test_global_batch_is_split_over_data_and_fsdp():
    mesh = mesh_of((2, 2, 2))
    x = np.arange(8 * 3).reshape(8, 3)
    g = sh.global_batch({"ids": x}, mesh)["ids"]
    assert g.sharding.spec == P(("data", "fsdp")) and g.shape == (8, 3)
    np.testing.assert_array_equal(np.asarray(g), x)
    assert sh.process_batch_slice(8, mesh) == slice(0, 8)
    with pytest.raises(ValueError, match=r"global batch size 6 .* data\*fsdp = 2\*2 = 4"):
        sh.process_batch_slice(6, mesh)
    with pytest.raises(ValueError, match=r"not divisible by the batch mesh axes data\*fsdp = 4"):
        sh.global_batch({"ids": x[:6]}, mesh)


def test_eval_step_and_boxed_params(setup_222):
    mesh = setup_222[0]
    boxed = jax.eval_shape(lambda: dec._boxed_init(CFG, jax.random.key(0)))
    from_boxes = sh.param_shardings(boxed, None, mesh)
    from_names = sh.param_shardings(dec.param_shapes(CFG), dec.param_logical_axes(CFG), mesh)
    assert jax.tree.map(lambda s: s.spec, from_boxes) == jax.tree.map(lambda s: s.spec, from_names)
    _, _, state, state_sh, frozen, f_sh = setup_222[1:]
    ev = sh.jit_eval_step(lambda s, f, b: loss_fn(s["params"], f, b), mesh, state_sh, f_sh)
    b = batches(1)[0]
    assert np.isfinite(float(ev(state, frozen, sh.global_batch(b, mesh))))


def test_maybe_initialize_distributed_is_a_noop_on_one_host(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert sh.maybe_initialize_distributed() is False


def test_opt_state_shardings_read_masked_multi_transform_states():
    """The train.py optimizer (multi_transform R/head groups, MultiSteps accumulation): every
    per-param leaf gets its param's sharding, counts are replicated, and init lands there."""
    import ml_collections

    from experiment import make_optimizer

    mesh = mesh_of((2, 2, 2))
    lora = lx.LoraXSConfig(rank=4, alpha=8.0, stacked_axes=1, trainable=(r"^lm_head/",),
                           targets=LORA.targets)
    base_sh = sh.param_shardings(dec.param_shapes(CFG), dec.param_logical_axes(CFG), mesh)
    adapted = lx.apply(sh.shard_params(base_params(), base_sh), lora, 1)
    trainable, _ = lx.split(adapted, lora)
    t_sh = sh.subtree_shardings(sh.adapted_shardings(adapted, base_sh), trainable)
    config = ml_collections.ConfigDict({"method": "loraxs", "optim": {
        "lr": 1e-2, "head_lr": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
        "warmup_steps": 0, "warmup_ratio": 0.0, "schedule": "linear", "grad_clip": 1.0,
        "grad_accum": 2}})
    tx = make_optimizer(config, trainable, lora, 10)
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
