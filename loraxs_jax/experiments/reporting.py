"""What a run leaves to read: metrics.jsonl and TensorBoard events, PNG plots, the summary table,
log.txt; and what it shows on the console.

Only process 0 of a multi-process job writes; every record is one JSON line
``{"split": "train"|"eval", "step": n, <metric>: value, ...}``. The console shows the progress
bar, one line per evaluation (:func:`echo`), warnings and errors of ours, and the summary;
every log line, the libraries' (orbax, absl, jax) included, goes to the run's log.txt
(:func:`run_log`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraxs_jax.parallel import atomic_write, is_main_process

log = logging.getLogger("loraxs")


def echo(line: str) -> None:
    """One line for the console (process 0) that does not break a tqdm bar, and for log.txt."""
    from tqdm import tqdm

    log.info(line)
    if is_main_process():
        tqdm.write(line)


@contextlib.contextmanager
def run_log(workdir: Path, enabled: bool = True) -> Iterator[None]:
    """Send every log record (ours and the libraries') to workdir/log.txt while a run lasts.
    Which records exist is the loggers' levels' business: ``cli.start`` sets INFO."""
    if not enabled:
        yield
        return
    handler = logging.FileHandler(workdir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


class Writer:
    """metrics.jsonl + TensorBoard, one call per record; only process 0 of a multi-process job
    writes (``enabled``), the others' calls do nothing.

    ``resume_step``: the optimizer step the run (re)starts from. Records of later steps, written
    by a run that was killed before its next checkpoint, are dropped from metrics.jsonl and
    purged from TensorBoard, so each step is recorded once however often the run restarts.
    """

    def __init__(self, workdir: Path, enabled: bool = True, resume_step: int = 0):
        from tensorboardX import SummaryWriter

        self.enabled = enabled
        if enabled:
            path = workdir / "metrics.jsonl"
            if path.exists():
                kept = [r for r in read_metrics(workdir) if r["step"] <= resume_step]
                atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
            tb = workdir / "tb"
            self.jsonl = open(path, "a")
            self.tb = SummaryWriter(str(tb), purge_step=resume_step + 1 if tb.exists() else None)

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
    """The records of workdir/metrics.jsonl; a torn last line (a kill mid-write) is skipped,
    a bad line elsewhere raises naming the file and line."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}, line {i + 1}, is not a JSON record: {line[:80]!r}"
                                 ) from None
    return out


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
