"""The embedded default (``make demo``): LoRA-XS on all-MiniLM-L6-v2, SST-2, on a laptop CPU.

Real weights (the ``minilm`` asset) and real data: the training set is the SST-2-style set built
from VADER's 10,605 rated Rotten Tomatoes snippets minus every sentence in SST-2 validation; the
evaluation set is the 872 real SST-2 validation sentences. The paper's GLUE recipe (targets
query, value, attention output, FFN output; alpha 16; AdamW, separate head learning rate; linear
schedule with 6% warmup; batch 32), shortened to one epoch (evaluated every 100 steps) with
max length 64 (SST-2 sentences are short) so it finishes in minutes on two cores.
all-MiniLM-L6-v2 was trained with mean pooling, so the classifier reads mean-pooled tokens.

Arguments (``--config=configs/minilm_sst2.py:rank=4,method=lora,init=random``):
  method   loraxs | lora | full | head
  rank     r of every target
  rank_attn, rank_ffn   per-target ranks instead (attention's query/value/output, FFN output)
  init     svd | svd_no_sigma | svd_bottom | random | svd_random
  lr       peak learning rate (0: 5e-3, or 5e-5 with method=full)
  epochs   passes over the training set
"""

from loraxs_jax.experiments.defaults import base, parse_arg
from loraxs_jax.models.encoder import PAPER_TARGETS


def get_config(arg: str = ""):
    a = parse_arg(arg, source="configs/minilm_sst2.py", method="loraxs", rank=16, rank_attn=0,
                  rank_ffn=0, init="svd", lr=0.0, epochs=1)
    c = base()
    c.method = a["method"]
    c.model.kind = "encoder"
    c.model.path = "asset:minilm"
    c.model.head = "mean"
    c.loraxs.rank = a["rank"]
    if a["rank_attn"] or a["rank_ffn"]:
        if not (a["rank_attn"] and a["rank_ffn"]):
            raise ValueError("configs/minilm_sst2.py: give both rank_attn and rank_ffn")
        # the first regex that searches a kernel's path gives its rank
        c.loraxs.rank = None
        c.loraxs.rank = {r"attention/": a["rank_attn"], r"output/dense/kernel$": a["rank_ffn"]}
    c.loraxs.alpha = 16.0
    c.loraxs.targets = PAPER_TARGETS
    c.loraxs.init = a["init"]
    c.loraxs.svd_method = "exact"          # 384-wide matrices: exact SVD costs milliseconds
    c.loraxs.trainable = (r"^classifier/",)
    c.task.name = "glue"
    c.task.glue = "sst2"
    c.task.max_length = 64
    c.optim.lr = a["lr"] or (5e-5 if c.method == "full" else 5e-3)
    c.optim.head_lr = 5e-3
    c.optim.warmup_ratio = 0.06
    c.batch_size = 32
    c.num_epochs = a["epochs"]
    c.eval_every_steps = 100
    c.eval_batch_size = 128
    c.log_every_steps = 20
    # two host devices, a data-parallel step over the two cores: XLA's CPU step gains little
    # from a second thread, two half batches do better (benchmarks/results/vs_torch.md)
    c.runtime.host_devices = 2
    return c
