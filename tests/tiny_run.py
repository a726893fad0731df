"""A tiny random BERT (saved by transformers, with MiniLM's real tokenizer) and a short SST-2
run config on it: shared by the train/eval tests and the multi-process worker."""

import shutil
from pathlib import Path

from configs.minilm_sst2 import get_config
from loraxs_jax.assets import asset_path


def make_tiny_bert(folder: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder, safe_serialization=True)
    src = asset_path("minilm")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    return folder


def tiny_config(folder, **over):
    """6 steps of 16 on 192 SST-2 rows, evaluated on 96; ``over`` sets dotted keys."""
    c = get_config("rank=4")
    c.model.path = str(folder)
    c.task.train_limit = 192
    c.task.eval_limit = 96
    c.batch_size = 16
    c.num_train_steps = 6
    c.eval_every_steps = 3
    c.checkpoint_every_steps = 2
    c.log_every_steps = 2
    c.eval_batch_size = 48
    for k, v in over.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c
