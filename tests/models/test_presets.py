"""The paper's trainable-parameter counts, from real model configs and no weights
(jax.eval_shape through loraxs_jax.apply): Table 1 (RoBERTa-large), Tables 2 and 3."""

import functools

import jax
import pytest

import loraxs_jax as lx
from loraxs_jax.models import decoder, encoder
from loraxs_jax.models import presets as paper


def _count(shapes, rank, targets):
    cfg = lx.LoraXSConfig(rank=rank, targets=targets)
    return lx.count(jax.eval_shape(functools.partial(lx.apply, cfg=cfg), shapes))


@functools.cache
def _roberta_large():
    return encoder.param_shapes(encoder.roberta_large_config())


@pytest.mark.parametrize("rank,expected", [(4, 1_536), (8, 6_144), (12, 13_824), (16, 24_576),
                                           (20, 38_400), (25, 60_000)])
def test_roberta_large_table1(rank, expected):
    c = _count(_roberta_large(), rank, encoder.PAPER_TARGETS)
    assert c["R"] == expected
    assert c["adapted_matrices"] == 24 * 4
    assert c["adapter_bytes"] == 4 * expected


def _decoder(name):
    hf = getattr(paper, name)()
    cfg = hf if isinstance(hf, decoder.DecoderConfig) else decoder.DecoderConfig.from_hf(hf)
    return decoder.param_shapes(cfg)


@pytest.mark.parametrize("name,rank,expected", [
    ("mistral_7b", 16, 57_344), ("mistral_7b", 32, 229_376), ("mistral_7b", 64, 917_504),
    ("gemma_7b", 16, 50_176), ("gemma_7b", 32, 200_704), ("gemma_7b", 64, 802_816),
    ("llama3_8b", 32, 229_376), ("llama2_7b", 32, 229_376),
])
def test_decoder_tables_2_and_3(name, rank, expected):
    c = _count(_decoder(name), rank, decoder.PAPER_TARGETS)
    assert c["R"] == expected
