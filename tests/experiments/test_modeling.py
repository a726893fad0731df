"""Building the base model of a config."""

import pytest

from loraxs_jax.experiments import modeling


@pytest.mark.parametrize("remat,expected", [("none", False), ("full", True)])
def test_encoder_remat_follows_the_config(tiny_config, tiny_bert, remat, expected):
    """model.remat='none' is a truthy string: passed as is, every encoder run rematerialised."""
    model = modeling.build_model(tiny_config(tiny_bert, **{"model.remat": remat}))
    assert model.config.remat is expected
