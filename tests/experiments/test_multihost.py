"""A real multi-process job: two JAX processes with 4 CPU devices each form one 8-device mesh
(jax.distributed over localhost, gloo collectives), started by
``parallel.maybe_initialize_distributed`` from the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID variables. Each process loads its own rows of every batch
(``make_array_from_process_local_data``); process 0 alone writes files. The two-process run must
match the one-process run on the same (2,2,2) mesh."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from loraxs_jax.experiments import evaluate as evaluate_lib
from loraxs_jax.experiments import train
from loraxs_jax.experiments.reporting import read_metrics

WORKER = Path(__file__).with_name("multihost_worker.py")
MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
OVER = {**MESH, "model.dropout": 0.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(job: dict, result_dir: Path, n: int = 2, timeout: int = 600) -> list[dict]:
    """Run the worker as ``n`` processes of one job; return each process's result."""
    result_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for i in range(n):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // n}",
               "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
               "JAX_NUM_PROCESSES": str(n), "JAX_PROCESS_ID": str(i)}
        log = open(result_dir / f"log_{i}.txt", "w")
        procs.append((subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps({**job, "result": str(result_dir)})],
            env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for p, log in procs:
            p.wait(timeout=timeout)
            log.close()
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, _) in enumerate(procs):
        assert p.returncode == 0, (f"process {i} exited {p.returncode}:\n"
                                   + (result_dir / f"log_{i}.txt").read_text()[-4000:])
        # Every program (train step, evaluation, merge, generation) partitions cleanly: XLA never
        # falls back to replicating a whole tensor to reshard it (it did for embedding lookups
        # from tables split along 'embed', until models.layers.embedding_lookup).
        assert "Involuntary full rematerialization" not in (result_dir / f"log_{i}.txt").read_text()
    return [json.loads((result_dir / f"process_{i}.json").read_text()) for i in range(n)]


def _tensors(path):
    return load_file(path)


def test_two_processes_train_and_evaluate_like_one(tiny_config, tiny_bert, tmp_path):
    one = train.train_and_evaluate(tiny_config(tiny_bert, **OVER), tmp_path / "one")
    wd = tmp_path / "two"
    res = run_processes({"job": "train", "folder": str(tiny_bert), "over": OVER,
                         "workdir": str(wd)}, tmp_path / "train_results")
    assert res[0]["steps"] == res[1]["steps"] == 6
    # every process computes the same scores; process 0 alone wrote the run's files
    assert res[0]["final_accuracy"] == res[1]["final_accuracy"] == one["final_accuracy"]
    assert json.loads((wd / "summary.json").read_text())["final_accuracy"] == one["final_accuracy"]
    recs = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["split"] == "train"] == [2, 4, 6]   # written once
    ref = read_metrics(tmp_path / "one")
    np.testing.assert_allclose([r["loss"] for r in recs if r["split"] == "train"],
                               [r["loss"] for r in ref if r["split"] == "train"], rtol=1e-5)
    a, b = _tensors(tmp_path / "one" / "adapter.safetensors"), _tensors(wd / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-6, err_msg=k)
    assert np.abs(a["loraxs_R/r4"]).max() > 1e-3      # R did train
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())

    # eval.py in two processes: adapted and merged (merge under sharding), same scores
    cfg = tiny_config(tiny_bert, **OVER)
    want = evaluate_lib.evaluate(cfg, str(tmp_path / "one" / "adapter.safetensors"), "both")
    got = run_processes({"job": "eval", "folder": str(tiny_bert), "over": OVER,
                         "adapter": str(wd / "adapter.safetensors"), "out": str(tmp_path / "ev")},
                        tmp_path / "eval_results")
    for g in got:
        assert g["adapted"] == want["adapted"] and g["merged"] == want["merged"]
    assert json.loads((tmp_path / "ev" / "scores_merged.json").read_text()) == want["merged"]


def test_two_processes_generate_and_merge_like_one_device(tmp_path):
    res = run_processes({"job": "programs"}, tmp_path)
    for r in res:
        assert (r["processes"], r["devices"], r["local_devices"]) == (2, 8, 4)
        assert r["generation_rows_differ"] and r["generation_equal"]
        assert r["merge_max_abs_diff"] < 1e-5
        assert r["merged_q_spec"] == "P(None, 'fsdp', 'tensor')"
        assert r["merged_q_local_shards"] == 4          # half the kernel's shards per process
