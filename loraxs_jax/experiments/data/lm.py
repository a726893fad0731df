"""Causal-LM batches for instruction tuning: prompt tokens masked out of the loss, length
bucketing, deterministic shuffling, resumable position, and left-padded generation prompts.

An example is ``[bos] + encode(prompt) + encode(completion) + [eos]``, the two parts encoded
separately so that the prompt tokens a model sees at generation time are exactly those it was
trained on (encoding the concatenation can merge tokens across the boundary). Only completion
tokens (and eos) count in the loss.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loraxs_jax.experiments.data.batching import Batches, bucketed_plan, shuffled_plan

log = logging.getLogger(__name__)

IGNORE = -100  # label of positions that do not count in the loss (HF convention)


@dataclass(frozen=True)
class LMExamples:
    """Tokenized examples: ``tokens[i]`` (int32, variable length) of which the first
    ``prompt_lengths[i]`` are prompt."""

    tokens: list[np.ndarray]
    prompt_lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.tokens])


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids without special tokens, for a transformers or a tokenizers tokenizer."""
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer: a copy without padding
        tok = type(tokenizer).from_str(tokenizer.to_str())
        tok.no_padding()
        tok.no_truncation()
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _special(tokenizer: Any, name: str, given: int | None | str) -> int | None:
    if given != "auto":
        return given
    return getattr(tokenizer, f"{name}_token_id", None)


def tokenize_lm(tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], *,
                max_length: int, bos_id: int | None | str = "auto",
                eos_id: int | None | str = "auto") -> LMExamples:
    """Tokenize (prompt, completion) pairs for training.

    Args:
      tokenizer: a ``transformers`` tokenizer or a ``tokenizers.Tokenizer``.
      max_length: longer examples lose the end of their completion; examples whose prompt
        alone leaves no room for a completion token are dropped. Both counts are logged.
      bos_id, eos_id: ids to put around each example; "auto" reads ``tokenizer.bos_token_id``
        / ``eos_token_id`` (None: leave out).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    bos, eos = _special(tokenizer, "bos", bos_id), _special(tokenizer, "eos", eos_id)
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    tokens, prompt_lengths, truncated, dropped = [], [], 0, 0
    for p, c in zip(_encode(tokenizer, prompts), _encode(tokenizer, completions)):
        prompt = head + p
        if len(prompt) >= max_length:
            dropped += 1
            continue
        ids = prompt + c + tail
        if len(ids) > max_length:
            truncated += 1
            ids = ids[:max_length]
        tokens.append(np.asarray(ids, np.int32))
        prompt_lengths.append(len(prompt))
    if truncated or dropped:
        log.info("tokenize_lm: %d examples, %d truncated to %d tokens, %d dropped (prompt alone "
                 ">= max_length)", len(prompts), truncated, max_length, dropped)
    if not tokens:
        raise ValueError(f"no example fits max_length={max_length} ({len(prompts)} given)")
    return LMExamples(tokens, np.asarray(prompt_lengths, np.int32))


def _padded_length(longest: int, pad_multiple: int, max_length: int | None) -> int:
    length = -(-longest // pad_multiple) * pad_multiple
    return min(length, max_length) if max_length else length


def collate_lm(examples: LMExamples, idx: np.ndarray, *, pad_id: int, pad_multiple: int = 64,
               max_length: int | None = None) -> dict[str, np.ndarray]:
    """Right-padded training batch of the examples ``idx``.

    The length is the longest example rounded up to ``pad_multiple`` (a few static shapes, so
    few recompilations). Returns int32 [B, L] input_ids, attention_mask, labels (= input_ids
    with prompt and padding set to ``IGNORE``; predict labels[:, 1:] from logits[:, :-1]) and
    float32 loss_mask (1 where labels count).
    """
    rows = [examples.tokens[i] for i in idx]
    length = _padded_length(max(len(r) for r in rows), pad_multiple, max_length)
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    labels = np.full((len(rows), length), IGNORE, np.int32)
    for b, (i, row) in enumerate(zip(idx, rows)):
        ids[b, : len(row)] = row
        mask[b, : len(row)] = 1
        start = examples.prompt_lengths[i]
        labels[b, start : len(row)] = row[start:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "loss_mask": (labels != IGNORE).astype(np.float32)}


def lm_batches(examples: LMExamples, batch_size: int, *, pad_id: int, seed: int = 0,
               shuffle: bool = True, drop_remainder: bool = True, bucket: bool = True,
               pad_multiple: int = 64, max_length: int | None = None,
               num_epochs: int | None = None, window: int = 64) -> Batches:
    """A resumable stream of training batches (see ``Batches`` for the position).

    With ``bucket`` each batch holds examples of similar length (``bucketed_plan``), which
    cuts padding several-fold on instruction data of mixed length.
    """
    if bucket:
        plan = bucketed_plan(examples.lengths, batch_size, seed=seed, shuffle=shuffle,
                             drop_remainder=drop_remainder, window=window)
    else:
        plan = shuffled_plan(len(examples), batch_size, seed=seed, shuffle=shuffle,
                             drop_remainder=drop_remainder)
    return Batches(plan, lambda idx: collate_lm(examples, idx, pad_id=pad_id,
                                                pad_multiple=pad_multiple,
                                                max_length=max_length),
                   num_examples=len(examples), batch_size=batch_size, num_epochs=num_epochs,
                   seed=seed)


def padding_fraction(batches: Sequence[dict[str, np.ndarray]]) -> float:
    """Fraction of token slots in these batches that are padding."""
    total = sum(b["attention_mask"].size for b in batches)
    return 1.0 - sum(int(b["attention_mask"].sum()) for b in batches) / total


def generation_batch(tokenizer: Any, prompts: Sequence[str], *, pad_id: int,
                     bos_id: int | None | str = "auto", pad_multiple: int = 8,
                     max_length: int | None = None) -> dict[str, np.ndarray]:
    """Left-padded prompts for batched generation: the last column is every prompt's last
    token, so new tokens append at one index for the whole batch.

    Returns int32 [B, L] input_ids, attention_mask and positions (0 at each prompt's first
    real token, so rotary/absolute positions ignore the padding). Prompts longer than
    ``max_length`` keep their last ``max_length`` tokens (the end of a prompt is what
    generation continues from).
    """
    bos = _special(tokenizer, "bos", bos_id)
    rows = [([bos] if bos is not None else []) + ids for ids in _encode(tokenizer, prompts)]
    if max_length:
        rows = [r[-max_length:] for r in rows]
    length = _padded_length(max(len(r) for r in rows), pad_multiple, max_length)
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for b, row in enumerate(rows):
        ids[b, length - len(row):] = row
        mask[b, length - len(row):] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "positions": positions}
