"""Causal-LM batching: prompt masking, truncation, bucketing, exact resume, left padding."""

import json

import numpy as np
import pytest
import tokenizers

from loraxs_jax.experiments.assets import asset_path
from loraxs_jax.experiments.data import commonsense, lm
from loraxs_jax.experiments.data.batching import bucketed_plan

CLS, SEP, PAD = 101, 102, 0  # the MiniLM (BERT) vocabulary's special ids, used as bos/eos/pad


@pytest.fixture(scope="module")
def tok():
    return tokenizers.Tokenizer.from_file(str(asset_path("minilm") / "tokenizer.json"))


@pytest.fixture(scope="module")
def ref(tok):
    """An independent encoder for expected ids: the same vocabulary, padding and truncation off
    (MiniLM's tokenizer.json pads to 128)."""
    plain = tokenizers.Tokenizer.from_str(tok.to_str())
    plain.no_padding()
    plain.no_truncation()
    return lambda text: plain.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def examples(tok):
    """Real instruction data of mixed length: two commonsense evaluation sets."""
    rows = [r for t in ("boolq", "hellaswag") for r in
            commonsense.load_commonsense(t, "validation").select(range(300)).to_list()]
    prompts = [commonsense.commonsense_prompt(r["instruction"]) for r in rows]
    return lm.tokenize_lm(tok, prompts, [r["output"] for r in rows], max_length=512,
                          bos_id=CLS, eos_id=SEP), prompts, rows


def test_prompt_tokens_are_masked_and_completion_is_learned(tok, ref, examples):
    ex, prompts, rows = examples
    batch = lm.collate_lm(ex, np.arange(8), pad_id=PAD, pad_multiple=64)
    assert batch["input_ids"].shape[1] % 64 == 0
    for b in range(8):
        n_prompt = len(ref(prompts[b])) + 1  # + bos
        labels, ids = batch["labels"][b], batch["input_ids"][b]
        assert (labels[:n_prompt] == lm.IGNORE).all()
        learned = labels[labels != lm.IGNORE]
        # Exactly the completion's tokens and eos are learned, at their own positions.
        assert tok.decode(learned[:-1].tolist()) == rows[b]["output"]
        assert learned[-1] == SEP
        np.testing.assert_array_equal(learned, ids[n_prompt: n_prompt + len(learned)])
        assert (batch["loss_mask"][b] == (labels != lm.IGNORE)).all()
        assert (ids[batch["attention_mask"][b] == 0] == PAD).all()


def test_truncation_and_drops_are_counted(tok, caplog):
    caplog.set_level("INFO", logger="loraxs_jax.experiments.data.lm")
    ex = lm.tokenize_lm(tok, ["short question", "word " * 40, "word " * 10],
                        ["answer", "answer", "a much longer answer than fits"], max_length=16,
                        bos_id=CLS, eos_id=SEP)
    assert len(ex) == 2 and ex.lengths.tolist() == [5, 16]
    assert "3 examples, 1 truncated to 16 tokens, 1 dropped" in caplog.text
    with pytest.raises(ValueError, match="no example fits max_length=4"):
        lm.tokenize_lm(tok, ["word " * 10], ["x"], max_length=4, bos_id=CLS, eos_id=SEP)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        lm.tokenize_lm(tok, ["a", "b"], ["x"], max_length=16)


def test_bucketing_cuts_padding_and_keeps_epochs_complete(examples):
    ex, _, _ = examples
    kw = dict(pad_id=PAD, seed=0, pad_multiple=8)
    bucketed = [b for _, b in zip(range(18), lm.lm_batches(ex, 32, bucket=True, **kw))]
    plain = [b for _, b in zip(range(18), lm.lm_batches(ex, 32, bucket=False, **kw))]
    pb, pp = lm.padding_fraction(bucketed), lm.padding_fraction(plain)
    assert pb < 0.5 * pp, (pb, pp)
    # Every epoch of the bucketed plan uses each example at most once, 600 // 32 * 32 in all.
    plan = bucketed_plan(ex.lengths, 32, seed=0, window=4)
    for epoch in range(3):
        idx = np.concatenate(plan(epoch))
        assert len(idx) == 576 and len(set(idx.tolist())) == 576
    assert not np.array_equal(np.concatenate(plan(0)), np.concatenate(plan(1)))


def test_lm_stream_resumes_exactly(examples):
    ex, _, _ = examples
    make = lambda: lm.lm_batches(ex, 16, pad_id=PAD, seed=7, num_epochs=2, window=4)
    full = list(make())
    assert len(full) == 2 * (600 // 16)
    for k in (1, 20, 37, 50):
        it = make()
        head = [b for _, b in zip(range(k), it)]
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(it.state_dict())))
        got = head + list(resumed)
        assert len(got) == len(full)
        for g, w in zip(got, full):
            np.testing.assert_array_equal(g["input_ids"], w["input_ids"])
            np.testing.assert_array_equal(g["labels"], w["labels"])


def test_generation_batch_left_pads(tok, ref):
    prompts = ["What is the capital of France?", "Hi", "A longer prompt with several words in it"]
    g = lm.generation_batch(tok, prompts, pad_id=PAD, bos_id=CLS, pad_multiple=8)
    ids, mask, pos = g["input_ids"], g["attention_mask"], g["positions"]
    assert ids.shape[1] % 8 == 0 and (mask[:, -1] == 1).all()
    for b, p in enumerate(prompts):
        want = [CLS] + ref(p)
        assert ids[b, mask[b] == 1].tolist() == want
        assert pos[b, mask[b] == 1].tolist() == list(range(len(want)))
        assert (ids[b, mask[b] == 0] == PAD).all()
    cut = lm.generation_batch(tok, prompts, pad_id=PAD, bos_id=CLS, max_length=4)
    assert cut["input_ids"].shape == (3, 4)
    assert cut["input_ids"][2].tolist() == ref(prompts[2])[-4:]
