"""Tiny models with a folder of trained-looking adapters each, shared by the serving tests.

``decoder_zoo``: a random 2-layer Llama-family decoder over MiniLM's real tokenizer's vocabulary,
adapters a0..a2 at rank 4 and s2 at rank 2 (the paper's seven targets, R ~ N(0, 0.3²) so each
adapter moves the logits visibly), all saved with ``save_adapter`` into one folder.
``encoder_zoo``: a random 2-layer BERT loaded from a transformers folder with MiniLM's real
tokenizer, a mean-pooled 3-label head, adapters e0..e2 that each carry their own head
(``trainable=("^classifier/",)``).
"""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

import loraxs_jax as lx
from loraxs_jax.models import decoder as dec
from loraxs_jax.models import encoder as enc


@dataclasses.dataclass
class Zoo:
    model: object
    config: object
    base: dict
    cfg: lx.LoraXSConfig          # the bank's config (rank 4)
    folder: Path
    names: list
    tokenizer: object = None

    def path(self, name):
        return self.folder / f"{name}.safetensors"

    def alone(self, name):
        """The adapted tree of one adapter, by the library's single-adapter path."""
        return lx.load_adapter(self.path(name), self.base)


@pytest.fixture(scope="session")
def decoder_zoo(tmp_path_factory, tiny_bert):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("decoder_adapters")
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)       # MiniLM's, 30,522 word pieces
    c = dec.DecoderConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                          num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=8)
    base = dec.init_params(c, jax.random.key(0))
    cfg = lx.LoraXSConfig(rank=4, alpha=8.0, targets=dec.PAPER_TARGETS, r_std=0.3)
    for k in range(3):
        lx.save_adapter(folder / f"a{k}", lx.apply(base, cfg, k), cfg)
    small = dataclasses.replace(cfg, rank=2, alpha=3.0)
    lx.save_adapter(folder / "s2", lx.apply(base, small, 7), small)
    return Zoo(dec.DecoderForCausalLM(c), c, base, cfg, folder, ["a0", "a1", "a2", "s2"],
               tokenizer)


@pytest.fixture(scope="session")
def encoder_zoo(tmp_path_factory, tiny_bert):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("encoder_adapters")
    c, base = enc.load_encoder(tiny_bert, num_labels=3, head="mean", rng=jax.random.key(3))
    cfg = lx.LoraXSConfig(rank=4, alpha=16.0, targets=enc.PAPER_TARGETS, r_std=0.5,
                          trainable=(r"^classifier/",))
    rng = np.random.default_rng(0)
    for k in range(3):
        adapted = lx.apply(base, cfg, k)
        head = {"kernel": rng.normal(size=(c.hidden_size, 3)).astype(np.float32),
                "bias": rng.normal(size=(3,)).astype(np.float32)}
        lx.save_adapter(folder / f"e{k}", {**adapted, "classifier": head}, cfg)
    return Zoo(enc.Encoder(c), c, base, cfg, folder, ["e0", "e1", "e2"],
               AutoTokenizer.from_pretrained(tiny_bert))
