"""Paths, flattening and the LoRA-XS leaf names."""

import jax
import jax.numpy as jnp
import pytest
from flax.core import FrozenDict, meta

from loraxs_jax import tree


def test_paths_and_flattening_round_trip():
    params = FrozenDict({"a": {"b": {"kernel": jnp.ones((2, 3))}, "c": jnp.zeros(4)}})
    flat = tree.flatten(params)
    assert set(flat) == {("a", "b", "kernel"), ("a", "c")}
    back = tree.unflatten(flat, params)
    assert isinstance(back, FrozenDict) and jax.tree.structure(back) == jax.tree.structure(params)
    assert isinstance(tree.unflatten(flat), dict)
    key_path = jax.tree_util.tree_flatten_with_path({"x": [jnp.ones(1)]})[0][0][0]
    assert tree.path_keys(key_path) == ("x", "0") and tree.path_str(key_path) == "x/0"
    with pytest.raises(TypeError, match="expected a nested dict of params, got list"):
        tree.flatten([1, 2])


def test_leaf_roles_boxes_and_shapes():
    assert tree.leaf_role("kernel_loraxs_R") == ("kernel", "R")
    assert tree.leaf_role("w_loraxs_scale") == ("w", "scale")
    assert tree.leaf_role("kernel") is None and tree.leaf_role("kernel_loraxs_C") is None
    assert tree.adapter_key("kernel", "A") == "kernel_loraxs_A"
    boxed = meta.Partitioned(jnp.ones((3, 5)), names=("embed", "mlp"))
    assert tree.shape_of(boxed) == (3, 5) and tree.unbox(boxed).shape == (3, 5)
    assert tree.shape_of(jax.ShapeDtypeStruct((7,), jnp.float32)) == (7,)


def test_adapted_kernels_groups_roles_and_names_what_is_missing():
    leaves = {r: jnp.ones(1) for r in tree.ROLES}
    params = {"q": {"kernel": jnp.ones((2, 2)), **{tree.adapter_key("kernel", r): v
                                                   for r, v in leaves.items()}}}
    got = tree.adapted_kernels(params)
    assert list(got) == [("q", "kernel")] and set(got[("q", "kernel")]) == {*tree.ROLES, "kernel"}
    assert tree.is_adapted(params) and not tree.is_adapted({"q": {"kernel": jnp.ones(1)}})
    del params["q"]["kernel_loraxs_B"]
    with pytest.raises(ValueError, match=r"q/kernel has LoRA-XS leaves but lacks \['B'\]"):
        tree.adapted_kernels(params)
