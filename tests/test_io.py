"""Adapter files: R alone, bit-exact round trips, base fingerprints, the bases cache, atomic
writes, small headers."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import loraxs_jax as lx

CFG = lx.LoraXSConfig(rank=8, alpha=16.0, targets=(r"(q|v)/kernel$",), trainable=("^head/",))


def _base(seed=0, layers=6):
    rng = np.random.default_rng(seed)
    p = {f"layer_{i}": {k: {"kernel": jnp.asarray(rng.normal(size=(64, 48)), jnp.float32)}
                        for k in ("q", "v")} for i in range(layers)}
    p["head"] = {"kernel": jnp.asarray(rng.normal(size=(48, 2)), jnp.float32)}
    return p


def _trained(p, seed=1):
    ap = lx.apply(p, CFG, seed)
    # pretend training moved R and the head
    return jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.01 * (1 + jnp.arange(v.size).reshape(v.shape) % 7)
        if path[-1].key in ("kernel_loraxs_R",) or path[0].key == "head" else v, ap)


def test_round_trip_bit_exact_and_size(tmp_path):
    p = _base()
    ap = _trained(p)
    path = lx.save_adapter(tmp_path / "run" / "adapter", ap, CFG, include_extras=False)
    assert path.name == "adapter.safetensors"
    size, expected = path.stat().st_size, 8 * 8 * 12 * 4
    assert expected <= size <= 1024 + 1.05 * expected, (size, expected)
    info = lx.io.adapter_info(path)
    assert info["config"] == CFG and info["adapted"][8]["kernels"] == 12
    loaded = lx.load_adapter(path, p)
    for a, b in zip(jax.tree_util.tree_leaves_with_path(loaded),
                    jax.tree_util.tree_leaves_with_path(ap)):
        assert a[0] == b[0]
        if a[0][-1].key != "kernel" or a[0][0].key != "head":
            assert np.array_equal(a[1], b[1]), a[0]           # R, A, B and kernels identical


def test_extras_are_stored_and_bf16_halves_R(tmp_path):
    p = _base(1)
    ap = _trained(p)
    full = lx.save_adapter(tmp_path / "a", ap, CFG)
    loaded = lx.load_adapter(full, p)
    assert np.array_equal(loaded["head"]["kernel"], ap["head"]["kernel"])
    half = lx.save_adapter(tmp_path / "b", ap, CFG, dtype=jnp.bfloat16, include_extras=False)
    f32 = lx.save_adapter(tmp_path / "c", ap, CFG, include_extras=False)
    assert half.stat().st_size - 12 * 64 * 2 == pytest.approx(f32.stat().st_size - 12 * 64 * 4,
                                                             abs=64)
    r = lx.load_adapter(half, p)["layer_0"]["q"]["kernel_loraxs_R"]
    assert r.dtype == jnp.float32
    np.testing.assert_allclose(r, ap["layer_0"]["q"]["kernel_loraxs_R"], rtol=1e-2)


def test_wrong_base_and_wrong_config_are_refused(tmp_path):
    p = _base(2)
    path = lx.save_adapter(tmp_path / "a", _trained(p), CFG)
    other = _base(3)
    with pytest.raises(ValueError, match="trained on a different base model"):
        lx.load_adapter(path, other)
    lx.load_adapter(path, other, check_base=False)   # an explicit override works
    with pytest.raises(ValueError, match=r"different config: rank: file 8 vs given 4"):
        lx.load_adapter(path, p, lx.LoraXSConfig(rank=4, alpha=16.0, targets=CFG.targets,
                                                 trainable=CFG.trainable))
    smaller = {k: v for k, v in p.items() if k != "layer_5"}
    with pytest.raises(ValueError, match=r"does not fit these params: it holds R for 12 of rank "
                                         r"8 kernels, while its targets select 10 of rank 8"):
        lx.load_adapter(path, smaller)
    with pytest.raises(FileNotFoundError, match="no adapter file"):
        lx.load_adapter(tmp_path / "missing", p)
    with pytest.raises(ValueError, match="nothing to save"):
        lx.save_adapter(tmp_path / "x", p, CFG)


def test_bases_cache_computes_once(tmp_path, monkeypatch):
    p = _base(4)
    ap = _trained(p)
    path = lx.save_adapter(tmp_path / "a", ap, CFG)
    cache = tmp_path / "cache"
    first = lx.load_adapter(path, p, bases_cache=cache)
    files = list(cache.iterdir())
    assert len(files) == 1
    calls = []
    real = lx.io.compute_bases
    monkeypatch.setattr(lx.io, "compute_bases", lambda *a, **k: calls.append(1) or real(
        *a, **k))
    second = lx.load_adapter(path, p, bases_cache=cache)
    assert calls == []                                    # served from the cache
    for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second)):
        assert np.array_equal(a, b)
    assert np.array_equal(second["layer_1"]["v"]["kernel_loraxs_A"],
                          ap["layer_1"]["v"]["kernel_loraxs_A"])


def test_given_bases_travel_in_the_cache_and_are_never_recomputed(tmp_path):
    """init="given" (an imported checkpoint's A, B): loading needs the stored bases, refuses
    without them, and refuses a cache file holding other bases."""
    p = _base(6, layers=2)
    rng = np.random.default_rng(0)
    bases = {f"layer_{i}/{k}/kernel": (jnp.asarray(rng.normal(size=(64, 8)), jnp.float32),
                                       jnp.asarray(rng.normal(size=(8, 48)), jnp.float32))
             for i in range(2) for k in ("q", "v")}
    cfg = lx.LoraXSConfig(rank=8, targets=CFG.targets, init="given",
                          bases_seed=lx.io.bases_digest(bases))
    with pytest.raises(ValueError, match="init='given'.*cannot be recomputed"):
        lx.apply(p, cfg)
    ap = lx.apply(p, cfg, 1, bases=bases)
    path = lx.save_adapter(tmp_path / "a", ap, cfg)
    with pytest.raises(ValueError, match="cannot be recomputed"):
        lx.load_adapter(path, p)
    with pytest.raises(FileNotFoundError, match="no bases in"):
        lx.load_adapter(path, p, bases_cache=tmp_path / "empty")
    lx.io.store_bases(tmp_path / "cache", p, cfg, bases)
    back = lx.load_adapter(path, p, bases_cache=tmp_path / "cache")
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(ap)):
        assert np.array_equal(a, b)
    other = {k: (a + 1.0, b) for k, (a, b) in bases.items()}
    lx.io.store_bases(tmp_path / "cache", p, cfg, other)   # same file name, other bases
    with pytest.raises(ValueError, match="holds other bases"):
        lx.load_adapter(path, p, bases_cache=tmp_path / "cache")


def test_writes_are_atomic(tmp_path, monkeypatch):
    p = _base(5)
    ap = _trained(p)
    path = lx.save_adapter(tmp_path / "a", ap, CFG)
    before = path.read_bytes()

    def crash(*a, **k):
        raise OSError("disk died mid-rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk died"):
        lx.save_adapter(tmp_path / "a", lx.apply(p, CFG, 9), CFG)
    assert path.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.safetensors"]   # no temp left


def test_header_stays_small_with_many_matrices(tmp_path):
    """RoBERTa-large's layout (24 layers x 4 paper targets, long paths) at r=4: R is 6,144
    bytes; the file must stay within 1 KiB + 5% of that."""
    from loraxs_jax.models.encoder import PAPER_TARGETS

    rng = np.random.default_rng(7)
    layer = lambda: {"attention": {"self": {k: {"kernel": jnp.asarray(rng.normal(size=(16, 16)),
                                                                        jnp.float32)}
                                            for k in ("query", "key", "value")},
                                   "output": {"dense": {"kernel": jnp.asarray(
                                       rng.normal(size=(16, 16)), jnp.float32)}}},
                     "output": {"dense": {"kernel": jnp.asarray(rng.normal(size=(16, 16)),
                                                                 jnp.float32)}}}
    p = {"encoder": {"layer": {str(i): layer() for i in range(24)}}}
    cfg = lx.LoraXSConfig(rank=4, targets=PAPER_TARGETS)
    path = lx.save_adapter(tmp_path / "roberta_like", lx.apply(p, cfg, 0), cfg)
    expected = 24 * 4 * 4 * 4 * 4
    assert expected == 6144
    assert path.stat().st_size <= 1024 + 1.05 * expected, path.stat().st_size
    assert lx.load_adapter(path, p)["encoder"]["layer"]["23"]["output"]["dense"][
        "kernel_loraxs_R"].shape == (4, 4)
