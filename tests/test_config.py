"""LoraXSConfig: per-kernel lookups, serialisation, and the errors of bad fields."""

import dataclasses

import pytest

import loraxs_jax as lx


def test_per_kernel_lookups_take_the_first_matching_regex():
    cfg = lx.LoraXSConfig(rank={r"attention/": 4, r"output/dense/kernel$": 8},
                          targets=(r"attention/self/query/kernel$", r"output/dense/kernel$"),
                          in_axes={r"attn_out": 2}, stacked_axes={r"^scan/": 1},
                          trainable=r"^classifier/")
    assert cfg.rank_for("encoder/layer/0/attention/output/dense/kernel") == 4
    assert cfg.rank_for("encoder/layer/0/output/dense/kernel") == 8
    assert cfg.in_axes_for("x/attn_out/kernel") == 2 and cfg.in_axes_for("x/q/kernel") is None
    assert cfg.stacked_axes_for("scan/q/kernel") == 1 and cfg.stacked_axes_for("q/kernel") == 0
    assert cfg.is_target("encoder/layer/3/attention/self/query/kernel")
    assert not cfg.is_target("encoder/layer/3/attention/self/key/kernel")
    assert cfg.trainable == ("^classifier/",) and cfg.is_extra_trainable("classifier/kernel")
    with pytest.raises(ValueError, match=r"no rank pattern matches target x/kernel"):
        cfg.rank_for("x/kernel")


def test_dict_and_json_round_trip():
    cfg = lx.LoraXSConfig(rank={"q": 4, "v": 8}, targets=("q", "v"), init="svd_bottom",
                          bases_dtype="bfloat16", stacked_axes=1)
    again = lx.LoraXSConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert set(cfg.bases_dict()) <= set(cfg.to_dict()) and "alpha" not in cfg.bases_dict()
    assert '"rank": {"q": 4, "v": 8}' in cfg.to_json()
    with pytest.raises(ValueError, match=r"unknown LoraXSConfig fields \['rnak'\]"):
        lx.LoraXSConfig.from_dict({"targets": ["q"], "rnak": 4})


# (field, bad value, what the error says): every field of LoraXSConfig, several per field where
# an earlier version accepted the value and failed later (or never).
BAD_FIELDS = [
    ("rank", 0, r"rank=0: expected an int >= 1"),
    ("rank", {"q": -2}, r"rank\['q'\]=-2: expected an int >= 1"),
    ("rank", {"query": 4.5}, r"rank\['query'\]=4.5: expected an int >= 1"),   # was truncated to 4
    ("rank", True, r"rank=True: expected an int >= 1"),
    ("rank", {}, r"rank=\{\}: an empty mapping gives no kernel a value"),
    ("rank", {3: 4}, r"rank key 3: expected a non-empty regex string"),
    ("alpha", 0, r"alpha=0: expected a finite number > 0"),              # was: ΔW = 0
    ("alpha", float("nan"), r"alpha=nan: expected a finite number > 0"),  # was: NaN outputs
    ("alpha", "16", r"alpha='16': expected a finite number > 0"),       # was: TypeError later
    ("alpha", True, r"alpha=True: expected a finite number > 0"),
    ("targets", ("q(",), r"bad regex 'q\(' in LoraXSConfig.targets"),
    ("targets", (), r"targets is empty"),
    ("targets", (1,), r"targets 1: expected a non-empty regex string"),
    ("init", "kaiming", r"init='kaiming': unknown; choose one of svd"),
    ("r_std", -1.0, r"r_std=-1.0: expected a finite number >= 0"),
    ("r_std", float("nan"), r"r_std=nan: expected a finite number >= 0"),
    ("svd_method", "lanczos",
     r"svd_method='lanczos': unknown; choose one of exact, randomized, block_krylov"),
    ("oversample", -5, r"oversample=-5: expected an int >= 0"),          # was: reshape error
    ("power_iters", 2.0, r"power_iters=2.0: expected an int >= 0"),
    ("power_iters", -1, r"power_iters=-1: expected an int >= 0"),
    ("oversample", True, r"oversample=True: expected an int >= 0"),
    ("krylov_iters", 0, r"krylov_iters=0: expected an int >= 1"),    # a Krylov space of P₀ alone
    ("krylov_iters", 2.5, r"krylov_iters=2.5: expected an int >= 1"),
    ("bases_dtype", "float33", r"bases_dtype='float33': expected the name of a floating dtype"),
    ("bases_dtype", "int8", r"bases_dtype='int8': expected the name of a floating dtype"),
    ("r_dtype", "int8", r"r_dtype='int8': expected the name of a floating dtype"),
    ("trainable", 5, r"trainable=5: expected a regex string or a sequence of them"),
    ("trainable", ("head(",), r"bad regex 'head\(' in LoraXSConfig.trainable"),
    ("in_axes", 0, r"in_axes=0: expected an int >= 1"),
    ("stacked_axes", {"scan": -1}, r"stacked_axes\['scan'\]=-1: expected an int >= 0"),
    ("bases_seed", -1, r"bases_seed=-1: expected an int >= 0"),
    ("bases_seed", "0", r"bases_seed='0': expected an int >= 0"),
    ("svd_batch", 0, r"svd_batch=0: expected an int >= 1"),              # was: range() error
]


def test_the_bad_field_table_covers_every_field():
    assert {f for f, _, _ in BAD_FIELDS} == {f.name for f in dataclasses.fields(lx.LoraXSConfig)}


@pytest.mark.parametrize("field,value,match", BAD_FIELDS)
def test_bad_fields_are_refused_by_name(field, value, match):
    with pytest.raises(ValueError, match=match):
        lx.LoraXSConfig(**{"targets": ("q",), field: value})


def test_values_are_normalised():
    """numpy ints, int alphas and dtype objects are taken and stored as plain JSON values."""
    import jax.numpy as jnp
    import numpy as np

    cfg = lx.LoraXSConfig(targets="q", rank={"q": np.int64(4)}, alpha=16, bases_dtype=jnp.bfloat16)
    assert cfg.rank == (("q", 4),) and type(cfg.rank[0][1]) is int
    assert cfg.alpha == 16.0 and type(cfg.alpha) is float and cfg.bases_dtype == "bfloat16"
    assert lx.LoraXSConfig.from_dict(cfg.to_dict()) == cfg
