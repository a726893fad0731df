"""Global batches split along data+fsdp, and their errors."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from loraxs_jax import parallel as sh


def test_global_batch_is_split_over_data_and_fsdp(sharded):
    mesh = sharded.mesh_of((2, 2, 2))
    x = np.arange(8 * 3).reshape(8, 3)
    g = sh.global_batch({"ids": x}, mesh)["ids"]
    assert g.sharding.spec == P(("data", "fsdp")) and g.shape == (8, 3)
    np.testing.assert_array_equal(np.asarray(g), x)
    assert sh.process_batch_slice(8, mesh) == slice(0, 8)
    with pytest.raises(ValueError, match=r"global batch size 6 .* data\*fsdp = 2\*2 = 4"):
        sh.process_batch_slice(6, mesh)
    with pytest.raises(ValueError, match=r"not divisible by the batch mesh axes data\*fsdp = 4"):
        sh.global_batch({"ids": x[:6]}, mesh)
