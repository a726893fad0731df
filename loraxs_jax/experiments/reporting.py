"""What a run leaves to read: metrics.jsonl and TensorBoard events, PNG plots, the summary table.

Only process 0 of a multi-process job writes; every record is one JSON line
``{"split": "train"|"eval", "step": n, <metric>: value, ...}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class Writer:
    """metrics.jsonl + TensorBoard, one call per record; only process 0 of a multi-process job
    writes (``enabled``), the others' calls do nothing."""

    def __init__(self, workdir: Path, enabled: bool = True):
        from tensorboardX import SummaryWriter

        self.enabled = enabled
        if enabled:
            self.jsonl = open(workdir / "metrics.jsonl", "a")
            self.tb = SummaryWriter(str(workdir / "tb"))

    def write(self, split: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        rec = {"split": split, "step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def close(self):
        if not self.enabled:
            return
        self.jsonl.close()
        self.tb.close()


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def plot_metrics(workdir: Path, main_metric: str) -> list[Path]:
    """plots/train_loss.png and plots/eval_<metric>.png from metrics.jsonl (last record wins for
    a step, so a resumed run's plot has no duplicates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(workdir)
    out = []
    (workdir / "plots").mkdir(exist_ok=True)
    for split, key, name in (("train", "loss", "train_loss"), ("eval", main_metric,
                                                              f"eval_{main_metric}")):
        pts = {r["step"]: r[key] for r in recs if r["split"] == split and key in r}
        if not pts:
            continue
        steps = sorted(pts)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, [pts[s] for s in steps], marker="o" if split == "eval" else None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.set_title(f"{split} {key}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = workdir / "plots" / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(path)
    return out


def summary_table(summary: dict[str, Any]) -> str:
    rows = [(k, f"{v:,}" if isinstance(v, int) else (f"{v:.4f}" if isinstance(v, float) else str(v)))
            for k, v in summary.items()]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)
