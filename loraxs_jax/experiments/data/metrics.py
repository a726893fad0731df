"""Metrics of the paper's three benchmarks, in numpy, plus answer extraction from generations.

GLUE: accuracy, F1 (MRPC), Matthews correlation (CoLA), Pearson / Spearman (STS-B). The LoRA /
VeRA / LoRA-XS tables report Matthews for CoLA, Pearson for STS-B and accuracy for the rest
(MRPC included); ``glue_metrics`` returns those and the secondary ones.

Math: ``extract_gsm8k_answer`` reads the number a model (or a reference solution) ends on;
``extract_math_answer`` / ``normalize_math_answer`` / ``math_equal`` follow the MATH conventions
(last ``\\boxed{}``, LaTeX normalization in the spirit of Hendrycks et al. 2021 and Minerva).

Commonsense: ``extract_commonsense_answer`` is LLM-Adapters' rule (first answer keyword).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def _pair(preds: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds), np.asarray(labels)
    if p.shape != y.shape or p.ndim != 1 or len(p) == 0:
        raise ValueError(f"expected two non-empty 1-D arrays of one length, got {p.shape} and "
                         f"{y.shape}")
    return p, y


def accuracy(preds: ArrayLike, labels: ArrayLike) -> float:
    p, y = _pair(preds, labels)
    return float(np.mean(p == y))


def f1_score(preds: ArrayLike, labels: ArrayLike, positive: int = 1) -> float:
    """Binary F1 of class ``positive``: 2·TP / (2·TP + FP + FN); 0 when there is no positive."""
    p, y = _pair(preds, labels)
    tp = np.sum((p == positive) & (y == positive))
    fp = np.sum((p == positive) & (y != positive))
    fn = np.sum((p != positive) & (y == positive))
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0


def matthews_corrcoef(preds: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation (multiclass form of Gorodkin 2004); 0 when undefined.

    MCC = (c·s − Σ_k p_k·t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²)) with c correct predictions,
    s samples, p_k / t_k the predicted / true counts of class k.
    """
    p, y = _pair(preds, labels)
    classes = np.union1d(p, y)
    pk = np.array([np.sum(p == k) for k in classes], np.float64)
    tk = np.array([np.sum(y == k) for k in classes], np.float64)
    c, s = float(np.sum(p == y)), float(len(y))
    denom = math.sqrt((s * s - pk @ pk) * (s * s - tk @ tk))
    return float((c * s - pk @ tk) / denom) if denom else 0.0


def pearson(preds: ArrayLike, labels: ArrayLike) -> float:
    p, y = _pair(preds, labels)
    p, y = p.astype(np.float64) - p.mean(), y.astype(np.float64) - y.mean()
    denom = math.sqrt(float(p @ p) * float(y @ y))
    return float(p @ y / denom) if denom else 0.0


def rankdata(x: ArrayLike) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy's 'average' method)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # Boundaries of runs of equal values; each run gets the mean of its positions.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based positions starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(preds: ArrayLike, labels: ArrayLike) -> float:
    """Spearman's rho: Pearson correlation of the (tie-averaged) ranks."""
    p, y = _pair(preds, labels)
    return pearson(rankdata(p), rankdata(y))


def glue_metrics(task: str, preds: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """The metrics reported for a GLUE task; ``primary`` is the one in the paper's Table 1.

    ``preds`` are class ids (argmax of the logits) or, for STS-B, predicted similarities.
    """
    if task == "stsb":
        out = {"pearson": pearson(preds, labels), "spearman": spearman(preds, labels)}
        return {**out, "primary": out["pearson"]}
    if task == "cola":
        out = {"matthews": matthews_corrcoef(preds, labels), "accuracy": accuracy(preds, labels)}
        return {**out, "primary": out["matthews"]}
    if task == "mrpc":
        out = {"accuracy": accuracy(preds, labels), "f1": f1_score(preds, labels)}
        return {**out, "primary": out["accuracy"]}
    if task in ("sst2", "qnli", "rte", "mnli"):
        acc = accuracy(preds, labels)
        return {"accuracy": acc, "primary": acc}
    raise KeyError(f"unknown GLUE task {task!r}; expected sst2, mrpc, cola, qnli, rte or stsb")


# ---------------------------------------------------------------------------------------------
# GSM8K

_NUMBER = r"-?[$]?\s*\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|-?\.\d+"
_ANSWER_MARKERS = (
    re.compile(r"the answer is\s*:?\s*(.*)", re.IGNORECASE | re.DOTALL),  # MetaMath, CoT
    re.compile(r"####\s*(.*)", re.DOTALL),  # GSM8K reference format
    re.compile(r"\\boxed\{(.*)", re.DOTALL),
)


def _to_number(text: str) -> float | None:
    text = text.replace("$", "").replace(",", "").replace(" ", "")
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(Fraction(num) / Fraction(den)) if float(den) else None
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def extract_gsm8k_answer(text: str) -> float | None:
    """The final numeric answer of a GSM8K-style solution, or None.

    Looks for the last "The answer is[:] X" (MetaMath's format), "#### X" (GSM8K's) or
    "\\boxed{X}" and takes the first number after it; without a marker, the last number in the
    text. Numbers may carry thousands separators, a dollar sign, a trailing period or units
    ("$1,200.50 per week" -> 1200.5) and may be fractions ("3/4" -> 0.75).
    """
    for marker in _ANSWER_MARKERS:
        hits = list(marker.finditer(text))
        if hits:
            m = re.search(_NUMBER, hits[-1].group(1))
            if m:
                return _to_number(m.group())
    numbers = re.findall(_NUMBER, text)
    return _to_number(numbers[-1]) if numbers else None


def gsm8k_equal(pred: float | str | None, gold: float | str) -> bool:
    """Numeric equality of an extracted answer and the gold one (strings are parsed first)."""
    pred = extract_gsm8k_answer(pred) if isinstance(pred, str) else pred
    gold = extract_gsm8k_answer(gold) if isinstance(gold, str) else gold
    return pred is not None and gold is not None and math.isclose(pred, gold, rel_tol=1e-6,
                                                                  abs_tol=1e-9)


# ---------------------------------------------------------------------------------------------
# MATH


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed x``), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:].split("\\", 1)[1]
    rest = rest[len("boxed"):] if rest.startswith("boxed") else rest[len("fbox"):]
    if rest.startswith(" "):  # "\boxed 5"
        return rest.strip().split("$")[0].strip() or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, c in enumerate(rest):
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return rest[1:i]
    return None  # unbalanced


def extract_math_answer(text: str) -> str | None:
    """The final answer of a MATH solution: the last \\boxed{} or, failing that, the text
    after the last "The answer is[:]" (MetaMath's format); None when neither is there."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    hits = re.findall(r"the answer is\s*:?\s*(.+)", text, re.IGNORECASE)
    return hits[-1].strip().rstrip(".").strip() if hits else None


def unwrap_command(text: str, command: str) -> str:
    """Replace every ``\\command{X}`` by X (nested braces respected)."""
    head = "\\" + command + "{"
    while (i := text.find(head)) >= 0:
        depth, j = 0, i + len(head) - 1
        for j in range(i + len(head) - 1, len(text)):
            depth += (text[j] == "{") - (text[j] == "}")
            if depth == 0:
                break
        else:
            return text  # unbalanced: leave as is
        text = text[:i] + text[i + len(head) : j] + text[j + 1 :]
    return text


_UNITS = (
    "degrees", "degree", "dollars", "dollar", "cents", "cent", "units", "unit", "square", "sq",
    "inches", "inch", "feet", "foot", "ft", "meters", "meter", "cm", "mm", "km", "m", "miles",
    "mile", "mph", "hours", "hour", "minutes", "minute", "seconds", "second", "days", "day",
    "pounds", "pound", "points", "point", "ways", "students", "people", "cups", "cup", "th",
    "st", "nd", "rd",
)
_UNIT_RE = re.compile(r"\\(?:text|mbox|mathrm)\{\s*(?:" + "|".join(_UNITS) + r")\s*\.?\s*\}(?:\^\d)?")
# A number followed only by words ("65 children tickets", "18 ways."): keep the number.
_NUMBER_WORDS_RE = re.compile(r"^(-?[\d.,]+)\s+[a-zA-Z][a-zA-Z ]*\.?(?:\^\d)?$")


def normalize_math_answer(answer: str) -> str:
    """A canonical string for a MATH final answer, so equal answers compare equal as strings.

    Removes $, display spacing (\\! \\, \\; \\quad ~), \\left/\\right, degrees (^\\circ, °),
    percent signs, units in \\text{} or as a trailing word, thousands separators; unwraps
    \\text{}, \\textbf{}, \\mathrm{}, \\mbox{}, \\boxed{}; maps \\dfrac/\\tfrac to \\frac,
    shorthand \\frac12 to \\frac{1}{2}, \\sqrt2 to \\sqrt{2}, a/b (integers) to \\frac{a}{b},
    ".5" to "0.5", a short "x = 5" to "5"; drops all whitespace and a trailing period.
    """
    s = answer.strip()
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\0")  # keep row breaks \\
    s = re.sub(r"\\(?:,|;|:|quad|qquad| )", "", s).replace("~", "")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    s = s.replace("{,}", "").replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = _UNIT_RE.sub("", s)
    for cmd in ("boxed", "text", "textbf", "mathrm", "mbox", "textnormal", "mathbf"):
        s = unwrap_command(s, cmd)
    s = _NUMBER_WORDS_RE.sub(r"\1", s.strip())
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:  # "x = 5", "k=3"
        s = s.split("=")[1]
    s = s.replace(" ", "").rstrip(".")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    if re.fullmatch(r"-?\d+/\d+", s):
        num, den = s.split("/")
        s = f"\\frac{{{num}}}{{{den}}}"
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)
    return s.replace("\0", "\\\\")


def _numeric(s: str) -> float | None:
    """Value of a normalized answer that is a plain number or a (signed) \\frac of numbers."""
    m = re.fullmatch(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s)
    try:
        if m:
            value = float(m.group(2)) / float(m.group(3))
            return -value if m.group(1) else value
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def math_equal(pred: str | None, gold: str) -> bool:
    """Equivalence of two MATH answers: equal after ``normalize_math_answer``, or both numbers
    (integers, decimals, \\frac{a}{b}) with the same value (relative tolerance 1e-6)."""
    if pred is None:
        return False
    a, b = normalize_math_answer(pred), normalize_math_answer(gold)
    if a == b:
        return True
    x, y = _numeric(a), _numeric(b)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


# ---------------------------------------------------------------------------------------------
# Commonsense (LLM-Adapters)

COMMONSENSE_ANSWER_PATTERNS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "siqa": r"answer1|answer2|answer3|answer4|answer5",
    "arc_easy": r"answer1|answer2|answer3|answer4|answer5",
    "arc_challenge": r"answer1|answer2|answer3|answer4|answer5",
    "obqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}
# LLM-Adapters' dataset names -> ours.
COMMONSENSE_ALIASES = {"social_i_qa": "siqa", "ARC-Easy": "arc_easy",
                       "ARC-Challenge": "arc_challenge", "openbookqa": "obqa"}


def extract_commonsense_answer(task: str, text: str) -> str:
    """LLM-Adapters' answer extraction: the first answer keyword of the task in the generated
    text ("true", "solution2", "answer3", "ending1", "option2"), or "" when there is none."""
    task = COMMONSENSE_ALIASES.get(task, task)
    if task not in COMMONSENSE_ANSWER_PATTERNS:
        raise KeyError(f"unknown commonsense task {task!r}; expected one of "
                       f"{', '.join(COMMONSENSE_ANSWER_PATTERNS)}")
    hits = re.findall(COMMONSENSE_ANSWER_PATTERNS[task], text.strip())
    return hits[0] if hits else ""
