"""find_targets / compute_bases: the init variants against numpy, stacked and multi-axis kernels,
randomized SVD, bad targets, and bases of sharded kernels computed split over the mesh."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import loraxs_jax as lx
from loraxs_jax import parallel as sh
from loraxs_jax.models import decoder as dec

CFG = lx.LoraXSConfig(rank=4, alpha=8.0, targets=(r"(q|v|o)/kernel$",))


def test_svd_init_is_numpy_rank_r_approximation(small_params):
    p = small_params(1)
    ap = lx.apply(p, CFG, 0)
    for k in ("q", "v", "o"):
        w = np.asarray(p["layer"][k]["kernel"], np.float64)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        a, b = ap["layer"][k]["kernel_loraxs_A"], ap["layer"][k]["kernel_loraxs_B"]
        np.testing.assert_allclose(a @ b, (u[:, :4] * s[:4]) @ vt[:4], atol=1e-5)
        np.testing.assert_allclose(b @ b.T, np.eye(4), atol=1e-5)       # B = V_rᵀ orthonormal
        np.testing.assert_allclose(np.linalg.norm(a, axis=0), s[:4], rtol=1e-5)   # A = U_r Σ_r


@pytest.mark.parametrize("init", ["svd_no_sigma", "svd_bottom", "random", "svd_random"])
def test_init_variants(small_params, init):
    p = small_params(2)
    ap = lx.apply(p, lx.LoraXSConfig(rank=4, targets=("q/kernel$",), init=init), 0)
    w = np.asarray(p["layer"]["q"]["kernel"], np.float64)
    a = np.asarray(ap["layer"]["q"]["kernel_loraxs_A"], np.float64)
    b = np.asarray(ap["layer"]["q"]["kernel_loraxs_B"], np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    if init == "svd_no_sigma":
        np.testing.assert_allclose(a.T @ a, np.eye(4), atol=1e-5)       # A = U_r
        np.testing.assert_allclose(a * s[:4] @ b, (u[:, :4] * s[:4]) @ vt[:4], atol=1e-5)
    elif init == "svd_bottom":
        np.testing.assert_allclose(np.linalg.norm(a, axis=0), s[-4:], rtol=1e-5)
        np.testing.assert_allclose(a @ b, (u[:, -4:] * s[-4:]) @ vt[-4:], atol=1e-5)
    elif init == "random":   # Kaiming-uniform as torch nn.Linear: bounds 1/sqrt(fan_in)
        assert np.abs(a).max() <= 1 / math.sqrt(24) and np.abs(b).max() <= 1 / math.sqrt(4)
        assert np.abs(a).max() > 0.8 / math.sqrt(24) and a.std() > 0.1
        # random bases are not W's singular subspace
        assert np.linalg.svd(u[:, :4].T @ np.linalg.qr(a)[0], compute_uv=False).min() < 0.9
    else:  # svd_random: an orthonormal SVD basis, but of a random matrix, not of W
        np.testing.assert_allclose(b @ b.T, np.eye(4), atol=1e-5)
        an = a / np.linalg.norm(a, axis=0)
        np.testing.assert_allclose(an.T @ an, np.eye(4), atol=1e-5)
        assert np.linalg.svd(u[:, :4].T @ an, compute_uv=False).min() < 0.9
        assert 0.3 < np.linalg.norm(a, axis=0)[0] / s[0] < 3   # scaled like W


def test_per_target_rank_stacked_and_dense_general():
    rng = np.random.default_rng(4)
    p = {"attn": {"kernel": jnp.asarray(rng.normal(size=(16, 4, 8)), jnp.float32)},  # (in, H, D)
         "scan": {"mlp": {"kernel": jnp.asarray(rng.normal(size=(3, 16, 32)), jnp.float32)}}}
    cfg = lx.LoraXSConfig(rank={"attn": 4, "mlp": 6}, targets=("attn/kernel$", "mlp/kernel$"),
                          in_axes={"attn": 1}, stacked_axes={"scan/": 1})
    ap = lx.apply(p, cfg, 0)
    assert ap["attn"]["kernel_loraxs_A"].shape == (16, 4)
    assert ap["attn"]["kernel_loraxs_B"].shape == (4, 4, 8)
    assert ap["scan"]["mlp"]["kernel_loraxs_A"].shape == (3, 16, 6)
    assert ap["scan"]["mlp"]["kernel_loraxs_R"].shape == (3, 6, 6)
    assert lx.count(ap)["R"] == 16 + 3 * 36
    # each stacked matrix has its own SVD
    w = np.asarray(p["scan"]["mlp"]["kernel"])
    for i in range(3):
        u, s, vt = np.linalg.svd(w[i], full_matrices=False)
        ab = ap["scan"]["mlp"]["kernel_loraxs_A"][i] @ ap["scan"]["mlp"]["kernel_loraxs_B"][i]
        np.testing.assert_allclose(ab, (u[:, :6] * s[:6]) @ vt[:6], atol=1e-4)
    # the DenseGeneral kernel is the (16, 32) matrix
    u, s, vt = np.linalg.svd(np.asarray(p["attn"]["kernel"]).reshape(16, 32), full_matrices=False)
    ab = ap["attn"]["kernel_loraxs_A"] @ ap["attn"]["kernel_loraxs_B"].reshape(4, 32)
    np.testing.assert_allclose(ab, (u[:, :4] * s[:4]) @ vt[:4], atol=1e-4)


@pytest.mark.parametrize("method,options,tol", [("randomized", dict(power_iters=6), 1.02),
                                                 ("block_krylov", dict(krylov_iters=2), 1.001)])
def test_range_finder_methods_close_to_numpy_and_seeded(small_params, method, options, tol):
    p = small_params(5, {"q": (96, 64)})
    cfg = lx.LoraXSConfig(rank=8, targets=("q/kernel$",), svd_method=method, **options)
    rd = lx.apply(p, cfg, 0)["layer"]["q"]
    rd2 = lx.apply(p, cfg, 1)["layer"]["q"]
    assert np.array_equal(rd["kernel_loraxs_A"], rd2["kernel_loraxs_A"])  # bases ignore rng
    other = lx.apply(p, dataclasses.replace(cfg, bases_seed=1), 0)["layer"]["q"]
    assert not np.array_equal(rd["kernel_loraxs_A"], other["kernel_loraxs_A"])
    w = np.asarray(p["layer"]["q"]["kernel"], np.float64)
    s = np.linalg.svd(w, compute_uv=False)
    a, b = np.asarray(rd["kernel_loraxs_A"]), np.asarray(rd["kernel_loraxs_B"])
    assert np.linalg.norm(w - a @ b) < np.sqrt(np.sum(s[8:] ** 2)) * tol
    np.testing.assert_allclose(b @ b.T, np.eye(8), atol=1e-5)          # B = V_rᵀ orthonormal
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), s[:8], rtol=0.05)   # A = U_r Σ_r


def test_same_shaped_matrices_run_in_equal_chunks_of_one_program():
    """70 matrices with svd_batch=32: three chunks of 24 (the last padded by two copies), one
    compiled program; every matrix's bases are its own."""
    from loraxs_jax import bases

    rng = np.random.default_rng(11)
    p = {"stack": {"kernel": jnp.asarray(rng.normal(size=(70, 12, 10)), jnp.float32)}}
    cfg = lx.LoraXSConfig(rank=3, targets=("kernel$",), stacked_axes=1, svd_batch=32)
    before = bases.one_device_programs()
    a, b = bases.compute_bases(p, cfg)["stack/kernel"]
    assert bases.one_device_programs() - before == 1
    assert a.shape == (70, 12, 3) and b.shape == (70, 3, 10)
    for i in (0, 47, 48, 69):
        u, s, vt = np.linalg.svd(np.asarray(p["stack"]["kernel"][i], np.float64))
        np.testing.assert_allclose(a[i] @ b[i], (u[:, :3] * s[:3]) @ vt[:3], atol=1e-5)


@pytest.mark.parametrize("place", ["one device", "spread", "replicated"])
@pytest.mark.parametrize("method", ["block_krylov", "randomized"])
@pytest.mark.parametrize("stacked", [0, 1])
def test_cpu_steps_give_the_bits_of_one_matrix_at_a_time(method, stacked, place, monkeypatch):
    """Kernels on one CPU device, or replicated over a CPU mesh: the multi-pass SVDs run
    straight from the kernels in cache-sized steps (no group-wide copy): two matrices per call
    where the process has one CPU device (an odd count pads the last step), or one program per
    call over all of them (these tests run with 8) that gives each device its own matrix, from
    its own copy where the kernel is replicated. Every matrix must get exactly the bases it gets
    alone (as in the per-matrix loop of CPU meshes), in its kernel's own shape, on the first
    device."""
    from jax.sharding import NamedSharding, PartitionSpec

    from loraxs_jax import bases, svd

    home = jax.devices()[0]
    spread = place != "one device"
    if not spread:
        monkeypatch.setattr(bases, "step_devices", lambda home: [home])
    spread_on = []
    spread_program = bases.spread_program
    monkeypatch.setattr(bases, "spread_program", lambda *a: lambda x, *b: spread_on.append(
        x.sharding.device_set) or spread_program(*a)(x, *b))
    rng = np.random.default_rng(12)
    shape = (5, 40, 30) if stacked else (40, 30)
    p = {k: {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32)} for k in "abc"}
    cfg = lx.LoraXSConfig(rank=4, targets=("kernel$",), stacked_axes=stacked, svd_method=method,
                          krylov_iters=2, power_iters=3)
    targets = bases.find_targets(p, cfg)
    if place == "replicated":
        mesh = jax.make_mesh((jax.device_count(),), ("data",))
        p = jax.device_put(p, NamedSharding(mesh, PartitionSpec()))
        put = jax.device_put
        monkeypatch.setattr(jax, "device_put", lambda x, *a, **k: pytest.fail(
            "a replicated kernel's matrix was copied to another device")
            if a and isinstance(a[0], jax.Device) and getattr(x, "shape", ())[-2:] == shape[-2:]
            else put(x, *a, **k))
    got = bases.compute_bases(p, cfg)
    monkeypatch.undo()
    count = 3 * (5 if stacked else 1)
    cpus = jax.local_devices(backend="cpu")
    if spread:
        assert len(spread_on) == -(-count // len(cpus))
        assert all(on == set(cpus) for on in spread_on)
    else:
        assert not spread_on
    base_key = jax.random.key(cfg.bases_seed)
    for t in targets:
        mats = t.geometry.matrices(p[t.name[0]]["kernel"])
        ga, gb = got[t.name]
        assert ga.devices() == gb.devices() == {home}
        assert ga.shape == shape[:-1] + (4,) and gb.shape == shape[:-2] + (4, 30)
        ga, gb = np.asarray(ga).reshape(-1, 40, 4), np.asarray(gb).reshape(-1, 4, 30)
        for i in range(t.count):          # each matrix alone, with its own key
            u, s, vt = svd.truncated_svd(
                mats[i], 4, method=method, key=jax.random.fold_in(bases.path_key(base_key, t.name), i),
                krylov_iters=2, power_iters=3)
            np.testing.assert_array_equal(ga[i], u * s)
            np.testing.assert_array_equal(gb[i], vt)


@pytest.mark.parametrize("bad,match", [
    (dict(rank=20), r"rank 20 exceeds min\(in, out\)=16 for layer/q/kernel"),
    (dict(targets=("nope/kernel$",)), r"matched no kernel.*layer/q/kernel"),
    (dict(targets=("q/kernel$", "zzz")), r"target patterns \['zzz'\] matched no kernel"),
    (dict(targets=("q/bias",)), r"matched only 1-D params"),
])
def test_bad_input_names_the_culprit(small_params, bad, match):
    kw = dict(rank=4, targets=("q/kernel$",)) | bad
    with pytest.raises(ValueError, match=match):
        lx.apply(small_params(), lx.LoraXSConfig(**kw), 0)


@pytest.mark.parametrize("init, method, atol", [("svd", "exact", 1e-6),
                                                ("svd_no_sigma", "randomized", 1e-4),
                                                ("svd_random", "exact", 1e-4)])
def test_bases_of_sharded_kernels_are_computed_split_over_the_mesh(init, method, atol,
                                                                  tiny_decoder, mesh_of):
    """On a mesh, every device decomposes whole matrices of its own (the SVD batch is split
    over all 8 devices, padded when it does not divide); A and B equal the one-device bases."""
    from loraxs_jax import bases

    cfg = dataclasses.replace(tiny_decoder.config, scan_layers=False, num_layers=3)
    lora = lx.LoraXSConfig(rank=4, targets=tiny_decoder.lora.targets, init=init, svd_method=method)
    base = dec.init_params(cfg, jax.random.key(6))
    want = bases.compute_bases(base, lora)
    mesh = mesh_of((2, 2, 2))
    placed = sh.shard_params(base, sh.param_shardings(base, dec.param_logical_axes(cfg), mesh))
    before = bases.bases_program.cache_info()
    got = bases.compute_bases(placed, lora)
    after = bases.bases_program.cache_info()
    # one call per shape group: q,k,v,o 32x32; gate,up 32x64; down 64x32
    assert after.hits + after.misses - before.hits - before.misses == 3
    split = P(("data", "fsdp", "tensor"), None, None)
    assert bases.matrix_batch_sharding(placed["lm_head"]["kernel"]).spec == split
    assert bases.matrix_batch_sharding(base["lm_head"]["kernel"]) is None  # one device
    for name, (a, b) in want.items():
        np.testing.assert_allclose(np.asarray(got[name][0]), np.asarray(a), atol=atol, err_msg=name)
        np.testing.assert_allclose(np.asarray(got[name][1]), np.asarray(b), atol=atol, err_msg=name)


def test_matrix_batch_reshard_moves_one_axis_at_a_time(mesh_of):
    from jax.sharding import NamedSharding

    from loraxs_jax import bases

    mesh = mesh_of((2, 2, 2))
    x = np.arange(8 * 4 * 8, dtype=np.float32).reshape(8, 4, 8)
    for spec, want in [(P(None, "fsdp", "tensor"), P(("data", "fsdp", "tensor"), None, None)),
                       (P(None, None, ("tensor", "fsdp")), P(("data", "tensor", "fsdp"), None, None)),
                       (P(), P(("data", "fsdp", "tensor"), None, None)),
                       (P("data", None, "tensor"), P(("data", "fsdp", "tensor"), None, None))]:
        got = bases.to_matrix_batch(jax.device_put(x, NamedSharding(mesh, spec)))
        assert got.sharding.spec == want, spec
        assert got.addressable_shards[0].data.shape == (1, 4, 8)     # whole matrices
        np.testing.assert_array_equal(np.asarray(got), x)


_TWO_DEVICE_BASES = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import loraxs_jax as lx
from loraxs_jax.bases import compute_bases
params = {"l": {"q": {"kernel": jnp.asarray(
    np.random.default_rng(0).standard_normal((8, 256, 256)), jnp.float32)}}}
for method in ("block_krylov", "randomized", "exact"):
    cfg = lx.LoraXSConfig(rank=32, targets=(r"kernel$",), stacked_axes=1, svd_method=method)
    want = compute_bases(params, cfg)["l/q/kernel"]
    # replicated kernels (the CPU step path for the multi-pass methods) and kernels whose rows
    # are split (the mesh path: Auto axes move whole matrices to each device, Explicit gather)
    for kind in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((2,), ("data",), axis_types=(kind,))
        for spec in (P(), P(None, None, "data")):
            placed = jax.device_put(params, NamedSharding(mesh, spec))
            got = compute_bases(placed, cfg)["l/q/kernel"]
            for g, w in zip(got, want):      # the same program per matrix: the same bits
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
print("done")
"""


def test_bases_on_two_cpu_devices_finish_and_match_one_device():
    """Batched LAPACK calls (QR, eigh, SVD) run on two CPU devices at once deadlocked jaxlib
    0.10's thread pool on a 2-core host: every pool thread waited on a batch piece that no
    thread was free to run, and compute_bases of mesh-placed kernels hung for ever. On CPU
    meshes the bases are now decomposed one matrix at a time per device; this runs the mesh
    paths in a fresh process with exactly 2 devices (the failing case) under a timeout."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    try:
        out = subprocess.run([sys.executable, "-c", _TWO_DEVICE_BASES], env=env, timeout=120,
                             capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail("compute_bases on 2 CPU devices hung (LAPACK thread-pool deadlock)")
    assert out.returncode == 0 and out.stdout.strip().endswith("done"), out.stderr[-3000:]


def test_lapack_runs_on_one_thread_while_cpu_bases_are_computed(monkeypatch):
    """jaxlib's CPU LAPACK (scipy's OpenBLAS) defaults to a thread per core, whose small calls
    then fight XLA's own threads (SmolLM2's block-Krylov bases: 1.39 s against 0.78 s). The limit
    must reach that library even in a fresh process, where jaxlib only loads it at its first
    call (threadpoolctl limits only what is loaded), be lifted afterwards, and hold while
    ``compute_bases`` runs its CPU programs."""
    import json
    import subprocess
    import sys

    code = """if True:
        import json, jax.numpy as jnp
        from threadpoolctl import threadpool_info
        from loraxs_jax.bases import lapack_one_thread
        blas = lambda: {i["filepath"]: i["num_threads"] for i in threadpool_info()
                        if i["user_api"] == "blas"}
        before = blas()
        with lapack_one_thread():
            jnp.linalg.eigh(jnp.eye(3))[0].block_until_ready()     # jaxlib's first LAPACK call
            inside = blas()
        print(json.dumps([before, inside, blas()]))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, inside, after = json.loads(out.stdout.strip().splitlines()[-1])
    loaded = set(inside) - set(before)
    assert loaded and all(n == 1 for n in inside.values())          # jaxlib's library included
    assert {k: after[k] for k in before} == before                   # lifted afterwards
    from loraxs_jax import bases

    entered = []
    real = bases.lapack_one_thread
    monkeypatch.setattr(bases, "lapack_one_thread", lambda active=True: entered.append(active)
                        or real(active))
    p = {"q": {"kernel": jnp.asarray(np.random.default_rng(3).normal(size=(12, 10)), jnp.float32)}}
    bases.compute_bases(p, lx.LoraXSConfig(rank=2, targets=("kernel$",)))
    assert entered == [True]
