"""Offline, real-asset version of Table 3 that runs on a CPU: SmolLM2-135M-Instruct + LoRA-XS on
GSM-Symbolic problems with worked answers (the ``reasoning_gym`` asset), evaluated on GSM8K test
(the rows GSM-Symbolic's templates were written from are excluded)."""

from configs.base import decoder_base


def get_config(arg: str = ""):
    opts = dict(kv.split("=", 1) for kv in arg.split(",") if kv)
    c = decoder_base("asset:smollm2", int(opts.get("rank", 16)), float(opts.get("rank", 16)))
    c.method = opts.get("method", "loraxs")
    c.model.dtype = c.model.param_dtype = "float32"
    c.loraxs.bases_dtype = ""
    c.task.name = "math"
    c.task.train_source = "gsm_symbolic"
    c.task.train_limit = int(opts.get("train", 2000))
    c.task.eval_limit = int(opts.get("eval", 50))
    c.task.eval_sets = ("gsm8k",)
    c.task.max_length = 384
    c.optim.lr = 4e-3
    c.optim.warmup_ratio = 0.02
    c.optim.schedule = "cosine"
    c.batch_size = 16
    c.num_epochs = 1
    c.log_every_steps = 5
    c.generation.max_new_tokens = 256
    c.generation.batch_size = 50
    return c
