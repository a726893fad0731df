"""Per-row adapters: every row of a mixed batch equals its adapter run alone through the
library's single-adapter path (``load_adapter`` + ``wrap``), encoder and decoder, with the bank
on one device and split over 8; KV-cache generation gives the same tokens (greedy and sampled,
left padding, EOS)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import loraxs_jax as lx
from loraxs_jax.models.generate import generate
from loraxs_jax.serving import BASE, AdapterBank, AdapterDirectory, rows

MIX = ["a2", BASE, "a0", "s2", "a1", "a2", "s2", "a0"]


def _mesh():
    return Mesh(np.array(jax.devices()[:8]), ("slots",))


def _bank(zoo, sharded, capacity=8):
    kw = {"mesh": _mesh(), "axis": "slots"} if sharded else {}
    return AdapterBank(zoo.base, zoo.cfg, capacity, source=AdapterDirectory(zoo.folder), **kw)


def _alone(zoo, name, *args, **kwargs):
    if name == BASE:
        return zoo.model.apply({"params": zoo.base}, *args, **kwargs)
    return lx.wrap(zoo.model.apply)({"params": zoo.alone(name)}, *args, **kwargs)


@pytest.mark.parametrize("sharded", [False, True], ids=["1-device", "8-devices"])
def test_decoder_rows_equal_each_adapter_alone(decoder_zoo, sharded):
    z = decoder_zoo
    bank = _bank(z, sharded)
    if sharded:
        assert len(bank.state["model/layers_0/self_attn/q_proj/kernel_loraxs_R"]
                   .sharding.device_set) == 8
    ids = bank.ensure(MIX)
    x = jax.random.randint(jax.random.key(1), (len(MIX), 7), 0, z.config.vocab_size)
    mask = jnp.ones_like(x).at[1, :3].set(0).at[3, :2].set(0)
    out = jax.jit(lambda a, i, x, m: rows.decoder_logits(z.model, a, i, x, m))(
        bank.arrays(), ids, x, mask)
    for b, name in enumerate(MIX):
        want = _alone(z, name, x[b:b + 1], attention_mask=mask[b:b + 1])
        np.testing.assert_allclose(np.asarray(out[b:b + 1]), np.asarray(want), rtol=1e-5,
                                   atol=1e-5, err_msg=name)
    # and the adapters really differ from each other and from the base
    assert float(jnp.abs(out[0] - out[2]).max()) > 1e-2
    assert float(jnp.abs(out[0] - out[1]).max()) > 1e-2


@pytest.mark.parametrize("sharded", [False, True], ids=["1-device", "8-devices"])
def test_encoder_rows_use_their_own_r_and_head(encoder_zoo, sharded):
    z = encoder_zoo
    bank = _bank(z, sharded)
    names = ["e1", BASE, "e0", "e2", "e1", "e0"]
    texts = ["a gripping, funny film", "dull", "the plot never lands but the cast is great",
             "I loved it", "not my kind of movie at all, sadly", "fine"]
    tok = z.tokenizer(texts, padding=True, return_tensors="np")
    ids, mask = jnp.asarray(tok["input_ids"]), jnp.asarray(tok["attention_mask"])
    slots = bank.ensure(names)     # before arrays(): a load donates the old state
    out = jax.jit(lambda a, i, x, m: rows.encoder_logits(z.model, a, i, x, m))(
        bank.arrays(), slots, ids, mask)
    assert out.shape == (len(names), 3) and out.dtype == jnp.float32
    for b, name in enumerate(names):
        want = _alone(z, name, ids[b:b + 1], mask[b:b + 1])
        np.testing.assert_allclose(np.asarray(out[b:b + 1]), np.asarray(want), rtol=1e-5,
                                   atol=1e-5, err_msg=name)
    assert float(jnp.abs(out[0] - out[2]).max()) > 1e-2


def _prompts(z, lengths, seed=3):
    """Left-padded prompts (B, P) of the given lengths, pad id 0."""
    rng = np.random.default_rng(seed)
    p = max(lengths)
    ids = np.zeros((len(lengths), p), np.int32)
    mask = np.zeros((len(lengths), p), np.int32)
    for b, n in enumerate(lengths):
        ids[b, p - n:] = rng.integers(1, z.config.vocab_size, n)
        mask[b, p - n:] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.parametrize("sharded", [False, True], ids=["1-device", "8-devices"])
def test_generation_rows_equal_each_adapter_alone(decoder_zoo, sharded):
    """Greedy: each row's tokens equal its adapter generating alone (batch of 1, no padding).
    Sampled: rows equal the same batch generated with one adapter for all rows (the sampling
    noise depends on the batch layout), per adapter. EOS: a row stops and is padded."""
    z = decoder_zoo
    bank = _bank(z, sharded)
    names = ["a0", "s2", BASE, "a1", "a2", "a0"]
    ids = bank.ensure(names)
    lengths = [5, 3, 6, 1, 4, 6]
    x, mask = _prompts(z, lengths)
    greedy = rows.generate(z.model, bank.arrays(), ids, x, mask, max_new_tokens=6)
    wrapped = lx.wrap(z.model.apply)
    for b, name in enumerate(names):
        n = lengths[b]
        one = x[b:b + 1, -n:]
        if name == BASE:
            want = generate(z.model.apply, z.base, z.config, one, max_new_tokens=6)
        else:
            want = generate(wrapped, z.alone(name), z.config, one, max_new_tokens=6)
        np.testing.assert_array_equal(np.asarray(greedy[b:b + 1]), np.asarray(want),
                                      err_msg=name)
    assert len({tuple(np.asarray(r)) for r in greedy}) > 3     # the adapters steer differently

    kw = dict(max_new_tokens=6, temperature=0.8, top_k=20, rng=jax.random.key(5))
    sampled = rows.generate(z.model, bank.arrays(), ids, x, mask, **kw)
    for name in set(names) - {BASE}:
        want = generate(wrapped, z.alone(name), z.config, x, mask, **kw)
        for b in [b for b, n in enumerate(names) if n == name]:
            np.testing.assert_array_equal(np.asarray(sampled[b]), np.asarray(want[b]),
                                          err_msg=name)

    eos = int(greedy[0, 1])                # row 0 emits it second: it must stop there
    stopped = rows.generate(z.model, bank.arrays(), ids, x, mask, max_new_tokens=6,
                            eos_token_id=eos, pad_token_id=0)
    assert int(stopped[0, 1]) == eos and np.all(np.asarray(stopped[0, 2:]) == 0)
    for b in range(len(names)):            # each row: greedy up to and including its first EOS
        g = np.asarray(greedy[b])
        hit = np.flatnonzero(g == eos)
        end = hit[0] + 1 if hit.size else len(g)
        np.testing.assert_array_equal(np.asarray(stopped[b, :end]), g[:end])


def test_models_without_per_row_extras_refuse_a_head_bank(encoder_zoo, decoder_zoo):
    z = encoder_zoo
    bank = AdapterBank(z.base, z.cfg, 4)
    with pytest.raises(ValueError, match=r"per-adapter extras .*classifier"):
        rows.decoder_logits(z.model, bank.arrays(), jnp.zeros(1, jnp.int32),
                            jnp.zeros((1, 3), jnp.int32))
