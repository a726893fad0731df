"""The results page of a set of runs: learning-rate grids, medians over seeds, the paper's findings
tested on them, and a plot of accuracy against trainable parameters.

    python -m loraxs_jax.experiments.report runs/science --out docs

A run is a workdir holding ``summary.json`` and ``config.json`` (what ``train.py`` leaves). Runs
are grouped into VARIANTS by their path below the root with the ``lr<rate>`` and ``seed_<k>``
folders taken out (``loraxs_r4/lr0.003/seed_1`` is variant ``loraxs_r4``): for each variant the
learning rate is the one with the best evaluation at seed 0, and the reported figure is the
median over seeds at that rate of each run's best evaluation (the paper's statistic).

A base model scored by ``eval.py --mode=base --out=<root>/base`` (``scores_base.json``) joins as
variant ``base``: 0 trainable parameters, its score as both best and final, no learning rate.

A finding compares two variants. Its verdict is "reproduced" when the paper's winner leads by more
than the noise, "not reproduced" when it trails by more, and "within noise" otherwise; the noise is
the larger of the two variants' spreads over seeds and the binomial standard error of the
difference of two accuracies on the evaluation set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Run:
    """One finished run: where it is, its variant, learning rate, seed and summary."""

    path: Path
    variant: str
    lr: float
    seed: int
    summary: dict[str, Any]
    metric: str

    @property
    def best(self) -> float:
        return float(self.summary[f"best_{self.metric}"])

    @property
    def final(self) -> float:
        return float(self.summary[f"final_{self.metric}"])


@dataclasses.dataclass(frozen=True)
class Variant:
    """The runs of one variant: the grid at seed 0, the chosen rate and the seeds at it."""

    name: str
    runs: tuple[Run, ...]

    @property
    def grid(self) -> dict[float, float]:
        """{learning rate: best evaluation} at seed 0."""
        return {r.lr: r.best for r in sorted(self.runs, key=lambda r: r.lr) if r.seed == 0}

    @property
    def lr(self) -> float:
        grid = self.grid or {r.lr: r.best for r in self.runs}
        return max(grid, key=grid.get)

    @property
    def seeds(self) -> list[Run]:
        return sorted((r for r in self.runs if r.lr == self.lr), key=lambda r: r.seed)

    @property
    def median(self) -> float:
        return statistics.median(r.best for r in self.seeds)

    @property
    def spread(self) -> float:
        """max − min of the seeds' best evaluations at the chosen rate."""
        values = [r.best for r in self.seeds]
        return max(values) - min(values)

    @property
    def summary(self) -> dict[str, Any]:
        return self.seeds[0].summary


def _lr(config: dict[str, Any]) -> float:
    """The rate the method trains with: the head's for head-only runs."""
    optim = config["optim"]
    return float(optim["head_lr"] if config.get("method") == "head" else optim["lr"])


def _base_run(scores_file: Path, root: Path) -> Run:
    """A base model's ``scores_base.json`` (eval.py --mode=base) as a run of method "base"."""
    scores = json.loads(scores_file.read_text())
    if "accuracy" not in scores:
        raise ValueError(f"{scores_file} has no 'accuracy' (keys: {', '.join(sorted(scores))})")
    summary = {"method": "base", "trainable_params": 0, "best_accuracy": scores["accuracy"],
               "final_accuracy": scores["accuracy"], "steps": 0, "total_seconds": float("nan")}
    folder = scores_file.parent
    variant = "/".join(folder.relative_to(root).parts) or "base"
    return Run(folder, variant, 0.0, 0, summary, "accuracy")


def collect(root: str | Path) -> dict[str, Variant]:
    """Every finished run under ``root``, grouped into variants."""
    root = Path(root)
    groups: dict[str, list[Run]] = {}
    for scores_file in sorted(root.rglob("scores_base.json")):
        if not (scores_file.parent / "summary.json").exists():
            run = _base_run(scores_file, root)
            groups.setdefault(run.variant, []).append(run)
    for summary_file in sorted(root.rglob("summary.json")):
        folder = summary_file.parent
        config_file = folder / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{folder} has summary.json but no config.json")
        summary = json.loads(summary_file.read_text())
        config = json.loads(config_file.read_text())
        metric = next(k[len("best_"):] for k in summary if k.startswith("best_") and k != "best_step")
        parts = [p for p in folder.relative_to(root).parts
                 if not re.fullmatch(r"lr[0-9.e+-]+|seed_\d+", p)]
        variant = "/".join(parts) or "."
        groups.setdefault(variant, []).append(
            Run(folder, variant, _lr(config), int(config["seed"]), summary, metric))
    return {name: Variant(name, tuple(runs)) for name, runs in sorted(groups.items())}


def _noise(a: Variant, b: Variant, n_eval: int) -> float:
    se = math.sqrt(sum(v.median * (1 - v.median) / n_eval for v in (a, b)))
    return max(a.spread, b.spread, se)


def verdict(winner: Variant, loser: Variant, n_eval: int) -> tuple[str, float, float]:
    """("reproduced" | "not reproduced" | "within noise", difference, noise) for the claim that
    ``winner`` beats ``loser``."""
    d, noise = winner.median - loser.median, _noise(winner, loser, n_eval)
    return ("reproduced" if d > noise else "not reproduced" if d < -noise else
            "within noise"), d, noise


# (paper finding, variant the paper says wins, variant it beats)
FINDINGS = (
    ("LoRA-XS r=8 matches LoRA r=8 at each method's own tuned rate (the central claim)",
     "loraxs_r8", "lora_r8"),
    ("LoRA-XS r=16 matches LoRA r=16 at each method's own tuned rate", "loraxs_r16", "lora_r16"),
    ("Table 4: SVD bases beat random bases (r=4)", "loraxs_r4", "ablation_init_random"),
    ("Table 4: SVD bases beat the SVD of a random matrix (r=4)", "loraxs_r4",
     "ablation_init_svd_random"),
    ("Appendix G: the top singular vectors beat the bottom ones (r=4)", "loraxs_r4",
     "ablation_init_svd_bottom"),
    ("Appendix H: A = UΣ beats A = U (r=4)", "loraxs_r4", "ablation_init_svd_no_sigma"),
    ("Appendix E: FFN output layers need more rank than attention (equal trainable counts)",
     "ablation_rank_attn4_ffn8", "ablation_rank_attn6_ffn2"),
    ("Fine-tuning with LoRA-XS r=16 improves on the base model", "loraxs_r16", "base"),
    ("Fine-tuning with LoRA r=16 improves on the base model", "lora_r16", "base"),
)
MATCH_CLAIMS = ("matches",)    # a "matches" claim holds when the difference is within noise


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _seconds(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.0f}"


def _fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def findings(variants: dict[str, Variant], n_eval: int,
             spec: Sequence[tuple[str, str, str]] = FINDINGS) -> list[dict[str, Any]]:
    """The paper's findings that ``variants`` can test, each with numbers and a verdict."""
    out = []
    for claim, a, b in spec:
        if a not in variants or b not in variants:
            continue
        va, vb = variants[a], variants[b]
        result, d, noise = verdict(va, vb, n_eval)
        if any(word in claim for word in MATCH_CLAIMS):
            result = ("reproduced (within noise)" if result == "within noise" else
                      f"not reproduced ({a} {'leads' if d > 0 else 'trails'} beyond the noise)")
        out.append({
            "claim": claim, "a": a, "b": b, "a_median": va.median, "b_median": vb.median,
            "difference": d, "noise": noise, "verdict": result,
            "sentence": (f"{claim}: {result}. {a} {_pct(va.median)}% (median of "
                         f"{len(va.seeds)} seeds at lr {_fmt_lr(va.lr)}, range "
                         f"{_pct(va.spread)} pts) vs {b} {_pct(vb.median)}% ({len(vb.seeds)} "
                         f"seeds at lr {_fmt_lr(vb.lr)}, range {_pct(vb.spread)} pts): "
                         f"difference {100 * d:+.2f} pts, noise {100 * noise:.2f} pts."),
        })
    return out


def table(variants: dict[str, Variant]) -> str:
    """A markdown table: one row per variant."""
    lines = ["| variant | method | rank | init | trainable (excl. head) | lr grid at seed 0: best % "
             "| chosen lr | seeds | median best % | seed range (pts) | median final % | steps "
             "| median wall s |",
             "|" + "---|" * 13]
    for v in variants.values():
        s = v.summary
        grid = ", ".join(f"{_fmt_lr(lr)}: {_pct(acc)}" for lr, acc in v.grid.items())
        lines.append(
            f"| {v.name} | {s['method']} | {s.get('rank', '-')} | {s.get('init', '-')} | "
            f"{s['trainable_params']:,} | {grid} | {_fmt_lr(v.lr)} | "
            f"{','.join(str(r.seed) for r in v.seeds)} | {_pct(v.median)} | {_pct(v.spread)} | "
            f"{_pct(statistics.median(r.final for r in v.seeds))} | "
            f"{v.seeds[0].summary['steps']} | "
            f"{_seconds(statistics.median(r.summary['total_seconds'] for r in v.seeds))} |")
    return "\n".join(lines)


def plot(variants: dict[str, Variant], path: Path) -> Path:
    """Median best accuracy against trainable parameters (log scale), one series per method,
    bars spanning the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, Variant]]] = {}
    for v in variants.values():
        if v.name.startswith("ablation"):
            continue
        series.setdefault(v.summary["method"], []).append(
            (max(int(v.summary["trainable_params"]), 1), v))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, points in sorted(series.items()):
        points.sort(key=lambda p: p[0])
        xs = [p[0] for p in points]
        ys = [100 * p[1].median for p in points]
        lo = [100 * (p[1].median - min(r.best for r in p[1].seeds)) for p in points]
        hi = [100 * (max(r.best for r in p[1].seeds) - p[1].median) for p in points]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=method)
        for x, y, (_, v) in zip(xs, ys, points):
            ax.annotate(v.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters, head excluded (log; head-only drawn at 1)")
    ax.set_ylabel("median best accuracy %")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(root: str | Path, out: str | Path, n_eval: int = 872,
           title: str = "Results") -> dict[str, Any]:
    """Write ``out``/results.md, results.json and results_accuracy_vs_params.png for the runs
    under ``root``; return what was written."""
    variants = collect(root)
    if not variants:
        raise FileNotFoundError(f"no finished runs (summary.json + config.json) under {root}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    found = findings(variants, n_eval)
    figure = plot(variants, out / "results_accuracy_vs_params.png")
    methods = {k: v for k, v in variants.items() if not k.startswith("ablation")}
    ablations = {k: v for k, v in variants.items() if k.startswith("ablation")}
    text = [f"# {title}", "",
            f"Generated by `python -m loraxs_jax.experiments.report {root} --out {out}` from "
            f"{sum(len(v.runs) for v in variants.values())} runs' summary.json and config.json. "
            "Each figure is the median over seeds, at the learning rate with the best evaluation "
            "at seed 0, of each run's best evaluation.", "",
            "## Methods", "", table(methods), "", f"![accuracy vs trainable parameters]"
            f"({figure.name})", ""]
    if ablations:
        text += ["## Ablations", "", table(ablations), ""]
    if found:
        text += ["## The paper's findings here", ""] + [f"- {f['sentence']}" for f in found] + [""]
    (out / "results.md").write_text("\n".join(text))
    data = {"variants": {k: {"grid": v.grid, "lr": v.lr, "median": v.median,
                             "spread": v.spread, "seeds": [r.seed for r in v.seeds],
                             "summary": v.summary} for k, v in variants.items()},
            "findings": found}
    (out / "results.json").write_text(json.dumps(data, indent=2, default=str))
    return {"markdown": out / "results.md", "figure": figure, "findings": found,
            "variants": variants}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loraxs_jax.experiments.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", help="root folder of the runs")
    parser.add_argument("--out", default="docs", help="where results.md and the plot go")
    parser.add_argument("--n-eval", type=int, default=872,
                        help="evaluation examples (for the binomial noise); SST-2: 872")
    parser.add_argument("--title", default="Results")
    args = parser.parse_args(argv)
    done = report(args.runs, args.out, args.n_eval, args.title)
    print(f"wrote {done['markdown']} and {done['figure']}")
    for f in done["findings"]:
        print("-", f["sentence"])


if __name__ == "__main__":
    main()
