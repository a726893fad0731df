"""The paper's trainable-parameter counts, from real model configs and no weights
(jax.eval_shape through loraxs_jax.apply): Table 1 (RoBERTa-large), Tables 2 and 3."""

import functools

import jax
import pytest
from flax import linen as nn

import loraxs_jax as lx
from configs.base import DECODER_TARGETS
from loraxs_jax.models import configs as paper
from loraxs_jax.models.decoder import DecoderConfig, param_shapes
from loraxs_jax.models.encoder import PAPER_TARGETS, Encoder, _dummy_inputs, roberta_large_config


def _count(shapes, rank, targets):
    cfg = lx.LoraXSConfig(rank=rank, targets=targets)
    return lx.count(jax.eval_shape(functools.partial(lx.apply, cfg=cfg), shapes))


@functools.cache
def _roberta_large():
    return nn.meta.unbox(jax.eval_shape(Encoder(roberta_large_config()).init, jax.random.key(0),
                                        *_dummy_inputs())["params"])


@pytest.mark.parametrize("rank,expected", [(4, 1_536), (8, 6_144), (12, 13_824), (16, 24_576),
                                           (20, 38_400), (25, 60_000)])
def test_roberta_large_table1(rank, expected):
    c = _count(_roberta_large(), rank, PAPER_TARGETS)
    assert c["R"] == expected
    assert c["adapted_matrices"] == 24 * 4
    assert c["adapter_bytes"] == 4 * expected


def _decoder(name):
    hf = getattr(paper, name)()
    return param_shapes(DecoderConfig.from_hf(hf) if not isinstance(hf, DecoderConfig) else hf)


@pytest.mark.parametrize("name,rank,expected", [
    ("mistral_7b", 16, 57_344), ("mistral_7b", 32, 229_376), ("mistral_7b", 64, 917_504),
    ("gemma_7b", 16, 50_176), ("gemma_7b", 32, 200_704), ("gemma_7b", 64, 802_816),
    ("llama3_8b", 32, 229_376), ("llama2_7b", 32, 229_376),
])
def test_decoder_tables_2_and_3(name, rank, expected):
    c = _count(_decoder(name), rank, DECODER_TARGETS)
    assert c["R"] == expected
