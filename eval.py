"""Evaluate a base model, base + LoRA-XS adapter, or the merged model on a task's evaluation set.

    python eval.py --config=configs/minilm_sst2.py --adapter=runs/demo/adapter.safetensors
    python eval.py --config=configs/minilm_sst2.py --adapter=... --mode=merged
    python eval.py --config=configs/smollm2_math.py --adapter=... --mode=both --out=runs/eval

``--mode``: base (no adapter), adapted (base + adapter, unmerged), merged (W + (α/r)·A·R·B, a
plain model), or both (adapted and merged, and it checks that their scores agree). Generative
tasks write predictions to <out>/predictions_<mode>.jsonl next to scores_<mode>.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import ml_collections

import experiment
import loraxs_jax as lx

log = logging.getLogger("loraxs")
MODES = ("base", "adapted", "merged", "both")


def evaluate(config: ml_collections.ConfigDict, adapter: str | None, mode: str = "adapted",
             out: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Scores per mode, e.g. {"adapted": {...}, "merged": {...}}; written to ``out`` if given."""
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r}: expected one of {', '.join(MODES)}")
    if mode != "base" and not adapter:
        raise ValueError(f"--mode={mode} needs --adapter=PATH (an adapter.safetensors)")
    model = experiment.build_model(config, experiment.num_labels_for(config))
    task = experiment.build_task(config, model)
    from loraxs_jax.sharding import is_main_process

    main = is_main_process()     # multi-process: every process evaluates, process 0 writes
    out = Path(out) if out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    # Everything runs on the mesh of config.mesh: params sharded by the model's logical axes,
    # adapters like their kernels, merge and predictions jitted with explicit shardings.
    mesh, base, base_sh = experiment.place_params(config, model, model.params)
    runs: dict[str, tuple] = {}
    if mode == "base":
        runs["base"] = (model.module.apply, base, base_sh)
    else:
        _, adapted, adapted_sh = experiment.place_params(
            config, model, lx.load_adapter(adapter, base), mesh)
        if mode in ("adapted", "both"):
            runs["adapted"] = (lx.wrap(model.module.apply), adapted, adapted_sh)
        if mode in ("merged", "both"):
            runs["merged"] = (model.module.apply, lx.merge(adapted, out_shardings=base_sh),
                              base_sh)
    scores = {}
    for name, (apply_fn, params, shardings) in runs.items():
        kwargs = {"predictions": out / f"predictions_{name}.jsonl"} if out and main and getattr(
            task, "generative", False) else {}
        predict = task.predict_fn(apply_fn, mesh, shardings)
        scores[name] = task.evaluate(apply_fn, params, config.eval_batch_size, predict, **kwargs)
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


def main(argv):
    del argv
    from absl import flags

    from loraxs_jax.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    FLAGS = flags.FLAGS
    scores = evaluate(FLAGS.config, FLAGS.adapter, FLAGS.mode, FLAGS.out)
    print(json.dumps(scores, indent=2))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py[:args])")
    flags.DEFINE_string("adapter", None, "adapter file written by train.py")
    flags.DEFINE_enum("mode", "adapted", MODES, "what to evaluate")
    flags.DEFINE_string("out", None, "folder for scores and predictions")
    flags.mark_flags_as_required(["config"])
    app.run(main)
