"""The embedded default (``make demo``): LoRA-XS on all-MiniLM-L6-v2, SST-2, on a laptop CPU.

Real weights (the ``minilm`` asset) and real data: the training set is the SST-2-style set built
from VADER's 10,605 rated Rotten Tomatoes snippets minus every sentence in SST-2 validation; the
evaluation set is the 872 real SST-2 validation sentences. The paper's GLUE recipe (targets
query, value, attention output, FFN output; alpha 16; AdamW, separate head learning rate; linear
schedule with 6% warmup; batch 32), shortened to one epoch (evaluated every 100 steps) with
max length 64 (SST-2 sentences are short) so it finishes in minutes on two cores.
all-MiniLM-L6-v2 was trained with mean pooling, so the classifier reads mean-pooled tokens.

Variants: ``--config=configs/minilm_sst2.py:rank=4,method=lora,init=random``.
"""

from configs.base import base
from loraxs_jax.models.encoder import PAPER_TARGETS


def get_config(arg: str = ""):
    opts = dict(kv.split("=", 1) for kv in arg.split(",") if kv)
    c = base()
    c.method = opts.get("method", "loraxs")
    c.model.kind = "encoder"
    c.model.path = "asset:minilm"
    c.model.head = "mean"
    c.loraxs.rank = int(opts.get("rank", 16))
    c.loraxs.alpha = 16.0
    c.loraxs.targets = PAPER_TARGETS
    c.loraxs.init = opts.get("init", "svd")
    c.loraxs.svd_method = "exact"          # 384-wide matrices: exact SVD costs milliseconds
    c.loraxs.trainable = (r"^classifier/",)
    c.task.name = "glue"
    c.task.glue = "sst2"
    c.task.max_length = 64
    c.optim.lr = float(opts.get("lr", 5e-3))
    c.optim.head_lr = 5e-3
    c.optim.warmup_ratio = 0.06
    c.batch_size = 32
    c.num_epochs = int(opts.get("epochs", 1))
    c.eval_every_steps = 100
    c.eval_batch_size = 128
    c.log_every_steps = 20
    if c.method == "full":
        c.optim.lr = 5e-5
    return c
