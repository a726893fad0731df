"""Batches on a mesh: each process loads its rows, global arrays are split along data+fsdp."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from loraxs_jax.parallel.mesh import BATCH_AXES, batch_sharding


def batch_ways(mesh: Mesh) -> int:
    """How many ways a batch is split: data * fsdp."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def process_batch_slice(global_batch_size: int, mesh: Mesh) -> slice:
    """The rows of each global batch this process loads (processes take equal contiguous
    slices, in ``jax.process_index()`` order)."""
    ways = batch_ways(mesh)
    if global_batch_size % ways:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the batch "
                         f"mesh axes data*fsdp = {mesh.shape['data']}*{mesh.shape['fsdp']} = "
                         f"{ways}")
    n = jax.process_count()
    if global_batch_size % n:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{n} processes")
    per = global_batch_size // n
    i = jax.process_index()
    return slice(i * per, (i + 1) * per)


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Assemble global ``jax.Array``s, split along data+fsdp, from each process's rows
    (``jax.make_array_from_process_local_data``); on one process the local batch is global."""
    sharding = batch_sharding(mesh)
    n = jax.process_count()

    def one(x):
        x = np.asarray(x)
        ways = batch_ways(mesh)
        if (x.shape[0] * n) % ways:
            raise ValueError(f"batch of {x.shape[0]} rows per process x {n} processes is not "
                             f"divisible by the batch mesh axes data*fsdp = {ways}")
        return jax.make_array_from_process_local_data(sharding, x,
                                                      (x.shape[0] * n,) + x.shape[1:])

    return jax.tree.map(one, local_batch)


def pad_rows(batch: Any, multiple: int) -> tuple[Any, int]:
    """(batch with its last row repeated up to a multiple of ``multiple`` rows, the original row
    count): evaluation batches of any size can then be split over data*fsdp, and the outputs
    cut back with ``[:n]``."""
    n = jax.tree.leaves(batch)[0].shape[0]
    extra = -n % multiple
    if not extra:
        return batch, n
    return jax.tree.map(lambda x: np.concatenate([np.asarray(x)] + [np.asarray(x)[-1:]] * extra),
                        batch), n


def shard_batch(full_batch: Any, mesh: Mesh) -> Any:
    """Global arrays from a batch that every process holds whole (evaluation and generation
    batches are small): each process contributes its :func:`process_batch_slice` of the rows.
    Raises, naming the sizes, when data*fsdp does not divide the rows."""
    rows = jax.tree.leaves(full_batch)[0].shape[0]
    take = process_batch_slice(rows, mesh)
    return global_batch(jax.tree.map(lambda x: np.asarray(x)[take], full_batch), mesh)
