"""Scaling out: meshes and rules, shardings of params and adapters, jitted programs with explicit
shardings, batches on a mesh, and multi-process helpers. One flat namespace over four modules:

* ``mesh``:  ``make_mesh``, ``DEFAULT_RULES``, ``param_shardings``, ``adapted_shardings``, ...
* ``jit``:   ``jit_train_step``, ``jit_eval_step``, ``jit_predict``, ``jit_sharded``
* ``batch``: ``global_batch``, ``shard_batch``, ``pad_rows``, ``process_batch_slice``
* ``hosts``: ``maybe_initialize_distributed``, ``is_main_process``, ``to_host``, ``sync``,
  ``write_file``, ``atomic_write``, ``remove_stale_temps``

Nothing here imports the LoRA-XS transform; the models use it too.
"""

from loraxs_jax.parallel.batch import (
    batch_ways,
    global_batch,
    pad_rows,
    process_batch_slice,
    shard_batch,
)
from loraxs_jax.parallel.hosts import (
    atomic_write,
    is_main_process,
    maybe_initialize_distributed,
    remove_stale_temps,
    sync,
    to_host,
    write_file,
)
from loraxs_jax.parallel.jit import hashable, jit_eval_step, jit_predict, jit_sharded, jit_train_step
from loraxs_jax.parallel.mesh import (
    BATCH_AXES,
    DEFAULT_RULES,
    MESH_AXES,
    adapted_shardings,
    batch_sharding,
    derived_spec,
    make_mesh,
    mesh_shape,
    opt_state_shardings,
    param_shardings,
    replicated,
    shard_params,
    spec_for,
    subtree_shardings,
)

__all__ = [
    "BATCH_AXES", "DEFAULT_RULES", "MESH_AXES", "adapted_shardings", "atomic_write", "batch_sharding",
    "batch_ways", "derived_spec", "global_batch", "hashable", "is_main_process", "jit_eval_step",
    "jit_predict", "jit_sharded", "jit_train_step", "make_mesh", "maybe_initialize_distributed",
    "mesh_shape", "opt_state_shardings", "pad_rows", "param_shardings", "process_batch_slice",
    "remove_stale_temps",
    "replicated", "shard_batch", "shard_params", "spec_for", "subtree_shardings", "sync", "to_host",
    "write_file",
]
