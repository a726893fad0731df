"""LoRA-XS on flax NNX models through the same verbs: nnx.Linear, nnx.LinearGeneral, nnx.Einsum
and a custom module's nnx.Param, against an independent numpy merge; training R alone with
nnx.grad / nnx.Optimizer; merge back to the plain class; counting, saving and loading."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import loraxs_jax as lx
from loraxs_jax.apply import adapted_geometries

X = jax.random.normal(jax.random.key(1), (2, 3))
X3 = jax.random.normal(jax.random.key(2), (2, 5, 3))


class NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(12, 12, rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(12, 3, rngs=rngs)

    def __call__(self, x):
        for lin in self.layers:
            x = jax.nn.relu(lin(x))
        return self.head(x)


class Custom(nnx.Module):
    """A custom module with a bare nnx.Param used through jnp.dot, and flax 0.12's Linear called
    with ``out_sharding`` (as flax's own NNX Gemma example does)."""

    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 5)))

    def __call__(self, x):
        return jnp.dot(jnp.tanh(self.linear(x, out_sharding=None)), self.w[...])


CASES = {
    "linear": (lambda r: nnx.Linear(3, 4, rngs=r), X, ("kernel$",), {"kernel": "io"}),
    "linear_general": (lambda r: nnx.LinearGeneral((5, 3), 4, axis=(-2, -1), rngs=r), X3,
                       ("kernel$",), {"kernel": "iio"}),
    "einsum": (lambda r: nnx.Einsum("BTD,NDH->BTNH", (2, 3, 4), rngs=r), X3, ("kernel$",),
               {"kernel": "oio"}),
    "custom": (Custom, X, ("kernel$", "^w$"), {"linear/kernel": "io", "w": "io"}),
}


def _numpy_merged_call(adapted, x):
    """The adapted module's output computed by merging every weight in float64 numpy."""
    merged = {}
    tree = lx.nnx.params(adapted)
    geoms = adapted_geometries(tree)
    for path, d in lx.tree.adapted_kernels(tree).items():
        g = geoms[lx.tree.path_str(path)]
        a, b = (np.asarray(v, np.float64) for v in g.canonical(d["A"], d["B"]))
        r, s = np.asarray(d["R"], np.float64), np.asarray(d["scale"], np.float64)
        delta = (a.reshape(g.m, -1) @ r @ b.reshape(-1, g.n) * s).reshape(
            g.sizes(g.inputs) + g.sizes(g.outputs))
        delta = np.transpose(delta, np.argsort(g.inputs + g.outputs))
        merged[path] = jnp.asarray(np.asarray(d["kernel"], np.float64) + delta, jnp.float32)
    plain = lx.merge(adapted)
    graphdef, state = nnx.split(plain)
    flat = dict(lx.tree.flatten(nnx.to_pure_dict(state)))
    flat.update(merged)
    return nnx.merge(graphdef, lx.tree.unflatten(flat))(x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_nnx_paths(name):
    make, x, targets, roles = CASES[name]
    model = make(nnx.Rngs(0))
    cfg = lx.LoraXSConfig(rank=2, targets=targets, r_std=0.5)
    adapted = lx.apply(model, cfg, 1, forward=lambda m: m(x))
    assert lx.nnx.is_adapted(adapted) and not lx.nnx.is_adapted(model)   # input untouched
    assert isinstance(adapted, type(model))
    tree = lx.nnx.params(adapted)
    assert {k: g.roles for k, g in adapted_geometries(tree).items()} == roles
    zero = lx.apply(model, dataclasses.replace(cfg, r_std=0.0), 1, forward=lambda m: m(x))
    np.testing.assert_array_equal(zero(x), model(x))
    y = adapted(x)
    assert np.abs(np.asarray(y) - np.asarray(model(x))).max() > 1e-3
    np.testing.assert_allclose(y, _numpy_merged_call(adapted, x), rtol=1e-5, atol=1e-5)
    merged = lx.merge(adapted)
    assert type(merged) is type(model) and not lx.nnx.is_adapted(merged)
    np.testing.assert_allclose(merged(x), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(adapted, x), y, rtol=1e-5, atol=1e-5)
    # the gradient reaches every R and nothing else
    grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))), argnums=nnx.DiffState(0, lx.nnx.LoraXSR))(
        adapted)
    flat = lx.tree.flatten(nnx.to_pure_dict(grads))
    assert {p[-1] for p in flat} <= {"kernel_loraxs_R", "w_loraxs_R"} and len(flat) == len(roles)
    assert all(np.abs(v).max() > 0 for v in flat.values())
    assert lx.count(adapted)["R"] == 4 * len(roles)


def test_nnx_optimizer_trains_r_only_and_merges():
    model = NNXModel(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (5, 12))
    cfg = lx.LoraXSConfig(rank=3, alpha=6.0, targets=(r"layers/\d+/kernel$",), r_std=0.3)
    am = lx.apply(model, cfg, 0)
    assert type(model.layers[0]) is nnx.Linear and not hasattr(model.layers[0], "kernel_loraxs_R")
    assert am.layers[0].kernel[...] is model.layers[0].kernel[...]        # shared, not copied
    target = model(x) + 1.0
    loss = lambda m: jnp.mean((m(x) - target) ** 2)  # noqa: E731
    opt = nnx.Optimizer(am, optax.adam(1e-2), wrt=lx.nnx.LoraXSR)
    k_before = am.layers[0].kernel[...]
    first = float(loss(am))
    for _ in range(10):
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, lx.nnx.LoraXSR))(am)
        opt.update(am, grads)
    assert float(loss(am)) < first
    np.testing.assert_array_equal(am.layers[0].kernel[...], k_before)
    graphdef, r_state, rest = nnx.split(am, lx.nnx.LoraXSR, ...)
    assert {p[-1] for p in lx.tree.flatten(nnx.to_pure_dict(r_state))} == {"kernel_loraxs_R"}
    merged = lx.merge(am)
    assert all(type(lin) is nnx.Linear for lin in merged.layers)
    np.testing.assert_allclose(merged(x), am(x), atol=1e-5)


def test_nnx_counts_saves_and_loads(tmp_path):
    model = NNXModel(nnx.Rngs(0))
    cfg = lx.LoraXSConfig(rank=3, targets=(r"layers/\d+/kernel$",), r_std=0.3)
    am = lx.apply(model, cfg, 1)
    assert lx.count(am)["R"] == 2 * 9
    path = lx.save_adapter(tmp_path / "nnx", am, cfg)
    loaded = lx.load_adapter(path, model)
    x = jnp.ones((2, 12))
    np.testing.assert_array_equal(loaded(x), am(x))
    np.testing.assert_array_equal(loaded.layers[1].kernel_loraxs_R[...],
                                  am.layers[1].kernel_loraxs_R[...])
    with pytest.raises(ValueError, match="already adapted"):
        lx.apply(am, cfg)
    with pytest.raises(ValueError, match="nothing to merge"):
        lx.merge(model)


def test_nnx_other_methods_run_adapted_through_wrap():
    class TwoHeads(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 4, rngs=rngs)

        def __call__(self, x):
            return self.lin(x)

        def doubled(self, x):
            return 2 * self.lin(x)

    model = TwoHeads(nnx.Rngs(0))
    am = lx.apply(model, lx.LoraXSConfig(rank=2, targets=("kernel",), r_std=0.5))
    np.testing.assert_allclose(lx.wrap(lambda m, x: m.doubled(x))(am, X), 2 * am(X), atol=1e-6)
    assert np.abs(np.asarray(am.doubled(X)) - np.asarray(2 * am(X))).max() > 1e-3  # plain method
