"""LoRA-XS on google-deepmind's unmodified ``gemma`` library (gemma==3.3.0, linen Gemma 3),
a reduced config with random weights. Runs in the side venv ``.venv-gemma`` (built by ``make
test``; gemma patches flax at import, so it never shares a process with the other tests) and
prints one JSON line of measurements that tests/third_party/test_gemma.py asserts on.

    .venv-gemma/bin/python tests/third_party/gemma_check.py OUT_DIR
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

import gemma_shim  # noqa: E402

G = gemma_shim.load()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import loraxs_jax as lx  # noqa: E402
from loraxs_jax.apply import adapted_geometries  # noqa: E402

# The paper's seven projections in gemma's names: q, k and v (k, v stacked in kv_einsum), o
# (attn_vec_einsum), gate and up (stacked in gating_einsum) and down (linear).
TARGETS = (r"attn/(q|kv|attn_vec)_einsum/w$", r"mlp/(gating_einsum|linear)$")
STACKED = {r"kv_einsum": 1, r"gating_einsum": 1}


def reduced_config():
    at = G.modules.AttentionType
    return G.config.TransformerConfig(
        num_embed=128, embed_dim=64, hidden_dim=96, num_heads=4, head_dim=16, num_kv_heads=2,
        final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True,
        use_qk_norm=True, attention_types=G.config.make_attention_layers_types(
            (at.LOCAL_SLIDING, at.GLOBAL), num_layers=2),
        query_pre_attn_norm=G.config.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM,
        attn_logits_soft_cap=None, sliding_window_size=4, transpose_gating_einsum=True,
        local_base_frequency=10_000, global_base_frequency=1_000_000, vision_encoder=None)


def main(out: Path) -> dict:
    model = G.transformer.Transformer(config=reduced_config(), dtype=jnp.float32)  # f32 params
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 1, 128, dtype=jnp.int32)  # 0 = pad
    params = model.init(jax.random.key(0), tokens)["params"]

    def logits(p, toks):
        return model.apply({"params": p}, toks).logits

    def rel(a, b):
        return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

    cfg = lx.LoraXSConfig(rank=4, alpha=4.0, targets=TARGETS, stacked_axes=STACKED, r_std=0.05)
    adapted = lx.apply(params, cfg, 0, forward=lambda p: logits(p, tokens))
    roles = {k.split("/", 1)[1]: g.roles for k, g in adapted_geometries(adapted).items()
             if k.startswith("layer_0/")}
    plain, adapted_fn = jax.jit(logits), jax.jit(lx.wrap(logits))
    base = plain(params, tokens)
    got = adapted_fn(adapted, tokens)
    merged = plain(lx.merge(adapted), tokens)
    zero = adapted_fn(lx.apply(params, dataclasses.replace(cfg, r_std=0.0), 0,
                               forward=lambda p: logits(p, tokens)), tokens)
    # the nn.jit on Transformer.__call__ caches its trace: neither order may leak
    plain_again = logits(params, tokens)
    eager_adapted = lx.wrap(logits)(adapted, tokens)

    # a few optax steps on R (next-token cross-entropy) lower the loss
    trainable, frozen = lx.split(adapted, cfg)

    def loss(t):
        lg = lx.wrap(logits)(lx.combine(t, frozen), tokens)[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(lg, tokens[:, 1:]).mean()

    tx = optax.adam(3e-2)
    state = tx.init(trainable)

    @jax.jit
    def step(t, s):
        value, grads = jax.value_and_grad(loss)(t)
        updates, s = tx.update(grads, s, t)
        return optax.apply_updates(t, updates), s, value, grads

    losses, grad_leaves = [], None
    for _ in range(8):
        trainable, state, value, grads = step(trainable, state)
        losses.append(float(value))
        grad_leaves = grad_leaves or sorted(lx.tree.path_str(p) for p in lx.tree.flatten(grads))
    losses.append(float(loss(trainable)))
    trained = lx.combine(trainable, frozen)
    path = lx.save_adapter(out / "gemma_adapter", trained, cfg)
    loaded = lx.load_adapter(path, params)
    return {
        "roles": roles,
        "count": lx.count(adapted),
        "zero_r_max_diff": float(jnp.abs(zero - base).max()),
        "adapted_vs_base": float(jnp.abs(got - base).max()),
        "adapted_vs_merged": float(jnp.abs(got - merged).max()),
        "adapted_vs_merged_rel": rel(got, merged),
        "plain_after_adapted_diff": float(jnp.abs(plain_again - base).max()),
        "eager_vs_jit_adapted_rel": rel(eager_adapted, got),
        "losses": losses,
        "grad_leaves": grad_leaves,
        "reload_max_diff": float(jnp.abs(lx.wrap(logits)(loaded, tokens)
                                         - lx.wrap(logits)(trained, tokens)).max()),
        "adapter_bytes": path.stat().st_size,
        "r_equal": bool(np.array_equal(
            np.asarray(loaded["layer_1"]["attn"]["kv_einsum"]["w_loraxs_R"]),
            np.asarray(trained["layer_1"]["attn"]["kv_einsum"]["w_loraxs_R"]))),
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
