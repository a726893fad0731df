"""KV-cache generation: cached greedy equals full recompute, EOS, sampling filters, LoRA-XS through
wrap, and sharded generation on meshes equal to one device."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraxs_jax
from loraxs_jax import parallel as sh
from loraxs_jax.models import decoder as dec
from loraxs_jax.models.decoder import DecoderConfig, DecoderForCausalLM, init_params, param_shapes
from loraxs_jax.models.generate import generate, sample_logits

CONFIG = DecoderConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=5)


NEW = 10


APPLY = DecoderForCausalLM(CONFIG).apply  # one function object: generate's compile cache hits


@pytest.fixture(scope="module")
def params():
    # Large weights so greedy continuations vary instead of repeating one token.
    return jax.tree.map(lambda x: 8 * x if x.ndim == 2 else x,
                        init_params(CONFIG, jax.random.key(1)))


def test_init_params_gives_plain_arrays_of_the_declared_shapes(params):
    got = jax.tree.map(lambda x: (isinstance(x, jax.Array), x.shape, x.dtype), params)
    want = jax.tree.map(lambda x: (True, x.shape, x.dtype), param_shapes(CONFIG))
    assert got == want


def _prompts():
    ids = np.random.RandomState(0).randint(3, 61, (3, 6)).astype(np.int32)
    mask = np.ones((3, 6), np.int32)
    mask[1, :2] = 0
    mask[2, :4] = 0
    return np.where(mask == 1, ids, 0), mask


def _greedy_without_cache(config, params, ids, mask, steps):
    """Recomputes the whole sequence each step (no cache): a fixed (B, P + steps) buffer whose
    not-yet-generated tail is masked padding, which causal attention never reads."""
    model = DecoderForCausalLM(config)
    b, p = ids.shape
    seq = np.concatenate([ids, np.zeros((b, steps), np.int32)], 1)
    seq_mask = np.concatenate([mask, np.zeros((b, steps), np.int32)], 1)
    forward = jax.jit(lambda s, m: model.apply({"params": params}, s, m))
    for i in range(steps):
        logits = np.asarray(forward(seq, seq_mask))
        seq[:, p + i] = logits[:, p + i - 1].argmax(-1)
        seq_mask[:, p + i] = 1
    return seq[:, p:]


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_greedy_equals_full_recompute(params, scan_layers):
    config = dataclasses.replace(CONFIG, scan_layers=scan_layers)
    if scan_layers:  # the same weights, stacked along a leading layer axis
        layers = [params["model"][f"layers_{i}"] for i in range(config.num_layers)]
        params = {**params, "model": {"embed_tokens": params["model"]["embed_tokens"],
                                      "norm": params["model"]["norm"],
                                      "layers": jax.tree.map(lambda *x: jnp.stack(x), *layers)}}
    ids, mask = _prompts()
    want = _greedy_without_cache(config, params, ids, mask, NEW)
    apply = APPLY if not scan_layers else DecoderForCausalLM(config).apply
    got = np.asarray(generate(apply, params, config, ids, mask, NEW))
    np.testing.assert_array_equal(got, want)
    assert len(set(want[0])) > 2  # a real continuation, not one repeated token


def test_eos_stops_rows_and_pads_after(params):
    ids, mask = _prompts()
    apply = APPLY
    free = np.asarray(generate(apply, params, CONFIG, ids, mask, NEW))
    eos = int(free[0, 2])
    out = np.asarray(generate(apply, params, CONFIG, ids, mask, NEW, eos_token_id=[eos, 999],
                              pad_token_id=-1))
    for row_free, row in zip(free, out):
        hits = np.flatnonzero(row_free == eos)
        stop = hits[0] + 1 if hits.size else NEW
        np.testing.assert_array_equal(row[:stop], row_free[:stop])
        assert (row[stop:] == -1).all()
    assert (out[0, 3:] == -1).all()


def test_prompts_must_be_left_padded(params):
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="left-padded"):
        generate(APPLY, params, CONFIG, ids, mask[:, ::-1], 2)


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.key(0)
    draw = lambda **kw: np.asarray(sample_logits(logits, keys, temperature=1.0, **kw))
    freq = np.bincount(draw(), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    assert set(draw(top_k=2)) == {0, 1}
    assert set(draw(top_p=0.7)) == {0, 1}  # 0.5 < 0.7 needs the second token, not the third
    assert set(draw(top_p=0.5)) == {0}
    np.testing.assert_array_equal(sample_logits(logits[:2], keys), [0, 0])


def test_generate_through_loraxs_wrap_equals_merged(params):
    cfg = loraxs_jax.LoraXSConfig(rank=2, alpha=2.0, targets=(r"(q|v)_proj/kernel$",), r_std=1.0)
    adapted = loraxs_jax.apply(params, cfg, rng=jax.random.key(0))
    ids, mask = _prompts()
    apply = APPLY
    run = functools.partial(generate, config=CONFIG, input_ids=ids, attention_mask=mask,
                            max_new_tokens=NEW)
    wrapped = np.asarray(run(loraxs_jax.wrap(apply), adapted))
    np.testing.assert_array_equal(wrapped, run(apply, loraxs_jax.merge(adapted)))
    assert (wrapped != np.asarray(run(apply, params))).any()


MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]


@pytest.mark.parametrize("shape", MESHES)
def test_generation_on_a_mesh_equals_single_device(tiny_decoder, mesh_of, place, shape):
    d = tiny_decoder
    ids, mask = d.prompts(8)
    want = np.asarray(generate(d.apply, d.params, d.config, ids, mask, 6, eos_token_id=1))
    assert len({tuple(r) for r in want.tolist()}) > 1
    mesh = mesh_of(shape)
    base_sh = sh.param_shardings(dec.param_shapes(d.config), dec.param_logical_axes(d.config), mesh)
    params, shardings = place(d.params, base_sh)
    got = generate(d.apply, params, d.config, ids, mask, 6, eos_token_id=1, mesh=mesh,
                   param_shardings=shardings)
    assert got.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(got), want)


def test_generation_on_a_mesh_checks_its_inputs(tiny_decoder, mesh_of, place):
    mesh = mesh_of((8, 1, 1))
    ids, mask = tiny_decoder.prompts(6)
    with pytest.raises(ValueError, match=r"global batch size 6 .* data\*fsdp = 8\*1 = 8"):
        generate(tiny_decoder.apply, tiny_decoder.params, tiny_decoder.config, ids, mask, 2, mesh=mesh,
                 param_shardings=jax.tree.map(lambda _: sh.replicated(mesh), tiny_decoder.params))
    with pytest.raises(ValueError, match="both mesh and param_shardings"):
        generate(tiny_decoder.apply, tiny_decoder.params, tiny_decoder.config, ids, mask, 2, mesh=mesh)
