"""Run every benchmark and write ``benchmarks/results/README.md`` with their latest tables.

    python -m benchmarks.run_all            # full size (make bench), ~15 min on 2 CPU cores
    python -m benchmarks.run_all --smoke    # tiny sizes, into benchmarks/results/smoke/
    python -m benchmarks.run_all --only train_step,merge
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks import (
    bench_adapter_size,
    bench_merge,
    bench_million,
    bench_scaling,
    bench_serving,
    bench_svd_init,
    bench_train_step,
    common,
)

MODULES = {"train_step": bench_train_step, "svd_init": bench_svd_init,
           "adapter_size": bench_adapter_size, "merge": bench_merge, "scaling": bench_scaling,
           "serving": bench_serving, "million": bench_million}
BENCHMARKS = {name: module.run for name, module in MODULES.items()}


def headline(results: dict) -> list[str]:
    """The claims, one line each, from whichever benchmarks ran."""
    lines = []
    for name, r in results.get("train_step", {}).get("models", {}).items():
        ra = bench_train_step.ratios(r["methods"])
        lines.append(f"- train step, {name} (r={r['rank']}): LoRA-XS / floor time "
                     f"{ra['loraxs/floor']['time']:.3f} (FLOPs {ra['loraxs/floor']['flops']:.3f}); "
                     f"/ LoRA time {ra['loraxs/lora']['time']:.3f}; / full time "
                     f"{ra['loraxs/full']['time']:.3f}, peak memory "
                     f"{ra['loraxs/full']['peak_memory']:.3f}")
    if "svd_init" in results:
        lines += [f"- SVD init, sklearn TruncatedSVD(n_iter=10) time / ours: {x}"
                  for x in bench_svd_init.speedups(results["svd_init"])]
        ep = results["svd_init"]["demo_epoch"]
        lines.append("- whole-model SVD init / one demo epoch: " + ", ".join(
            f"{k} {v:.2%}" for k, v in ep["init_over_epoch"].items()))
    for name, rows in results.get("adapter_size", {}).get("models", {}).items():
        x = rows[-1]
        lines.append(f"- adapter file, {name} r={x['rank']}: {x['file_bytes']:,} B "
                     f"(r²·n·4 = {x['r2_count_4']:,}); LoRA ×{x['lora_over_ours']:.0f}, "
                     f"official A+B+R ×{x['official_over_ours']:.0f}")
    for name, e in results.get("merge", {}).get("eval", {}).items():
        lines.append(f"- eval step, {name}: merged / base {e['merged/base']:.3f}, unmerged / base "
                     f"{e['unmerged/base']:.3f}")
    sc = results.get("scaling")
    if sc:
        lines.append("- LoRA-XS / floor time vs rank: " + ", ".join(
            f"r={p['rank']} {p['time_ratio']:.2f}" for p in sc["by_rank"]))
    for name, r in results.get("serving", {}).get("models", {}).items():
        tp, s = r["throughput"], r["store"]
        most = max((k for k in tp["over_merged"] if k.startswith("bank-")),
                   key=lambda k: int(k.split("-")[1]))
        lines.append(f"- serving, {name} (r={r['rank']}): {most.split('-')[1]} distinct adapters "
                     f"per batch / merged single model time {tp['over_merged'][most]:.2f}; "
                     f"{r['memory']['bytes_per_adapter']:,} B per resident adapter; cold adapter "
                     f"from a store of {s['adapters']:,}: p50 {s['cold_one_s']['p50'] * 1e3:.2f} ms")
    m = results.get("million")
    if m:
        lines.append(f"- {m['adapters']:,} adapters in one memory-mapped store "
                     f"({m['store_bytes'] / 2**30:.2f} GiB): cold adapter p50 "
                     f"{m['cold_one_s']['p50'] * 1e3:.2f} ms, p99 {m['cold_one_s']['p99'] * 1e3:.2f} "
                     f"ms; a batch of {m['batch']['rows']} random adapters / all resident time "
                     f"{m['batch']['cold_over_resident_time']:.2f}")
    return lines


def run(smoke: bool = False, only: list[str] | None = None) -> dict:
    names = only or list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"unknown benchmarks {sorted(unknown)}; choose from {list(BENCHMARKS)}")
    results, took = {}, {}
    for n in names:
        t = time.perf_counter()
        results[n] = BENCHMARKS[n](smoke=smoke)
        took[n] = time.perf_counter() - t
        print(f"[run_all] {n}: {took[n]:.0f} s -> {results[n]['path']}", flush=True)
    write_readme(results, smoke, took)
    return results


def load_results(smoke: bool = False) -> dict:
    """The latest result of each benchmark, read back from its JSON file, its markdown
    re-rendered (so a change to a table's layout needs no re-run)."""
    out = common.results_dir(smoke)
    results = {}
    for n, module in MODULES.items():
        f = out / f"{n}.json"
        if f.exists():
            payload = json.loads(f.read_text())
            results[n] = {"path": str(common.write_markdown(payload, module.tables)), **payload}
    return results


def write_readme(results: dict, smoke: bool, took: dict | None = None) -> Path:
    """``README.md`` beside the results: headline ratios, then every benchmark's tables."""
    took = took or {}
    out = common.results_dir(smoke)
    m = common.machine()
    parts = [f"# Benchmark results{' (smoke)' if smoke else ''}\n",
             (f"Latest `python -m benchmarks.run_all{' --smoke' if smoke else ''}`: {m['date_utc']}, "
              f"{m['cpu']} × {m['cores']} cores, {m['backend']}, jax {m['jax']}, git {m['git']}. "
              if took else f"Re-rendered {m['date_utc']} (git {m['git']}) from each benchmark's "
              "latest JSON; every section below starts with the date, machine load and commit of "
              "its own run. "),
             "Ratios are measured side by side in one process (interleaved rounds, medians); "
             "absolute times on this shared machine are noisy.\n",
             "## Headline\n", *headline(results), ""]
    for n in results:
        md = Path(results[n]["path"])
        spent = f" · took {took[n]:.0f} s" if n in took else ""
        parts += [f"---\n\n[{md.name}]({md.name}){spent}\n",
                  md.read_text().split("\n", 2)[2].replace("\n## ", "\n### ")]
    path = out / "README.md"
    path.write_text("\n".join(parts))
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds, for tests)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {list(BENCHMARKS)}")
    p.add_argument("--readme", action="store_true",
                   help="only rebuild README.md from the JSON results on disk")
    a = p.parse_args(argv)
    if a.readme:
        print(write_readme(load_results(a.smoke), a.smoke))
    else:
        run(a.smoke, [x for x in a.only.split(",") if x] or None)


if __name__ == "__main__":
    main()
