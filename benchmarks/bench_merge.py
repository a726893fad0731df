"""Merge time for a whole model, and eval-step time of merged vs base vs unmerged adapted.

``loraxs_jax.merge`` turns every adapted kernel into W + (α/r)·A·R·B in one jitted program; the
merged tree has the base's structure, so its forward is the base's compiled program on other
numbers (equal time by construction; measured anyway). The unmerged adapted model pays the three
thin matmuls per adapted kernel.

    python -m benchmarks.bench_merge [--smoke] [--reps N]
"""

from __future__ import annotations

import numpy as np

import loraxs_jax
from benchmarks import common
from loraxs_jax.tree import flatten, unflatten


def merge_time(params, cfg: loraxs_jax.LoraXSConfig, reps: int, r_gain: float = 1.0) -> dict:
    """Merge time; R is scaled by ``r_gain`` (1e3: std 1e-2) so the merge is not a no-op."""
    adapted = loraxs_jax.apply(params, cfg, 0)
    adapted = unflatten({p: v * r_gain if str(p[-1]).endswith("_loraxs_R") else v
                         for p, v in flatten(adapted).items()}, {})
    merged, first = common.timed(lambda: loraxs_jax.merge(adapted))
    warm = common.interleaved({"merge": lambda: loraxs_jax.merge(adapted)}, reps, warmup=0)
    counts = loraxs_jax.count(adapted, cfg)
    return {"first_call_s": first, "warm_median_s": common.median(warm["merge"]),
            "matrices": counts["adapted_matrices"], "base_params": counts["base"],
            "rank": cfg.rank}, adapted, merged


def eval_times(s: common.Setup, reps: int) -> dict:
    merge, adapted, merged = merge_time(s.params, s.loraxs_config(), reps, r_gain=1e3)
    base = common.eval_step(s, s.model.apply, s.params)
    steps = {"base": base,
             "merged": common.Step(base.compiled, (merged, s.batch), 0),
             "unmerged": common.eval_step(s, loraxs_jax.wrap(s.model.apply), adapted)}
    times = common.interleaved(steps, reps)
    med = {k: common.median(v) for k, v in times.items()}
    out_m, out_u, out_b = (np.asarray(steps[k](), np.float32) for k in ("merged", "unmerged", "base"))
    return {"setup": s.description, "merge": merge,
            "eval_median_s": med,
            "merged/base": med["merged"] / med["base"],
            "unmerged/base": med["unmerged"] / med["base"],
            "flops": {k: common.compile_stats(v.compiled)["flops"] for k, v in steps.items()},
            "max_abs_diff_merged_vs_unmerged": float(np.abs(out_m - out_u).max()),
            "max_abs_diff_merged_vs_base": float(np.abs(out_m - out_b).max())}


def run(smoke: bool = False, reps: int | None = None) -> dict:
    reps = reps or (3 if smoke else 7)
    setups = [common.llama_small(True)] if smoke else [common.llama_small(), common.minilm()]
    res = {"eval": {}, "merge_only": {}}
    for s in setups:
        res["eval"][s.name] = eval_times(s, reps)
        print(f"[merge] {s.name}: merged/base {res['eval'][s.name]['merged/base']:.3f}, "
              f"unmerged/base {res['eval'][s.name]['unmerged/base']:.3f}", flush=True)
    if not smoke and common.have_asset("smollm2"):
        from loraxs_jax.experiments.assets import asset_path
        from loraxs_jax.models.gguf import load_gguf

        _, params, _ = load_gguf(next(asset_path("smollm2").glob("*.gguf")))
        cfg = loraxs_jax.LoraXSConfig(rank=32, alpha=64.0, targets=common.DECODER_TARGETS,
                                      svd_method="randomized")
        res["merge_only"]["SmolLM2-135M (real)"] = merge_time(params, cfg, reps)[0]
        del params
    path = common.write_result("merge", {"reps": reps, **res}, tables, smoke)
    return {"path": str(path), **res}


def tables(res: dict) -> str:
    rows = []
    merges = {**{k: v["merge"] for k, v in res["eval"].items()}, **res["merge_only"]}
    for name, m in merges.items():
        rows.append([name, m["matrices"], m["rank"], m["first_call_s"], m["warm_median_s"] * 1e3])
    t1 = common.md_table(["model", "adapted matrices", "rank", "first merge s (incl. compile)",
                          "warm merge ms (median)"], rows)
    rows = []
    for name, e in res["eval"].items():
        b = e["eval_median_s"]
        rows.append([name, b["base"] * 1e3, b["merged"] * 1e3, b["unmerged"] * 1e3,
                     e["merged/base"], e["unmerged/base"], e["flops"]["unmerged"] / e["flops"]["base"],
                     e["max_abs_diff_merged_vs_unmerged"]])
    t2 = common.md_table(["model", "base ms", "merged ms", "unmerged ms", "merged / base",
                          "unmerged / base", "unmerged / base FLOPs",
                          "max |merged − unmerged| logits"], rows)
    setups = "; ".join(f"{k}: {v['setup']}" for k, v in res["eval"].items())
    return (f"## Merge time (whole model)\n\n{t1}\n\n## Eval step (forward, logits)\n\n{setups}\n\n"
            f"{t2}\n\nMerged and base run the same compiled program (same tree structure), so "
            "their difference is noise; R was drawn with std 1e-2 so the merge is not a no-op.\n")


def main(argv=None):
    common.cli(__doc__, run, argv)


if __name__ == "__main__":
    main()
