"""Train-state checkpoints (orbax): sharded save, restore onto any mesh, keep the last N.

A LoRA-XS train state is small (R, the chosen extras, their AdamW moments, the step, the data
position, RNG keys), while the frozen base weights and bases are *not* part of it: they are
rebuilt from the base checkpoint and ``LoraXSConfig`` (the bases are deterministic). So a
checkpoint of a 7B run at r=64 is ~11 MB.

Usage (what ``train.py`` calls)::

    mngr = CheckpointManager(workdir, keep=3)
    mngr.save(step, state, {"data_position": 1234, "config": cfg.to_dict()})
    state, meta = mngr.restore(target=abstract_state)   # latest step
    mngr.latest_step()

Each checkpoint is ``workdir/<step>/{state,meta}``: ``state`` an orbax PyTree (every process
writes its own shards, in parallel), ``meta`` a JSON file. Orbax writes to a temporary directory
and renames it when complete, so a crash mid-save never leaves a half checkpoint that
``latest_step`` would pick. Restoring with a ``target`` whose leaves carry shardings (arrays, or
``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``) reads each shard straight onto those
devices, whatever mesh the checkpoint was written from.

Typed PRNG keys (``jax.random.key``) are stored as their raw key data and rewrapped on restore.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

_STATE, _META = "state", "meta"


def _is_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _savable(state: Any) -> Any:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def _abstract(x: Any) -> Any:
    """A restore target leaf: ShapeDtypeStruct with the sharding to read onto."""
    if _is_key(x):
        data = jax.eval_shape(jax.random.key_data, x)
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            spec = tuple(sharding.spec) + (None,) * (data.ndim - len(sharding.spec))
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x   # numpy arrays restore as numpy (on the host), python scalars as saved


def _rewrap(value: Any, like: Any) -> Any:
    return jax.random.wrap_key_data(value, impl=like.dtype._impl) if _is_key(like) else value


class CheckpointManager:
    """Saves and restores (state pytree, JSON metadata) per step, keeping the newest ``keep``.

    Args:
      workdir: the directory (local path or a GCS ``gs://`` path orbax understands).
      keep: how many most recent checkpoints to keep (older ones are deleted after a save).
      async_save: write in a background thread (``save`` returns once the arrays are copied to
        host); call ``wait_until_finished`` before reading the files or exiting.
    """

    def __init__(self, workdir: str | os.PathLike, keep: int = 3, *, async_save: bool = False):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 (or None for all), got {keep}")
        # orbax's tensorstore writer wants absolute paths: "runs/demo" (what make demo passes)
        # fails at the first save otherwise. URLs (gs://...) are left alone.
        path = os.fspath(workdir)
        self.directory = epath.Path(path if "://" in path else os.path.abspath(path))
        self._mngr = ocp.CheckpointManager(
            self.directory, item_names=(_STATE, _META),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save))

    def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None, *,
             force: bool = True) -> bool:
        """Write ``state`` (any pytree of jax/numpy arrays and scalars, sharded or not) and
        ``meta`` (a JSON-serialisable dict: data position, config, metrics) as ``step``.
        Returns whether a checkpoint was written."""
        saved = self._mngr.save(int(step), args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(_savable(state)),
            _META: ocp.args.JsonSave(dict(meta or {}))}), force=force)
        return bool(saved)

    def restore(self, step: int | None = None, target: Any = None) -> tuple[Any, dict]:
        """(state, meta) of ``step`` (default: the latest).

        ``target`` is a tree like the saved state whose leaves say where to put each array:
        ``jax.Array``s (their shardings), ``jax.ShapeDtypeStruct(..., sharding=...)`` (e.g. from
        ``jax.eval_shape`` plus the new mesh's shardings), numpy arrays (host). Use it to restore
        onto a different mesh than the one that saved. Without it the arrays come back with the
        shardings they were saved with, which needs the same devices.
        """
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                    f"available: {self.all_steps()}")
        state_args = (ocp.args.StandardRestore() if target is None
                      else ocp.args.StandardRestore(jax.tree.map(_abstract, target)))
        out = self._mngr.restore(step, args=ocp.args.Composite(**{
            _STATE: state_args, _META: ocp.args.JsonRestore()}))
        state = out[_STATE]
        if target is not None:
            state = jax.tree.map(_rewrap, state, target)
        return state, dict(out[_META] or {})

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def wait_until_finished(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
