"""GLUE data: packaged splits, the VADER-derived SST-2 training set, local files, bad input,
tokenization and resumable batching."""

import json
import re

import datasets
import numpy as np
import pytest
import tokenizers
import transformers

from loraxs_jax.experiments.assets import asset_path
from loraxs_jax.experiments.data import glue


@pytest.fixture(scope="module")
def sst2_dev():
    return glue.load_glue("sst2", "validation")


def test_packaged_validation_splits_have_the_published_sizes(sst2_dev):
    # GLUE dev sizes and label balance: SST-2 872 (444 positive), RTE 277 (146 entailment),
    # MRPC 408 (279 equivalent).
    assert len(sst2_dev) == 872 and sum(sst2_dev["label"]) == 444
    rte, mrpc = glue.load_glue("rte", "validation"), glue.load_glue("mrpc", "validation")
    assert len(rte) == 277 and rte["label"].count(0) == 146
    assert len(mrpc) == 408 and sum(mrpc["label"]) == 279
    assert rte.features["label"].names == ["entailment", "not_entailment"]
    assert set(mrpc.column_names) == {"sentence1", "sentence2", "label", "idx"}


def test_vader_train_counts_and_no_validation_text(sst2_dev):
    train, stats = glue.sst2_train_from_vader()
    assert stats == {"snippets": 10605, "neutral": 37, "duplicate": 2, "sst2_validation": 817,
                     "agree_with_sst2": 776, "kept": 9749, "positive": 4824}
    assert len(train) == 9749 and sum(train["label"]) == 4824
    assert 10605 - 37 - 2 - 817 == 9749
    # The mean-rating sign agrees with SST-2's label on 95% of the overlapping snippets.
    assert stats["agree_with_sst2"] / stats["sst2_validation"] > 0.94
    # Independent leak check, without sentence boundaries: no kept text equals a validation
    # sentence, or contains one of 30+ letters (shorter ones would match by chance: "bad").
    key = lambda s: re.sub(r"[^a-z0-9]", "", s.lower().replace("-lrb-", "").replace("-rrb-", ""))
    dev = {key(s) for s in sst2_dev["sentence"]}
    kept = [key(s) for s in train["sentence"]]
    assert not dev & set(kept)
    long_dev = [d for d in dev if len(d) >= 30 and d.isascii()]
    assert len(long_dev) > 750
    joined = "\n".join(kept)
    assert not [d for d in long_dev if d in joined]
    # Labels follow the rating sign; the text is in SST's lowercase tokenized style.
    assert all((r > 0) == bool(y) for r, y in zip(train["rating"], train["label"]))
    assert train[0]["sentence"].startswith("the rock is destined to be the 21st century 's new")


def test_vader_neutral_margin_drops_more():
    _, stats = glue.sst2_train_from_vader(neutral_margin=0.5)
    assert stats["neutral"] > 37 and stats["kept"] < 9749


def test_load_glue_local_formats(tmp_path):
    rows = [{"sentence1": "A man sleeps.", "sentence2": "A person rests.", "label": 0},
            {"sentence1": "It rains.", "sentence2": "It is sunny.", "label": "not_entailment"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = glue.load_glue("rte", "train", source=tmp_path)
    assert ds["label"] == [0, 1] and ds["idx"] == [0, 1]
    # Original GLUE MRPC TSV (its own column names).
    (tmp_path / "dev.tsv").write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                                      "1\t1\t2\tHe said hi .\tHe greeted .\n")
    ds = glue.load_glue("mrpc", "validation", source=tmp_path)
    assert ds[0] == {"sentence1": "He said hi .", "sentence2": "He greeted .", "label": 1,
                     "idx": 0}
    # Original GLUE CoLA TSV: no header.
    cola = tmp_path / "cola.tsv"
    cola.write_text("gj04\t1\t\tThe book was read .\ngj04\t0\t*\tBook the read was .\n")
    assert glue.load_glue("cola", "train", source=cola)["label"] == [1, 0]
    # STS-B float labels in a csv; an arrow folder written by save_to_disk.
    stsb = tmp_path / "stsb.csv"
    stsb.write_text("sentence1,sentence2,label\nA cat.,A kitten.,4.2\n")
    assert glue.load_glue("stsb", "train", source=stsb)["label"] == [pytest.approx(4.2)]
    datasets.load_from_disk(str(asset_path("olmo") / "hf_datasets/glue/rte/validation")) \
        .save_to_disk(str(tmp_path / "rte_copy"))
    assert len(glue.load_glue("rte", "validation", source=tmp_path / "rte_copy")) == 277


@pytest.mark.parametrize("content, error, pattern", [
    (None, FileNotFoundError, r"missing\.jsonl does not exist"),
    ('{"sentence": "ok", "label": 1}\n{"sentence": "bad json"', ValueError,
     r"bad\.jsonl line 2: malformed JSON"),
    ('{"sentence": "ok", "label": 1}\n{"sentence": "fine", "label": 2}', ValueError,
     r"bad\.jsonl row 1: label 2 is outside the sst2 label set \[0, 1\]"),
    ('{"sentence": "", "label": 1}', ValueError,
     r"bad\.jsonl row 0: sst2 needs a non-empty string column 'sentence'"),
    ('{"text2": "x", "label": 1}', ValueError, r"row 0: sst2 needs .*'sentence'.*columns"),
    ("", ValueError, r"bad\.jsonl: the sst2 train split is empty"),
])
def test_bad_local_files_raise_naming_file_and_row(tmp_path, content, error, pattern):
    path = tmp_path / ("missing.jsonl" if content is None else "bad.jsonl")
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=pattern):
        glue.load_glue("sst2", "train", source=path)


def test_bad_task_split_and_source(tmp_path):
    with pytest.raises(KeyError, match="unknown GLUE task 'sst5'.*sst2, mrpc, cola"):
        glue.load_glue("sst5", "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        glue.load_glue("sst2", "dev")
    with pytest.raises(ValueError, match=r"packaged assets hold GLUE .* not cola train"):
        glue.load_glue("cola", "train", source="assets")
    with pytest.raises(FileNotFoundError, match=r"no validation file in .*dev\.\{jsonl"):
        glue.load_glue("sst2", "validation", source=tmp_path)
    (tmp_path / "stsb.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "label": 7}')
    with pytest.raises(ValueError, match=r"STS-B label 7 is not a similarity in \[0, 5\]"):
        glue.load_glue("stsb", "train", source=tmp_path / "stsb.jsonl")


@pytest.fixture(scope="module")
def tokenizer_json():
    return tokenizers.Tokenizer.from_file(str(asset_path("minilm") / "tokenizer.json"))


def test_tokenization_pairs_both_tokenizer_kinds_agree(tokenizer_json):
    rte = glue.load_glue("rte", "validation")
    a = glue.tokenize_glue(rte, "rte", tokenizer_json, max_length=128)
    hf = transformers.AutoTokenizer.from_pretrained(str(asset_path("minilm")))
    b = glue.tokenize_glue(rte, "rte", hf, max_length=128)
    assert set(a) == set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ids, types, mask = a["input_ids"], a["token_type_ids"], a["attention_mask"]
    assert ids.shape == (277, 128) and ids.dtype == np.int32
    assert (ids[:, 0] == 101).all()  # [CLS]
    # Two [SEP] per row, the second segment has token type 1, padding is masked.
    assert ((ids == 102).sum(1) == 2).all()
    first_sep = (ids == 102).argmax(1)
    assert all(types[i, first_sep[i] + 1] == 1 for i in range(277) if mask[i, first_sep[i] + 1])
    assert ((ids == 0) == (mask == 0)).all()
    # Long pairs are truncated to exactly max_length.
    assert mask.sum(1).max() == 128
    # The tokenizer object passed in is not modified.
    assert tokenizer_json.padding["length"] == 128 and tokenizer_json.truncation is not None


def test_single_sentence_has_no_second_segment(tokenizer_json, sst2_dev):
    a = glue.tokenize_glue(sst2_dev, "sst2", tokenizer_json, max_length=64)
    assert a["input_ids"].shape == (872, 64) and (a["token_type_ids"] == 0).all()
    assert a["labels"].tolist() == sst2_dev["label"]


def _stream(arrays, **kw):
    return glue.glue_batches(arrays, 32, seed=3, **kw)


def test_batches_resume_exactly(tokenizer_json, sst2_dev):
    arrays = glue.tokenize_glue(sst2_dev, "sst2", tokenizer_json, max_length=32)
    full = list(_stream(arrays, num_epochs=3))
    assert len(full) == 3 * (872 // 32)
    for k in (5, 27, 40):  # mid-epoch and right at an epoch boundary (27 batches per epoch)
        it = _stream(arrays, num_epochs=3)
        head = [b for _, b in zip(range(k), it)]
        state = json.loads(json.dumps(it.state_dict()))  # survives a checkpoint round trip
        resumed = _stream(arrays, num_epochs=3)
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert len(head) + len(rest) == len(full)
        for got, want in zip(head + rest, full):
            np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
            np.testing.assert_array_equal(got["labels"], want["labels"])
    # Each epoch is a permutation (no example twice), and epochs differ.
    e0 = np.concatenate([b["labels"] for b in full[:27]])
    assert len(e0) == 864
    assert not np.array_equal(full[0]["input_ids"], full[27]["input_ids"])
    with pytest.raises(ValueError, match="saved with seed=3 into a stream with seed=4"):
        glue.glue_batches(arrays, 32, seed=4).load_state_dict(state)


def test_eval_batches_cover_every_example_once(tokenizer_json, sst2_dev):
    arrays = glue.tokenize_glue(sst2_dev, "sst2", tokenizer_json, max_length=32)
    batches = list(glue.glue_batches(arrays, 100, shuffle=False, drop_remainder=False,
                                     pad_remainder=True, num_epochs=1))
    assert len(batches) == 9 and all(b["input_ids"].shape == (100, 32) for b in batches)
    weights = np.concatenate([b["weights"] for b in batches])
    assert weights.sum() == 872 and weights[872:].sum() == 0
    labels = np.concatenate([b["labels"] for b in batches])[:872]
    assert labels.tolist() == sst2_dev["label"]


def test_hub_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"could not load GLUE cola train from the hub .*"
                                           r"offline, use source='assets'"):
        glue.load_glue("cola", "train")  # "auto": the assets lack CoLA, so the hub is tried


def test_sentence_matching_respects_sentence_boundaries():
    index = glue.SentenceIndex([glue.sst_key(s)[0] for s in ("bad . ", "it 's a gem . ")])
    find = lambda text: index.find(*glue.sst_key(text))
    assert find("Bad. But the rest works.") == ["bad"]
    assert find("It's too bad it isn't longer.") == []  # "bad" inside a sentence
    assert find("Badger movies are rare.") == []
    assert find("Jirí's script -- it's a gem!") == ["itsagem"]
    assert glue.sst_key("Naïve (sort of)")[0] == glue.sst_key("naive -lrb- sort of -rrb-")[0]
