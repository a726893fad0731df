"""Evaluate a base model, base + LoRA-XS adapter, or the merged model on a task's evaluation set.

    python eval.py --config=configs/minilm_sst2.py --adapter=runs/demo/adapter.safetensors
    python eval.py --config=configs/minilm_sst2.py --adapter=... --mode=merged
    loraxs-eval --config=configs/smollm2_math.py --adapter=... --mode=both --out=runs/eval

``--mode``: base (no adapter), adapted (base + adapter, unmerged), merged (W + (α/r)·A·R·B, a
plain model), or both (adapted and merged, and it checks that their scores agree). With
``--out``, each mode writes scores_<mode>.json and predictions_<mode>.jsonl (one line per
example) there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

import loraxs_jax as lx
from loraxs_jax import parallel
from loraxs_jax.experiments import modeling, tasks
from loraxs_jax.experiments.validate import ConfigError, validate

log = logging.getLogger("loraxs")
MODES = ("base", "adapted", "merged", "both")


def evaluate(config: ml_collections.ConfigDict, adapter: str | None, mode: str = "adapted",
             out: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Scores per mode, e.g. {"adapted": {...}, "merged": {...}}; written to ``out`` if given.

    The config and the adapter file (its header, tensors and digest: ``lx.io.adapter_info``)
    are checked before the model is built, so a bad file fails in milliseconds, naming it."""
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r}: expected one of {', '.join(MODES)}")
    if mode != "base" and not adapter:
        raise ValueError(f"--mode={mode} needs --adapter=PATH (an adapter.safetensors)")
    validate(config)
    if mode != "base":
        lx.io.adapter_info(adapter)
    model = modeling.build_model(config, tasks.num_labels_for(config))
    task = tasks.build_task(config, model)
    main = parallel.is_main_process()  # multi-process: every process evaluates, process 0 writes
    out = Path(out) if out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    # Everything runs on the mesh of config.mesh: params sharded by the model's logical axes,
    # adapters like their kernels, merge and predictions jitted with explicit shardings.
    mesh, base, base_sh = modeling.place_params(config, model, model.params)
    runs: dict[str, tuple] = {}
    if mode == "base":
        runs["base"] = (model.module.apply, base, base_sh)
    else:
        _, adapted, adapted_sh = modeling.place_params(
            config, model, lx.load_adapter(adapter, base), mesh)
        if mode in ("adapted", "both"):
            runs["adapted"] = (lx.wrap(model.module.apply), adapted, adapted_sh)
        if mode in ("merged", "both"):
            runs["merged"] = (model.module.apply, lx.merge(adapted, out_shardings=base_sh),
                              base_sh)
    scores = {}
    for name, (apply_fn, params, shardings) in runs.items():
        predictions = out / f"predictions_{name}.jsonl" if out and main else None
        predict = task.predict_fn(apply_fn, mesh, shardings)
        scores[name] = task.evaluate(apply_fn, params, config.eval_batch_size, predict,
                                     predictions=predictions)
        log.info("%s: %s", name, scores[name])
        if out and main:
            (out / f"scores_{name}.json").write_text(json.dumps(scores[name], indent=2))
    if mode == "both":
        a, m = scores["adapted"][task.main_metric], scores["merged"][task.main_metric]
        scores["agree"] = {"metric": task.main_metric, "adapted": a, "merged": m,
                           "difference": abs(a - m)}
        if abs(a - m) > 0.005:
            raise RuntimeError(f"merged and unmerged {task.main_metric} disagree: {a} vs {m}")
    return scores


def main(argv: Sequence[str]) -> None:
    del argv
    from absl import flags

    from loraxs_jax.experiments import cli

    cli.start(flags.FLAGS.config)
    FLAGS = flags.FLAGS
    scores = evaluate(FLAGS.config, FLAGS.adapter, FLAGS.mode, FLAGS.out)
    print(json.dumps(scores, indent=2))


def cli_main() -> None:
    """``loraxs-eval`` / ``python eval.py``: --config=FILE[:args] [--adapter=FILE] [--mode=...]."""
    from absl import flags

    from loraxs_jax.experiments import cli

    cli.define_config_flag()
    flags.DEFINE_string("adapter", None, "adapter file written by train.py")
    flags.DEFINE_enum("mode", "adapted", MODES, "what to evaluate")
    flags.DEFINE_string("out", None, "folder for scores and predictions")
    flags.mark_flags_as_required(["config"])
    cli.run(main, errors=(ConfigError, lx.io.AdapterFileError, FileNotFoundError))


if __name__ == "__main__":
    cli_main()
