"""Train-step time, FLOPs and memory of LoRA-XS next to the frozen floor, LoRA and full FT.

On the same model and batch: the floor (forward + backward to the inputs, weights frozen), LoRA-XS
(gradient w.r.t. R only, AdamW on R), LoRA (same targets and rank, AdamW on A, B) and full
fine-tuning (AdamW on everything). Times are medians of interleaved rounds; FLOPs and memory
come from the compiled programs.

    python -m benchmarks.bench_train_step [--smoke] [--reps N] [--skip-minilm]
    python -m benchmarks.bench_train_step --only-minilm --update --reps 15   # re-measure one
"""

from __future__ import annotations

import json

from benchmarks import common

LABELS = {"floor": "floor (frozen fwd+bwd to inputs)", "loraxs": "LoRA-XS (R only)",
          "lora": "LoRA (A, B)", "full": "full fine-tuning"}


def measure(setup: common.Setup, reps: int) -> dict:
    steps = common.train_steps(setup)
    times = common.interleaved(steps, reps)
    rows = {}
    for m, st in steps.items():
        rows[m] = {"median_s": common.median(times[m]), "times_s": times[m],
                   "trainable_params": st.trainable, **common.compile_stats(st.compiled)}
    return {"setup": setup.description, "rank": setup.rank, "alpha": setup.alpha,
            "targets": list(setup.targets), "methods": rows, "ratios": ratios(rows)}


def ratios(rows: dict) -> dict:
    """LoRA-XS over each other method. ``time``: the median over rounds of the ratio of the two
    steps timed back to back in that round (robust to load that drifts between rounds);
    ``time_of_medians``: ratio of the medians; FLOPs and peak memory: compiled, exact."""
    x = rows["loraxs"]
    out = {}
    for other in ("floor", "lora", "full"):
        o = rows[other]
        out[f"loraxs/{other}"] = {
            "time": common.median([a / b for a, b in zip(x["times_s"], o["times_s"])]),
            "time_of_medians": x["median_s"] / o["median_s"],
            "flops": x["flops"] / o["flops"], "peak_memory": x["peak_bytes"] / o["peak_bytes"]}
    return out


def table(name: str, r: dict) -> str:
    m = r["methods"]
    rows = []
    for k, d in m.items():
        rows.append([LABELS[k], d["trainable_params"], d["median_s"] * 1e3,
                     common.median([a / b for a, b in zip(d["times_s"], m["floor"]["times_s"])]),
                     d["flops"] / 1e9, d["flops"] / m["floor"]["flops"], d["args_bytes"] / common.MB,
                     d["temp_bytes"] / common.MB, d["peak_bytes"] / common.MB])
    t = common.md_table(["method", "trainable", "step ms (median)", "× floor time (paired)",
                         "GFLOP", "× floor FLOPs", "args MiB", "temp MiB", "peak MiB"], rows)
    summary = " · ".join(f"**{k}**: time {v['time']:.3f} (ratio of medians "
                         f"{v['time_of_medians']:.3f}), FLOPs {v['flops']:.3f}, peak memory "
                         f"{v['peak_memory']:.3f}" for k, v in ratios(m).items())
    return (f"## {name}\n\n{r['setup']}; rank {r['rank']}, α {r['alpha']}, "
            f"{len(m['floor']['times_s'])} rounds\n\n{t}\n\n{summary}\n")


def tables(data: dict) -> str:
    return "\n".join(table(n, r) for n, r in data["models"].items()) + NOTES


NOTES = """
Notes. Same model, same batch, one process; contenders interleaved round-robin. "Paired" time
ratios are the median over rounds of the two steps' ratio within a round (robust to load that
drifts between rounds on a shared machine). The floor differentiates w.r.t. a zero tensor added
to the token embeddings: the whole activation backward pass and no weight gradient. LoRA-XS can
come in slightly *under* it: it needs no input gradient of the first layer's projections (only
dL/dy there, and x·A from the forward), which the floor computes down to the embeddings; compare
the FLOP columns. Dropout is off (deterministic) everywhere. args = params (frozen and trainable)
+ optimizer state + batch; peak = args + outputs + temporaries − aliased, from XLA's compiled
memory_analysis (process RSS on the CPU backend is monotone and shared with the compiler, so it
says nothing per step and is not reported). FLOPs from XLA cost_analysis. AdamW (lr 1e-3) in
every trained variant.
"""


def run(smoke: bool = False, reps: int | None = None, skip_minilm: bool = False,
        update: bool = False, only_minilm: bool = False) -> dict:
    """``update``: keep the other models' results from the existing JSON (re-measure some)."""
    reps = reps or (3 if smoke else 7)
    setups = [common.llama_small(True)] if smoke else [common.llama_small(), common.bert_small()]
    if only_minilm:
        setups = []
    if not (skip_minilm or smoke) and common.have_asset("minilm"):
        setups.append(common.minilm(batch=8))
    old = common.results_dir(smoke) / "train_step.json"
    results = json.loads(old.read_text())["models"] if update and old.exists() else {}
    for s in setups:
        results[s.name] = measure(s, reps)
        print(f"[train_step] {s.name}: " + ", ".join(
            f"{k} time×{v['time']:.3f}" for k, v in results[s.name]["ratios"].items()), flush=True)
    path = common.write_result("train_step", {"models": results}, tables, smoke)
    return {"path": str(path), "models": results}


def main(argv=None):
    common.cli(__doc__, run, argv, skip_minilm="skip the real MiniLM",
               only_minilm="measure the real MiniLM only",
               update="keep the other models' results from the existing JSON")


if __name__ == "__main__":
    main()
