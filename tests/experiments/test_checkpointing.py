"""Checkpoints: save on one mesh, restore on another, continue = never stopping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from loraxs_jax import parallel as sh
from loraxs_jax.experiments.checkpointing import CheckpointManager
from loraxs_jax.tree import path_str


def test_save_on_one_mesh_restore_on_another_and_continue(sharded, tmp_path):
    b1, b2 = sharded.batches(2)
    mesh_a = sharded.mesh_of((2, 4, 1))
    _, _, state, state_sh, frozen, f_sh = sharded.sharded_setup(mesh_a)
    state, _ = sharded.compiled_step((2, 4, 1), state_sh, f_sh)(state, frozen,
                                                         sh.global_batch(b1, mesh_a))
    key = jax.random.key(7)
    with CheckpointManager(tmp_path, keep=2) as mngr:
        mngr.save(1, {"train": state, "rng": key}, {"data_position": 16, "note": "after b1"})

    mesh_b = sharded.mesh_of((2, 2, 2))   # a new process with another mesh: rebuild frozen, restore R
    _, _, fresh, state_sh_b, frozen_b, f_sh_b = sharded.sharded_setup(mesh_b)
    target = {"train": jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                    fresh, state_sh_b),
              "rng": jax.random.key(0)}
    mngr = CheckpointManager(tmp_path, keep=2)
    assert mngr.latest_step() == 1
    restored, meta = mngr.restore(target=target)
    assert meta == {"data_position": 16, "note": "after b1"}
    np.testing.assert_array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(key))
    for leaf, s in zip(jax.tree.leaves(restored["train"]), jax.tree.leaves(state_sh_b)):
        assert leaf.sharding.is_equivalent_to(s, leaf.ndim)
    assert int(restored["train"]["step"]) == 1
    step = sharded.compiled_step((2, 2, 2), state_sh_b, f_sh_b)
    state, m = step(restored["train"], frozen_b, sh.global_batch(b2, mesh_b))

    ref_state, ref_losses = sharded.reference(2)
    np.testing.assert_allclose(float(m["loss"]), ref_losses[1], rtol=1e-5)
    got, want = sharded.r_leaves(state["params"]), sharded.r_leaves(ref_state["params"])
    for p in want:
        np.testing.assert_allclose(got[p], want[p], atol=sharded.r_atol, err_msg=path_str(p))
    for a, b in zip(jax.tree.leaves(state["opt"]), jax.tree.leaves(ref_state["opt"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_keep_latest_and_half_written_checkpoints(sharded, tmp_path):
    mesh = sharded.mesh_of((8, 1, 1))
    x = jax.device_put(jnp.arange(16.0), NamedSharding(mesh, P("data")))
    mngr = CheckpointManager(tmp_path, keep=3)
    assert mngr.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        mngr.restore()
    for step in range(1, 6):
        mngr.save(step, {"x": x * step, "position": step * 10}, {"step": step})
    assert mngr.all_steps() == [3, 4, 5] and mngr.latest_step() == 5
    # a save that died before orbax's final rename leaves only a temporary directory
    (tmp_path / "6.orbax-checkpoint-tmp-0").mkdir()
    assert CheckpointManager(tmp_path, keep=3).latest_step() == 5
    state, meta = mngr.restore(step=4, target={"x": np.zeros(16, np.float32), "position": 0})
    np.testing.assert_array_equal(state["x"], np.arange(16.0) * 4)
    assert isinstance(state["x"], np.ndarray) and state["position"] == 40 and meta == {"step": 4}
    same, _ = mngr.restore()   # no target: the saved shardings (same devices)
    assert same["x"].sharding.is_equivalent_to(x.sharding, 1)
    with pytest.raises(FileNotFoundError, match=r"step 1 .* available: \[3, 4, 5\]"):
        mngr.restore(step=1)
    with pytest.raises(ValueError, match="keep must be >= 1"):
        CheckpointManager(tmp_path, keep=0)


def test_a_relative_directory_works(sharded, tmp_path, monkeypatch):
    """`make demo` passes --workdir=runs/demo: orbax's writer refuses relative paths, so the
    manager resolves them (it failed at the demo's first save)."""
    monkeypatch.chdir(tmp_path)
    mesh = sharded.mesh_of((8, 1, 1))
    x = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("data")))
    mngr = CheckpointManager("runs/demo/checkpoints", keep=2)
    mngr.save(1, {"x": x}, {"opt_step": 1})
    assert (tmp_path / "runs" / "demo" / "checkpoints" / "1").is_dir()
    monkeypatch.chdir("/")            # a later cwd change does not move the checkpoints
    state, meta = mngr.restore(target={"x": x})
    np.testing.assert_array_equal(np.asarray(state["x"]), np.arange(8.0))
    assert meta == {"opt_step": 1}
