"""Multi-process helpers: who writes files, barriers, gathering to the host, start-up.

Every process computes; process 0 alone writes the run's files (:func:`write_file`: atomically,
then a barrier so the others can read what it wrote).
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

logger = logging.getLogger(__name__)


def is_main_process() -> bool:
    """Process 0 writes the run's files (metrics, adapters, plots, summaries); every process
    takes part in the computations and collectives that produce them."""
    return jax.process_index() == 0


def to_host(x: Any) -> np.ndarray:
    """A whole array as numpy on this host, also when its shards live on other processes
    (``process_allgather``, a collective: every process must call it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def sync(name: str) -> None:
    """A barrier across processes (a no-op on one): e.g. after process 0 wrote a file that the
    others read next."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize()`` when the environment describes a multi-process
    job; return whether it did. Call it before any other JAX call.

    Recognised environments:
      * explicit: ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES``,
        ``JAX_PROCESS_ID`` (multi-node GPU without a scheduler, e.g. one process per node
        launched by hand or by torchrun-like tools);
      * SLURM with more than one task (``SLURM_NTASKS`` > 1; one process per node or per GPU,
        ``srun``); JAX reads the coordinator and ids from SLURM's variables;
      * Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1, ``mpirun``);
      * Cloud TPU pod slices (``TPU_WORKER_HOSTNAMES`` listing more than one host, or
        ``MEGASCALE_COORDINATOR_ADDRESS`` for multislice); JAX reads the TPU metadata.
    A single-host run (this laptop, one GPU box, a v4-8) needs none of it.
    """
    if jax.distributed.is_initialized():
        return False
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None,
            process_id=int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None)
        return True
    multi = (int(env.get("SLURM_NTASKS", "1")) > 1
             or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
             or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
             or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS")))
    if multi:
        jax.distributed.initialize()
        logger.info("jax.distributed initialised: process %d of %d", jax.process_index(),
                    jax.process_count())
    return multi


def _file_mode() -> int:
    """What ``open(path, "w")`` would give a new file: 0666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def remove_stale_temps(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the temporary files (``.<name>.<random>.tmp``) that :func:`atomic_write`s killed
    before their rename left in ``directory`` (of the file ``name``, or of any file); return
    them. Call it where no other writer of those files runs (a run's start, the next save)."""
    pattern = f".{glob.escape(name) if name else '*'}.*.tmp"
    stale = [p for p in Path(directory).glob(pattern) if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it: a crash leaves
    the old file or the new one, never half of one, and the temporary file a killed write left
    behind is deleted by the next write of ``path``. The file gets the permissions any other
    new file of the run gets (``mkstemp`` alone would leave 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_file(path: str | os.PathLike, data: bytes) -> Path:
    """Process 0 writes ``data`` to ``path`` atomically; then every process waits at a barrier,
    so all of them can read the file next. Returns the path."""
    path = Path(path)
    if is_main_process():
        atomic_write(path, data)
    sync(f"write {path}")
    return path

