"""The strict key=value parser every config file uses, and the defaults it starts from."""

import dataclasses

import pytest

import loraxs_jax as lx
from loraxs_jax.experiments import defaults

CONFIGS = ["minilm_sst2", "glue", "llama_commonsense", "mistral_math", "gemma_math",
           "smollm2_commonsense", "smollm2_math"]


def test_parse_arg_types_and_defaults():
    got = defaults.parse_arg("rank=4, lr=2e-3,name=x,flag=true", rank=16, lr=0.0, name="", flag=False,
                             seed=3)
    assert got == {"rank": 4, "lr": 2e-3, "name": "x", "flag": True, "seed": 3}
    assert defaults.parse_arg("", rank=16) == {"rank": 16}


@pytest.mark.parametrize("arg,match", [
    ("rnak=4", r"unknown argument 'rnak' \(did you mean 'rank'\?\); valid keys: lr, rank"),
    ("rank=four", r"rank='four' is not a valid int \(default 16\)"),
    ("lr=fast", r"lr='fast' is not a valid float"),
    ("rank", r"argument 'rank' is not key=value"),
])
def test_parse_arg_refuses_by_name(arg, match):
    with pytest.raises(ValueError, match=match):
        defaults.parse_arg(arg, source="configs/x.py", rank=16, lr=1e-3)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_refuses_an_unknown_argument(load_config, name):
    with pytest.raises(ValueError, match=rf"configs/{name}\.py: unknown argument 'rnak'"):
        load_config(f"configs/{name}.py:rnak=4")


def test_minilm_arguments_take_effect(load_config):
    c = load_config("configs/minilm_sst2.py:rank=4,init=random,lr=2e-3,epochs=2")
    assert (c.loraxs.rank, c.loraxs.init, c.optim.lr, c.num_epochs) == (4, "random", 2e-3, 2)
    assert load_config("configs/minilm_sst2.py:method=full").optim.lr == 5e-5
    assert load_config("configs/minilm_sst2.py:method=full,lr=1e-4").optim.lr == 1e-4
    per = load_config("configs/minilm_sst2.py:rank_attn=4,rank_ffn=8").loraxs.rank.to_dict()
    assert per == {"attention/": 4, "output/dense/kernel$": 8}
    with pytest.raises(ValueError, match="give both rank_attn and rank_ffn"):
        load_config("configs/minilm_sst2.py:rank_attn=4")


def test_loraxs_section_defaults_are_the_librarys():
    section = defaults.base().loraxs
    for f in dataclasses.fields(lx.LoraXSConfig):
        if f.name in section and f.name not in ("targets", "trainable", "bases_dtype"):
            assert section[f.name] == f.default, f.name
