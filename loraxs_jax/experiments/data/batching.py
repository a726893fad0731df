"""Deterministic, resumable batch streams.

A stream is a pure function of (seed, epoch) -> the list of index batches of that epoch, plus a
position (epoch, step) that says how many batches of that epoch were already handed out. A
checkpoint stores ``Batches.state_dict()`` (a few ints); ``load_state_dict`` restores it and the
stream continues with exactly the batches the uninterrupted run would have produced, because the
epoch plan is recomputed from the seed rather than carried in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np

Plan = Callable[[int], list[np.ndarray]]


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator that shuffles epoch ``epoch`` of a stream seeded with ``seed``."""
    return np.random.default_rng([seed, epoch])


def subset(num_examples: int, limit: int, seed: int, labels: np.ndarray | None = None
           ) -> np.ndarray:
    """Sorted indices of ``limit`` of ``num_examples`` examples, drawn without replacement by
    ``seed`` (all of them when ``limit`` is 0 or not smaller). With ``labels`` (classification)
    every label keeps its share, rounded by largest remainders: the first N rows of a file sorted
    by label would be (nearly) one class.
    """
    if not limit or limit >= num_examples:
        return np.arange(num_examples)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(num_examples, limit, replace=False))
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * limit / num_examples
    take = np.floor(quota).astype(int)
    take[np.argsort(take - quota, kind="stable")[:limit - take.sum()]] += 1
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), k, replace=False)
                                   for c, k in zip(classes, take)]))


def shuffled_plan(num_examples: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                  drop_remainder: bool = True) -> Plan:
    """Plan: a fresh permutation per epoch (or the identity), cut into ``batch_size`` chunks."""

    def plan(epoch: int) -> list[np.ndarray]:
        n = num_examples
        order = epoch_rng(seed, epoch).permutation(n) if shuffle else np.arange(n)
        stop = num_examples - num_examples % batch_size if drop_remainder else num_examples
        return [order[i : i + batch_size] for i in range(0, stop, batch_size)]

    return plan


def bucketed_plan(lengths: np.ndarray, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                  drop_remainder: bool = True, window: int = 64) -> Plan:
    """Plan that groups examples of similar length to limit padding (length bucketing).

    Each epoch: permute the examples, take windows of ``window * batch_size`` of them, sort each
    window by length, cut it into batches, then shuffle the order of all batches. Batches stay
    random across epochs while each holds examples of similar length. Without ``shuffle`` the
    order is the original one (no sorting), which is what evaluation wants.
    """
    lengths = np.asarray(lengths)
    n = len(lengths)

    def plan(epoch: int) -> list[np.ndarray]:
        if not shuffle:
            return shuffled_plan(n, batch_size, shuffle=False, drop_remainder=drop_remainder)(0)
        rng = epoch_rng(seed, epoch)
        order = rng.permutation(n)
        if drop_remainder:
            order = order[: n - n % batch_size]
        batches = []
        span = window * batch_size
        for w in range(0, len(order), span):
            chunk = order[w : w + span]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    return plan


class Batches:
    """An iterable of batches with a checkpointable position.

    Args:
      plan: ``plan(epoch)`` -> list of int index arrays, deterministic in ``epoch``.
      collate: ``collate(indices)`` -> dict of numpy arrays for those examples.
      num_examples: size of the example set (recorded in the state to catch mismatched restores).
      batch_size: the batch size of the plan.
      num_epochs: stop after this many epochs; ``None`` streams forever.
      pad_remainder: pad a short final batch up to ``batch_size`` (repeating example 0) and add a
        ``weights`` array (1 for real rows, 0 for padding) so every batch has one static shape.
      seed: recorded in the state, like ``num_examples``.

    Iterating yields from the current position; the position advances *before* a batch is
    yielded, so a state saved after consuming a batch resumes with the next one.
    """

    def __init__(self, plan: Plan, collate: Callable[[np.ndarray], dict[str, np.ndarray]], *,
                 num_examples: int, batch_size: int, num_epochs: int | None = None,
                 pad_remainder: bool = False, seed: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.plan, self.collate = plan, collate
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.num_epochs, self.pad_remainder = num_epochs, pad_remainder
        self.epoch, self.step = 0, 0
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def _epoch_plan(self, epoch: int) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.plan(epoch))
        return self._cache[1]

    @property
    def steps_per_epoch(self) -> int:
        return len(self._epoch_plan(self.epoch))

    def state_dict(self) -> dict[str, int]:
        """The position as plain ints: store it in a checkpoint."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "num_examples": self.num_examples, "batch_size": self.batch_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore a position saved by ``state_dict`` of an identically configured stream."""
        for key in ("seed", "num_examples", "batch_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"cannot restore a data position saved with {key}={state[key]} "
                                 f"into a stream with {key}={getattr(self, key)}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def _finish(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        if not self.pad_remainder:
            return self.collate(idx)
        real = len(idx)
        idx = np.concatenate([idx, np.zeros(self.batch_size - real, dtype=idx.dtype)])
        batch = self.collate(idx)
        batch["weights"] = (np.arange(self.batch_size) < real).astype(np.float32)
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while self.num_epochs is None or self.epoch < self.num_epochs:
            batches = self._epoch_plan(self.epoch)
            if self.step >= len(batches):
                if not batches:
                    raise ValueError(f"an epoch of {self.num_examples} examples yields no batch "
                                     f"of size {self.batch_size} (drop_remainder)")
                self.epoch, self.step = self.epoch + 1, 0
                continue
            idx = batches[self.step]
            self.step += 1
            yield self._finish(np.asarray(idx))
