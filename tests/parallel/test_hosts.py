"""Multi-process helpers on one process."""

from loraxs_jax import parallel as sh


def test_maybe_initialize_distributed_is_a_noop_on_one_host(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert sh.maybe_initialize_distributed() is False
