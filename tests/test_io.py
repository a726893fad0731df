"""Adapter files: R alone, bit-exact round trips, base fingerprints, the bases cache, atomic
writes, small headers."""

import dataclasses
import json
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


# ----------------------------------------------------------------------------- untrusted files
SMALL = lx.LoraXSConfig(rank=2, targets=(r"q/kernel$",), trainable=("^head/",))


@pytest.fixture(scope="module")
def small_adapter(tmp_path_factory):
    """(base, adapter path, its bytes): 2 matrices of rank 2 and a head, ~1 KB."""
    rng = np.random.default_rng(11)
    base = {f"l{i}": {"q": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}}
            for i in range(2)}
    base["head"] = {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}
    path = lx.save_adapter(tmp_path_factory.mktemp("small") / "a", lx.apply(base, SMALL, 3), SMALL)
    return base, path, path.read_bytes()


def _write(tmp_path, data, name="x.safetensors"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_tensors_come_back_in_one_order_in_every_process(tmp_path):
    """safetensors.deserialize lists a file's tensors in an order that changes from process to
    process (a Rust HashMap); load_adapter's device_puts are collective on a multi-host mesh, so
    two processes placing the head's kernel and bias in different orders crashed gloo
    (test_multihost.py). read_tensors sorts them: 8 names come back sorted (by chance: 1/40320)."""
    names = [f"t{i}" for i in (5, 2, 7, 0, 3, 6, 1, 4)]
    path = lx.io.save_tensors(tmp_path / "x.safetensors",
                              {n: np.full(2, i, np.float32) for i, n in enumerate(names)}, {})
    tensors, _ = lx.io.read_tensors(path)
    assert list(tensors) == sorted(names)
    assert [float(tensors[n][0]) for n in names] == list(range(8))


def test_truncation_at_every_offset_is_refused_naming_the_file(small_adapter, tmp_path):
    _, _, data = small_adapter
    for cut in range(len(data)):
        p = _write(tmp_path, data[:cut])
        with pytest.raises(lx.io.AdapterFileError, match=str(p)):
            lx.io.adapter_info(p)
    assert len(data) > 500                               # every offset of a real header


def test_every_single_byte_flip_is_refused(small_adapter, tmp_path):
    """XOR 0x01 and 0x80 at every offset: the header's schema or the sha256 over the header and
    data catches each one (a flip in R's bytes would otherwise load silently)."""
    _, _, data = small_adapter
    caught = 0
    for i in range(len(data)):
        for mask in (0x01, 0x80):
            flipped = bytearray(data)
            flipped[i] ^= mask
            with pytest.raises(lx.io.AdapterFileError):
                lx.io.adapter_info(_write(tmp_path, bytes(flipped)))
            caught += 1
    assert caught == 2 * len(data)


def _raw(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return (len(h) if length is None else length).to_bytes(8, "little") + h + data


HOSTILE = [
    ("empty", b"", r"0 bytes, too short"),
    ("json renamed", json.dumps({"config": {"rank": 4}}).encode() * 4, r"declares a .*-byte header"),
    ("header length 2**63", _raw({}, length=2**63), r"declares a 9,223,372,036,854,775,808-byte"),
    ("header past the end", _raw({}, length=10_000), r"declares a 10,000-byte header"),
    ("not JSON", b"\x08" + b"\x00" * 7 + b"\xff\xfe{...}\x00", r"header is not JSON"),
    ("deep nesting", (200_000).to_bytes(8, "little") + b"[" * 100_000 + b"]" * 100_000,
     r"header is not JSON \(RecursionError"),
    ("a list", _raw([1, 2]), r"header is a JSON list"),
    ("metadata not strings", _raw({"__metadata__": {"format": 2}}), r"__metadata__ is not"),
    ("huge shape", _raw({"t": {"dtype": "F32", "shape": [2**40, 8, 8],
                               "data_offsets": [0, 2**48]}}, b"\0" * 16),
     r"tensor 't' of shape \[1099511627776, 8, 8\] F32 needs 281,474,976,710,656 bytes"),
    ("offsets past the data", _raw({"t": {"dtype": "F32", "shape": [4],
                                          "data_offsets": [0, 16]}}, b"\0" * 8), r"needs 16 bytes"),
    ("negative offsets", _raw({"t": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}},
                              b"\0" * 4), r"data_offsets \[-4, 0\] are not"),
    ("int dtype", _raw({"t": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
     r"dtype 'I64' is not one of"),
    ("bool shape", _raw({"t": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
                        b"\0" * 4), r"shape \[True\] is not a list of ints"),
    ("overlap", _raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
     r"do not tile"),
    ("trailing bytes", _raw({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                            b"\0" * 40), r"do not tile"),
    ("extra entry key", _raw({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4],
                                    "x": 1}}, b"\0" * 4), r"is not \{dtype, shape, data_offsets\}"),
]


@pytest.mark.parametrize("name,data,match", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_files_are_refused_in_bounded_memory_and_time(tmp_path, name, data, match):
    import time
    import tracemalloc

    p = _write(tmp_path, data)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(lx.io.AdapterFileError, match=rf"{p}: .*{match}"):
        lx.io.read_tensors(p)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 2.0
    assert peak < 10 * len(data) + 2**20, peak           # nothing sized by what a header claims


def _resigned(path, tmp_path, **meta_changes):
    """The adapter at ``path`` re-written with changed metadata (a valid digest): files that
    are well-formed safetensors but not a consistent adapter."""
    tensors, meta = lx.io.read_tensors(path)
    meta = {k: v for k, v in {**meta, **meta_changes}.items() if v is not None and k != "sha256"}
    return lx.io.save_tensors(tmp_path / "re.safetensors", dict(tensors), meta)


@pytest.mark.parametrize("changes,match", [
    (dict(format="loraxs-jax/bases-v2"), r"not a loraxs-jax adapter \(format='loraxs-jax/bases"),
    (dict(config=None), r"its metadata lacks \['config'\]"),
    (dict(config="{"), r"stored config is not a valid LoraXSConfig"),
    (dict(config=json.dumps({"targets": ["q/kernel$"], "rank": 2, "alpha": float("nan")})),
     r"alpha=nan: expected a finite number > 0"),
    (dict(config=json.dumps({"targets": ["q/kernel$"], "rank": 3, "trainable": ["^head/"]})),
     r"holds R of ranks \[2\], but its config gives ranks \[3\]"),
    (dict(config=json.dumps({"targets": ["q/kernel$"], "rank": 2})),
     r"tensor 'head/kernel' is neither an R nor"),
    (dict(adapted=json.dumps({"2": {"kernels": 5, "digest": "x"}})),
     r"tensor loraxs_R/r2 has shape \(2, 2, 2\); 5 kernels of rank 2 need"),
    (dict(adapted=json.dumps({"two": 1})), r"'adapted' metadata .* is not \{rank"),
])
def test_consistent_safetensors_that_are_not_consistent_adapters_are_refused(
        small_adapter, tmp_path, changes, match):
    base, path, _ = small_adapter
    bad = _resigned(path, tmp_path, **changes)
    with pytest.raises(lx.io.AdapterFileError, match=match):
        lx.load_adapter(bad, base)


def test_a_file_without_its_digest_is_refused_unless_it_predates_digests(small_adapter, tmp_path):
    import safetensors.numpy

    base, path, _ = small_adapter
    tensors, meta = lx.io.read_tensors(path)
    del meta["sha256"]
    p = _write(tmp_path, safetensors.numpy.save(dict(tensors), metadata=meta))
    with pytest.raises(lx.io.AdapterFileError, match="has no sha256 digest"):
        lx.io.adapter_info(p)
    v1 = _write(tmp_path, safetensors.numpy.save(
        dict(tensors), metadata={**meta, "format": "loraxs-jax/adapter-v1"}), "v1.safetensors")
    loaded = lx.load_adapter(v1, base)              # written before digests: still read
    assert np.array_equal(loaded["l1"]["q"]["kernel_loraxs_R"], tensors["loraxs_R/r2"][1])


def test_save_adapter_refuses_a_config_that_does_not_describe_the_params(tmp_path):
    """Row 9 of the reliability issue: params adapted at rank 4 saved with a rank-8 config wrote
    a file that load_adapter then refused."""
    p = _base(6, layers=2)
    ap4 = lx.apply(p, dataclasses.replace(CFG, rank=4), 0)
    with pytest.raises(ValueError, match=r"cfg does not describe these params \(4 kernels differ.*"
                                         r"layer_0/q/kernel: cfg gives R \(8, 8\), the params "
                                         r"hold \(4, 4\)"):
        lx.save_adapter(tmp_path / "a", ap4, CFG)
    assert not list(tmp_path.iterdir())


def test_nothing_non_finite_is_written(tmp_path):
    p = _base(7, layers=2)
    ap = lx.apply(p, CFG, 0)
    ap["layer_1"]["v"]["kernel_loraxs_R"] = ap["layer_1"]["v"]["kernel_loraxs_R"].at[0, 0].set(
        jnp.inf)
    with pytest.raises(ValueError, match=r"refusing to write .*a.safetensors: tensor "
                                         r"loraxs_R/r8 holds 1 NaN/Inf of 256 values"):
        lx.save_adapter(tmp_path / "a", ap, CFG)
    assert not list(tmp_path.iterdir())


def test_a_corrupted_bases_cache_is_refused_naming_it(tmp_path):
    p = _base(8, layers=2)
    path = lx.save_adapter(tmp_path / "a", _trained(p), CFG)
    cache = tmp_path / "cache"
    lx.load_adapter(path, p, bases_cache=cache)
    (file,) = cache.iterdir()
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(lx.io.AdapterFileError, match=rf"{file}: content does not match its sha256"):
        lx.load_adapter(path, p, bases_cache=cache)


def test_an_adapter_trained_on_another_version_of_its_svd_is_refused(tmp_path):
    """block_krylov's algorithm changed (version 2: other blocks, start and QR): an R trained
    against version-1 bases would meet other A and B on load, a silently wrong model. The file
    records the version; a file of another version, or one from before the tag was written
    (then block_krylov was version 1), is refused, while exact-SVD files of any age load."""
    rng = np.random.default_rng(13)
    base = {f"l{i}": {"q": {"kernel": jnp.asarray(rng.normal(size=(64, 48)), jnp.float32)}}
            for i in range(2)}
    kr = lx.LoraXSConfig(rank=4, targets=("q/kernel$",), svd_method="block_krylov")
    path = lx.save_adapter(tmp_path / "kr", lx.apply(base, kr, 3), kr)
    assert lx.io.adapter_info(path)["bases_algorithm"] == "block_krylov-2"
    lx.load_adapter(path, base)
    for tag in ("block_krylov-1", None):
        bad = _resigned(path, tmp_path, bases_algorithm=tag)
        with pytest.raises(ValueError, match=r"bases from the block_krylov-1 SVD .* computes "
                                             r"block_krylov-2: its R would meet other A and B"):
            lx.load_adapter(bad, base)
    ex = lx.LoraXSConfig(rank=4, targets=("q/kernel$",), svd_method="exact")
    old = _resigned(lx.save_adapter(tmp_path / "ex", lx.apply(base, ex, 3), ex), tmp_path,
                    bases_algorithm=None)
    lx.load_adapter(old, base)
