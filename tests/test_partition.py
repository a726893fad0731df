"""split / combine / masked: only R (and the head) train, no gradient of a frozen weight, optimizer
state for the trainable leaves alone."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import loraxs_jax as lx


class MLP(nn.Module):
    d: int = 256

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            h = nn.Dense(2 * self.d, name=f"up_{i}")(nn.LayerNorm(name=f"ln_{i}")(x))
            x = x + nn.Dense(self.d, name=f"down_{i}")(nn.gelu(h))
        return nn.Dense(3, name="head")(x.mean(1))


CFG = lx.LoraXSConfig(rank=4, targets=(r"(up|down)_\d/kernel$",), trainable=(r"^head/",))


def _setup():
    m = MLP()
    x = jax.random.normal(jax.random.key(0), (4, 16, 256))
    y = jnp.array([0, 1, 2, 0])
    p = lx.apply(m.init(jax.random.key(1), x)["params"], CFG, 2)
    return m, p, x, y


def _loss_fn(m):
    def loss(trainable, frozen, x, y):
        logits = lx.wrap(m.apply)({"params": lx.combine(trainable, frozen)}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss


def _dot_shapes(jaxpr):
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out += [tuple(v.aval.shape) for v in eqn.outvars]
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else []:
            out += _dot_shapes(sub)
        for param in eqn.params.values():
            for j in (param if isinstance(param, (list, tuple)) else [param]):
                inner = getattr(j, "jaxpr", None)
                if inner is not None:
                    out += _dot_shapes(getattr(inner, "jaxpr", inner))
    return out


def test_split_partitions_and_combine_restores():
    _, p, _, _ = _setup()
    t, f = lx.split(p, CFG)
    names = {"/".join(k) for k in __import__("flax").traverse_util.flatten_dict(t)}
    assert names == {f"{n}_{i}/kernel_loraxs_R" for n in ("up", "down") for i in (0, 1)} | {
        "head/kernel", "head/bias"}
    assert jax.tree_util.tree_structure(lx.combine(t, f)) == jax.tree_util.tree_structure(p)
    with pytest.raises(ValueError, match="more than one tree"):
        lx.combine(t, t)
    with pytest.raises(ValueError, match="nothing trainable"):
        lx.split({"a": {"kernel": jnp.ones((2, 2))}})


def test_no_frozen_weight_gradient_in_the_jaxpr():
    m, p, x, y = _setup()
    t, f = lx.split(p, CFG)
    frozen_kernels = {tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(f)
                      if k[-1].key == "kernel"}
    assert frozen_kernels == {(256, 512), (512, 256)}
    jaxpr = jax.make_jaxpr(jax.grad(_loss_fn(m)))(t, f, x, y).jaxpr
    shapes = _dot_shapes(jaxpr)
    assert (4, 4) in shapes                         # R's own gradient is there
    assert not frozen_kernels & set(shapes)         # no dW for any frozen kernel
    # the check can fail: full fine-tuning's jaxpr has them
    full_loss = lambda pp: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        m.apply({"params": pp}, x), y).mean()
    full = jax.make_jaxpr(jax.grad(full_loss))(lx.merge(p)).jaxpr
    assert frozen_kernels <= set(_dot_shapes(full))


def test_compiled_flops_near_the_frozen_floor():
    m, p, x, y = _setup()
    t, f = lx.split(p, CFG)
    base = lx.merge(p)

    def flops(fn, *args):
        ca = jax.jit(fn).lower(*args).compile().cost_analysis()
        return (ca[0] if isinstance(ca, list) else ca)["flops"]

    def floor_loss(xx, params):     # frozen forward + backward to the inputs only
        logits = m.apply({"params": params}, xx)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    f_xs = flops(jax.grad(_loss_fn(m)), t, f, x, y)
    f_floor = flops(jax.grad(floor_loss), x, base)
    f_full = flops(jax.grad(floor_loss, argnums=1), x, base)
    assert f_xs < 1.06 * f_floor, (f_xs, f_floor)
    assert f_xs < 0.8 * f_full, (f_xs, f_full)


def test_optimizer_state_holds_R_and_head_only_and_step_trains_R():
    m, p, x, y = _setup()
    t, f = lx.split(p, CFG)
    tx = optax.adamw(1e-2)
    state = tx.init(t)
    shapes = {tuple(a.shape) for a in jax.tree.leaves(state)}
    assert shapes == {(), (4, 4), (256, 3), (3,)}
    loss = _loss_fn(m)
    g = jax.grad(loss)(t, f, x, y)
    upd, state = tx.update(g, state, t)
    t2 = optax.apply_updates(t, upd)
    assert loss(t2, f, x, y) < loss(t, f, x, y)


def test_masked_wraps_a_users_optimizer():
    m, p, x, y = _setup()
    tx = lx.masked(optax.adam(1e-2), CFG)
    state = tx.init(p)
    shapes = {tuple(a.shape) for a in jax.tree.leaves(state)}
    assert shapes <= {(), (4, 4), (256, 3), (3,)}
    full_loss = lambda pp: _loss_fn(m)(pp, {}, x, y)
    g = jax.grad(full_loss)(p)
    upd, _ = tx.update(g, state, p)
    flat = __import__("flax").traverse_util.flatten_dict(upd)
    for path, u in flat.items():
        trainable = path[-1] == "kernel_loraxs_R" or path[0] == "head"
        assert bool(jnp.any(u != 0)) == trainable, path
    mask = lx.partition.trainable_mask(p, CFG)
    assert mask["up_0"]["kernel_loraxs_R"] and not mask["up_0"]["kernel"]
    new = optax.apply_updates(p, upd)
    assert np.array_equal(new["up_0"]["kernel"], p["up_0"]["kernel"])
