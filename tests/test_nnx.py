"""loraxs_jax.nnx: the same verbs for NNX models: surgery, forward against numpy, training R alone,
merge, counting, saving and loading."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import loraxs_jax as lx


class NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(12, 12, rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(12, 3, rngs=rngs)

    def __call__(self, x):
        for lin in self.layers:
            x = jax.nn.relu(lin(x))
        return self.head(x)


def test_nnx_surgery_forward_train_merge():
    model = NNXModel(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (5, 12))
    y0 = model(x)
    cfg = lx.LoraXSConfig(rank=3, alpha=6.0, targets=(r"layers/\d+/kernel$",), r_std=0.3)
    am = lx.nnx.apply(model, cfg, 0)
    assert type(model.layers[0]) is nnx.Linear                  # input model untouched
    assert isinstance(am.layers[0], lx.nnx.LoraXSLinear) and type(am.head) is nnx.Linear
    assert am.layers[0].kernel[...] is model.layers[0].kernel[...]
    # numpy reference of the adapted forward
    h = np.asarray(x, np.float64)
    for lin in am.layers:
        g = lambda v: np.asarray(v[...], np.float64)
        h = np.maximum(h @ g(lin.kernel) + g(lin.bias) + 2.0 * (
            h @ g(lin.kernel_loraxs_A) @ g(lin.kernel_loraxs_R) @ g(lin.kernel_loraxs_B)), 0)
    ref = h @ np.asarray(am.head.kernel[...]) + np.asarray(am.head.bias[...])
    np.testing.assert_allclose(am(x), ref, atol=1e-5)
    assert np.abs(am(x) - y0).max() > 1e-3
    # training touches R only
    opt = nnx.Optimizer(am, __import__("optax").adam(1e-2), wrt=lx.nnx.LoraXSR)
    grads = nnx.grad(lambda mdl: jnp.mean(mdl(x) ** 2),
                     argnums=nnx.DiffState(0, lx.nnx.LoraXSR))(am)
    assert {str(p[-1]) for p, _ in nnx.to_flat_state(grads)} == {"kernel_loraxs_R"}
    k_before = am.layers[0].kernel[...]
    r_before = am.layers[0].kernel_loraxs_R[...]
    opt.update(am, grads)
    assert np.array_equal(am.layers[0].kernel[...], k_before)
    assert not np.array_equal(am.layers[0].kernel_loraxs_R[...], r_before)
    merged = lx.nnx.merge(am)
    assert all(type(lin) is nnx.Linear for lin in merged.layers)
    np.testing.assert_allclose(merged(x), am(x), atol=1e-5)


def test_nnx_state_counts_saves_and_loads(tmp_path):
    model = NNXModel(nnx.Rngs(0))
    cfg = lx.LoraXSConfig(rank=3, targets=(r"layers/\d+/kernel$",), r_std=0.3)
    am = lx.nnx.apply(model, cfg, 1)
    state = lx.nnx.params(am)
    assert lx.count(state)["R"] == 2 * 9
    path = lx.save_adapter(tmp_path / "nnx", state, cfg)
    loaded = lx.nnx.load_adapter(path, model)
    x = jnp.ones((2, 12))
    np.testing.assert_array_equal(loaded(x), am(x))
    np.testing.assert_array_equal(loaded.layers[1].kernel_loraxs_R[...],
                                  am.layers[1].kernel_loraxs_R[...])
