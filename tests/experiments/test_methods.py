"""The methods experiments train: LoRA-XS, LoRA (the baseline on the same leaves), full
fine-tuning and head only; what each trains, counts and saves."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file

import loraxs_jax as lx
from loraxs_jax.experiments import methods

TARGETS = (r"(q|v)/kernel$",)


def _base():
    rng = np.random.default_rng(0)
    layer = {k: {"kernel": jnp.asarray(rng.normal(size=(12, 8)), jnp.float32),
                 "bias": jnp.zeros(8)} for k in ("q", "v", "o")}
    return {"layer": layer, "classifier": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}}


def _config(method):
    return ml_collections.ConfigDict({
        "method": method, "seed": 0, "model": {"scan_layers": False},
        "loraxs": {"rank": 4, "alpha": 8.0, "targets": TARGETS, "init": "svd", "bases_dtype": "",
                   "trainable": (r"^classifier/",)}})


def test_lora_apply_is_pefts_init_on_loraxs_leaves():
    cfg = lx.LoraXSConfig(rank=4, alpha=8.0, targets=TARGETS, trainable=(r"^classifier/",))
    p = _base()
    ap = methods.lora_apply(p, cfg, jax.random.key(1))
    q = ap["layer"]["q"]
    bound = 1 / math.sqrt(12)
    assert q["kernel_loraxs_A"].shape == (12, 4) and q["kernel_loraxs_A"].dtype == jnp.float32
    assert float(jnp.abs(q["kernel_loraxs_A"]).max()) <= bound
    assert float(jnp.abs(q["kernel_loraxs_A"]).max()) > 0.8 * bound
    assert not np.any(q["kernel_loraxs_B"])                        # B = 0: starts as the base
    np.testing.assert_array_equal(q["kernel_loraxs_R"], np.eye(4))
    assert float(q["kernel_loraxs_scale"]) == 2.0
    merged = lx.merge(ap)
    np.testing.assert_array_equal(merged["layer"]["q"]["kernel"], p["layer"]["q"]["kernel"])
    # trained: A and B (LoRA's r·(in+out) per matrix) and the head, never R or W
    m = methods.Lora(ap, cfg)
    trainable, _ = m.split()
    names = {"/".join(k) for k in lx.tree.flatten(trainable)}
    assert names == {f"layer/{k}/kernel_loraxs_{r}" for k in "qv" for r in "AB"} | {
        "classifier/kernel", "classifier/bias"}


@pytest.mark.parametrize("method,trainable,head", [
    ("loraxs", 2 * 16, 18), ("lora", 2 * 4 * (12 + 8), 18),
    ("full", 3 * (12 * 8 + 8) + 18, 18), ("head", 0, 18)])
def test_each_method_counts_what_it_trains(method, trainable, head):
    m = methods.build_method(_config(method), _base())
    assert type(m) is methods.METHODS[method] and m.name == method
    counts = m.counts()
    assert (counts["trainable"], counts["head"]) == (trainable, head)
    t, _ = m.split()
    head_leaves = [p for p in lx.tree.flatten(t) if m.is_head(p)]
    assert bool(head_leaves) == (method != "full")      # full: one learning rate for everything


def test_each_method_saves_what_it_trained(tmp_path):
    for name in methods.METHODS:
        m = methods.build_method(_config(name), _base())
        trainable, frozen = m.split()
        out = m.save(tmp_path / name, trainable, frozen)
        if name == "full":
            assert out is None
            continue
        assert out.exists()
        if name == "loraxs":
            loaded = lx.load_adapter(out, _base())
            np.testing.assert_array_equal(loaded["layer"]["q"]["kernel_loraxs_R"],
                                          m.params["layer"]["q"]["kernel_loraxs_R"])
        else:
            assert set(load_file(out)) == {"/".join(p) for p in lx.tree.flatten(trainable)}


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match=r"config.method='loraxz': expected one of loraxs, lora"):
        methods.build_method(_config("loraxz"), _base())
