"""LoraXSConfig: per-kernel lookups, serialisation, and the errors of bad fields."""

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


@pytest.mark.parametrize("kwargs,match", [
    (dict(init="kaiming"), "unknown init 'kaiming'; choose one of svd"),
    (dict(svd_method="lanczos"), "unknown svd_method 'lanczos'; choose one of exact, randomized, "
                                 "block_krylov"),
    (dict(krylov_iters=0), "krylov_iters must be an int >= 1, got 0"),
    (dict(krylov_iters=2.5), "krylov_iters must be an int >= 1, got 2.5"),
    (dict(power_iters=-1), "power_iters must be an int >= 0, got -1"),
    (dict(oversample=True), "oversample must be an int >= 0, got True"),
    (dict(rank=0), "rank must be a positive int, got 0"),
    (dict(rank={"q": -2}), "rank must be a positive int, got -2"),
    (dict(r_std=-1.0), "r_std must be >= 0"),
    (dict(targets=("q(",)), "bad regex 'q\\(' in LoraXSConfig"),
    (dict(targets=()), "targets is empty"),
])
def test_bad_fields_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lx.LoraXSConfig(**{"targets": ("q",), **kwargs})
