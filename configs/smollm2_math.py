"""Offline, real-asset version of Table 3 that runs on a CPU: SmolLM2-135M-Instruct + LoRA-XS on
GSM-Symbolic problems with worked answers (the ``reasoning_gym`` asset), evaluated on GSM8K test
(the rows GSM-Symbolic's templates were written from are excluded)."""

from loraxs_jax.experiments.defaults import decoder_base, parse_arg


def get_config(arg: str = ""):
    opts = parse_arg(arg, source="configs/smollm2_math.py", rank=16, method="loraxs", train=2000, eval=50)
    c = decoder_base("asset:smollm2", opts["rank"], float(opts["rank"]))
    c.method = opts["method"]
    c.model.dtype = c.model.param_dtype = "float32"
    c.loraxs.bases_dtype = ""
    c.task.name = "math"
    c.task.train_source = "gsm_symbolic"
    c.task.train_limit = opts["train"]
    c.task.eval_limit = opts["eval"]
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
