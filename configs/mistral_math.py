"""Table 3: Mistral-7B-v0.1 + LoRA-XS on MetaMathQA (100k), evaluated on GSM8K and MATH.

Rank 64 (917,504 trainable), alpha = rank, q,k,v,o,gate,up,down; 2 epochs, batch 128 (16 per
micro-batch x 8 accumulation steps), lr 4e-3, no weight decay, warmup ratio 0.02, cosine decay,
max length 512, bf16. ``rank=16|32|64`` selects the table's rows; ``mesh.fsdp`` shards the model.

    python train.py --config=configs/mistral_math.py:rank=64 --workdir=runs/mistral_r64
    loraxs-plan --config=configs/mistral_math.py --config.mesh.fsdp=8
"""

from loraxs_jax.experiments.defaults import decoder_base, parse_arg


def math_config(path: str, arg: str, source: str = "configs/mistral_math.py"):
    """Arguments: rank (16 | 32 | 64), model (folder or hub id), method, data (MetaMathQA:
    hub, or a local .json/.jsonl)."""
    opts = parse_arg(arg, source=source, rank=64, model=path, method="loraxs", data="hub")
    rank = opts["rank"]
    c = decoder_base(opts["model"], rank, float(rank))
    c.method = opts["method"]
    c.task.name = "math"
    c.task.train_source = opts["data"]     # MetaMathQA: hub, or a local .json/.jsonl
    c.task.train_limit = 100_000
    c.task.max_length = 512
    c.task.eval_sets = ("gsm8k", "math")
    c.optim.lr = 4e-3
    c.optim.weight_decay = 0.0
    c.optim.warmup_ratio = 0.02
    c.optim.schedule = "cosine"
    c.optim.grad_accum = 8
    c.batch_size = 128
    c.num_epochs = 2
    c.generation.max_new_tokens = 512
    c.generation.batch_size = 64
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c


def get_config(arg: str = ""):
    return math_config("mistralai/Mistral-7B-v0.1", arg)
