"""Run one config over several seeds and report the paper's statistic: the median over seeds of
each run's best evaluation (GLUE, Table 1).

    loraxs-sweep --config=configs/glue.py:task=rte,rank=25 --seeds=5 --workdir=runs/rte_r25
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from loraxs_jax.experiments import train
from loraxs_jax.experiments.validate import ConfigError, validate


def sweep(config, workdir: str | Path, seeds: int) -> dict:
    """Train ``seeds`` runs (seed 0..seeds-1) in workdir/seed_<k>; runs already finished are
    read back from their summary.json, so a sweep resumes too. The config is validated before
    the first run starts."""
    validate(config)
    workdir = Path(workdir)
    best = []
    for seed in range(seeds):
        run = workdir / f"seed_{seed}"
        done = run / "summary.json"
        if done.exists():
            summary = json.loads(done.read_text())
        else:
            c = config.copy_and_resolve_references()
            c.seed = seed
            summary = train.train_and_evaluate(c, run)
        key = next(k for k in summary if k.startswith("best_") and k != "best_step")
        best.append(summary[key])
    result = {"metric": key, "per_seed": best, "median": statistics.median(best)}
    (workdir / "sweep.json").write_text(json.dumps(result, indent=2))
    print(f"\n{key} per seed: {', '.join(f'{b:.4f}' for b in best)}; median {result['median']:.4f}")
    return result


def main(argv: Sequence[str]) -> None:
    del argv
    from absl import flags

    from loraxs_jax.experiments import cli

    cli.start(flags.FLAGS.config)
    sweep(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.seeds)


def cli_main() -> None:
    """``loraxs-sweep``: --config=FILE[:args] --workdir=DIR [--seeds=5]."""
    from absl import flags

    from loraxs_jax.experiments import cli

    cli.define_config_flag()
    flags.DEFINE_string("workdir", None, "sweep folder (one sub-folder per seed)")
    flags.DEFINE_integer("seeds", 5, "number of seeds (the paper uses 5)")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main, errors=(ConfigError, train.NonFiniteLoss))


if __name__ == "__main__":
    cli_main()
