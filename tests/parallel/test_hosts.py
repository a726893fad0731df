"""Multi-process helpers on one process."""

from loraxs_jax import parallel as sh


def test_maybe_initialize_distributed_is_a_noop_on_one_host(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert sh.maybe_initialize_distributed() is False


def test_atomic_write_gives_run_file_permissions_and_keeps_the_old_file_on_error(tmp_path,
                                                                                  monkeypatch):
    import os

    import pytest

    old = os.umask(0o027)
    try:
        sh.atomic_write(tmp_path / "a.bin", b"first")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")                     # what open() gives any other run file
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o640

    def die(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", die)
    with pytest.raises(OSError, match="disk full"):
        sh.atomic_write(tmp_path / "a.bin", b"second")
    assert (tmp_path / "a.bin").read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "plain.txt"]


def test_a_write_killed_before_its_rename_leaves_a_temp_file_the_next_write_removes(tmp_path):
    """SIGKILL mid-write (no except clause runs) leaves .a.bin.<random>.tmp; the next write of
    a.bin (or a run's start, remove_stale_temps) deletes it; other files' temps are left."""
    import subprocess
    import sys

    killer = ("import os, signal; from loraxs_jax.parallel import hosts; "
              "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL); "
              f"hosts.atomic_write({str(tmp_path / 'a.bin')!r}, b'half')")
    sh.atomic_write(tmp_path / "a.bin", b"first")
    for _ in range(2):
        assert subprocess.run([sys.executable, "-c", killer]).returncode == -9
    orphans = sorted(p.name for p in tmp_path.glob(".a.bin.*.tmp"))
    assert len(orphans) == 1 and (tmp_path / "a.bin").read_bytes() == b"first"  # 2nd took 1st
    (tmp_path / ".b.bin.x1y2z3.tmp").write_bytes(b"another file's")
    sh.atomic_write(tmp_path / "a.bin", b"second")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.bin.x1y2z3.tmp", "a.bin"]
    assert [p.name for p in sh.remove_stale_temps(tmp_path)] == [".b.bin.x1y2z3.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]
