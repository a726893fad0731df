"""One process of a multi-process JAX job on this machine's CPU, launched by test_multihost.py.

The parent sets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (what a multi-node
GPU launch sets) and XLA_FLAGS for this process's virtual devices; CPU collectives go over gloo.
``parallel.maybe_initialize_distributed`` then starts ``jax.distributed`` as it would on a pod.

    python tests/multihost_worker.py '{"job": "train", "folder": ..., "over": {...}, ...}'
"""

import json
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from loraxs_jax import parallel  # noqa: E402


def train_job(args):
    from conftest import tiny_config

    from loraxs_jax.experiments import train

    return train.train_and_evaluate(tiny_config(args["folder"], **args["over"]), args["workdir"])


def eval_job(args):
    from conftest import tiny_config

    from loraxs_jax.experiments import evaluate as evaluate_lib

    return evaluate_lib.evaluate(tiny_config(args["folder"], **args["over"]), args["adapter"],
                                 "both", args["out"])


def programs_job(args):
    """Generation and merge on a global (2,2,2) mesh against the same programs on one of this
    process's own devices."""
    import numpy as np

    import loraxs_jax as lx
    from loraxs_jax.models import decoder as dec
    from loraxs_jax.models.generate import generate
    from loraxs_jax.tree import flatten

    cfg = dec.DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=4, num_kv_heads=4, head_dim=8, scan_layers=True)
    lora = lx.LoraXSConfig(rank=4, alpha=8.0, r_std=0.3, stacked_axes=1,
                           targets=(r"(q|k|v|o|gate|up|down)_proj/kernel$",))
    local = jax.local_devices()[0]
    with jax.default_device(local):
        base = jax.tree.map(lambda x: 8 * x if x.ndim >= 2 else x,
                            dec.init_params(cfg, jax.random.key(2)))
        adapted = lx.apply(base, lora, jax.random.key(3))
    rng = np.random.default_rng(1)
    mask = (np.arange(8)[None] >= rng.integers(0, 5, (8, 1))).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(3, 64, (8, 8)), 0).astype(np.int32)
    apply = lx.wrap(dec.DecoderForCausalLM(cfg).apply)
    with jax.default_device(local):
        want = np.asarray(generate(apply, adapted, cfg, ids, mask, 6, eos_token_id=1))
        want_merged = {p: np.asarray(v) for p, v in flatten(lx.merge(adapted)).items()}

    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    base_sh = parallel.param_shardings(dec.param_shapes(cfg), dec.param_logical_axes(cfg), mesh)
    all_sh = parallel.adapted_shardings(adapted, base_sh)
    placed = parallel.shard_params(jax.device_get(adapted), all_sh)   # host copy onto the mesh
    got = generate(apply, placed, cfg, ids, mask, 6, eos_token_id=1, mesh=mesh,
                   param_shardings=all_sh)
    merged = flatten(lx.merge(placed))
    q = ("model", "layers", "self_attn", "q_proj", "kernel")
    return {
        "generation_equal": bool(np.array_equal(np.asarray(got), want)),
        "generation_rows_differ": len({tuple(r) for r in want.tolist()}) > 1,
        "merge_max_abs_diff": max(float(np.abs(parallel.to_host(v) - want_merged[p]).max())
                                  for p, v in merged.items()),
        "merged_q_spec": str(merged[q].sharding.spec),
        "merged_q_local_shards": len(merged[q].addressable_shards),
        "processes": jax.process_count(), "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
    }


def main():
    args = json.loads(sys.argv[1])
    assert parallel.maybe_initialize_distributed(), "the environment describes no multi-process job"
    result = {"train": train_job, "eval": eval_job, "programs": programs_job}[args["job"]](args)
    out = Path(args["result"]) / f"process_{jax.process_index()}.json"
    out.write_text(json.dumps(result, default=str))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
