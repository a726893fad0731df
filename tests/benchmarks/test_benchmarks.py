"""The benchmarks at smoke size, so they cannot rot: outputs well-formed and sane (never
wall-clock assertions), and the LoRA baseline and the safetensors sizing against independent
computations."""

import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save as safetensors_bytes

import loraxs_jax
from benchmarks import bench_adapter_size, common, run_all


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    old = os.environ.get("LORAXS_BENCH_RESULTS")
    os.environ["LORAXS_BENCH_RESULTS"] = str(out)
    try:
        results = run_all.run(smoke=True)
    finally:
        if old is None:
            del os.environ["LORAXS_BENCH_RESULTS"]
        else:
            os.environ["LORAXS_BENCH_RESULTS"] = old
    return out / "smoke", results


def _finite_positive(x):
    return math.isfinite(x) and x > 0


def test_every_benchmark_writes_json_and_markdown(smoke):
    folder, results = smoke
    assert set(results) == set(run_all.BENCHMARKS)
    for name in run_all.BENCHMARKS:
        data = json.loads((folder / f"{name}.json").read_text())
        assert data["benchmark"] == name and data["smoke"] is True
        assert {"date_utc", "cpu", "jax", "backend"} <= set(data["machine"])
        md = (folder / f"{name}.md").read_text()
        assert md.startswith(f"# {name}") and "| " in md
    readme = (folder / "README.md").read_text()
    assert "## Headline" in readme and "LoRA-XS / floor" in readme


def test_train_step_sane(smoke):
    for r in smoke[1]["train_step"]["models"].values():
        m = r["methods"]
        assert set(m) == set(common.METHODS)
        for d in m.values():
            assert _finite_positive(d["median_s"]) and _finite_positive(d["flops"])
            assert d["peak_bytes"] > 0 and len(d["times_s"]) >= 1
        assert m["floor"]["trainable_params"] == 0
        assert m["loraxs"]["trainable_params"] < m["lora"]["trainable_params"]
        assert m["lora"]["trainable_params"] < m["full"]["trainable_params"]
        assert m["loraxs"]["trainable_params"] % (r["rank"] ** 2) == 0
        assert m["loraxs"]["flops"] < m["full"]["flops"]
        assert m["loraxs"]["peak_bytes"] < m["full"]["peak_bytes"]
        assert r["ratios"]["loraxs/full"]["flops"] < 1


def test_svd_init_sane(smoke):
    r = smoke[1]["svd_init"]
    methods = ("exact", "randomized", "block_krylov", "sklearn")
    for model in r["models"].values():
        for shape in model["per_shape"].values():
            for method in methods:
                d = shape[method]
                assert 0 <= d["rel_frob_error"] <= 1
                assert d["error_vs_exact"] >= 1 - 1e-5         # Eckart–Young: exact is optimal
                assert 0 <= d["max_angle_left_deg"] <= 90 and 0 <= d["max_angle_right_deg"] <= 90
                assert len(d["times_s"]) == 3 and _finite_positive(d["run_s"])
            assert shape["exact"]["error_vs_exact"] < 1 + 1e-5
            assert shape["exact"]["max_angle_left_deg"] < 1
        wm = model["whole_model"]
        for method in methods:
            assert _finite_positive(wm[method]["first_call_s"])
            assert 1 - 1e-5 <= wm[method]["error_ratio_mean"] <= wm[method]["error_ratio_max"]
            assert wm[method]["sklearn_over_this"]["warm_s"] == pytest.approx(
                wm["sklearn"]["warm_s"] / wm[method]["warm_s"])
        assert wm["exact"]["error_ratio_max"] < 1 + 1e-5
    ml = r["mistral_7b_layer"]
    assert set(ml["layer_s"]) == set(methods) and ml["sklearn_over_this"]["sklearn"] == 1
    ep = r["demo_epoch"]
    assert ep["steps_per_epoch"] == math.ceil(9700 / 32)
    assert all(_finite_positive(v) for v in ep["init_over_epoch"].values())


def test_adapter_size_sane(smoke):
    models = smoke[1]["adapter_size"]["models"]
    for rows in models.values():
        for x in rows:
            assert x["trainable"] == x["matrices"] * x["rank"] ** 2
            assert x["r2_count_4"] == x["trainable"] * 4
            assert 8 < x["header_bytes"] < 64 * 1024 and x["header_bytes"] % 8 == 0
            assert x["lora_bytes"] > x["file_bytes"] and x["official_ABR_bytes"] > x["lora_bytes"]
    mistral = next(v for k, v in models.items() if k.startswith("Mistral"))[0]
    assert mistral["trainable"] == 2 * 7 * 64 ** 2      # 2 of 32 layers (full size: 0.92M)
    roberta = next(v for k, v in models.items() if k.startswith("RoBERTa"))[0]
    assert roberta["matrices"] == 24 * 4                            # q, v, attn out, FFN out


def test_adapter_file_is_r2_count_4_plus_header(tmp_path):
    s = common.llama_small(True)
    cfg = s.loraxs_config(4)
    sizes = bench_adapter_size.our_adapter_bytes(
        jax.eval_shape(lambda: s.params), cfg, tmp_path)
    data = (tmp_path / "r4.safetensors").read_bytes()
    (head_len,) = struct.unpack("<Q", data[:8])
    assert len(data) == 8 + head_len + 7 * 16 * 4 == sizes["file_bytes"]
    # and the real thing, written from concrete adapted params, has the same size
    real = loraxs_jax.save_adapter(tmp_path / "real", loraxs_jax.apply(s.params, cfg, 0), cfg,
                                   base_fingerprint="0" * 32)
    assert real.stat().st_size == len(data)


def test_safetensors_size_matches_writer():
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.standard_normal(tuple(rng.integers(1, 9, size=i % 3 + 1)))
               .astype(np.float32) for i in range(7)}
    specs = {k: (v.shape, v.dtype) for k, v in tensors.items()}
    meta = {"format": "pt"}
    assert bench_adapter_size.safetensors_size(specs, meta) == len(safetensors_bytes(tensors, metadata=meta))


def test_lora_specs_size_a_real_lora_file():
    s = common.llama_small(True)
    cfg = s.loraxs_config(4)
    lora = common.lora_apply(s.params, s.targets, 4, 8.0)
    trainable, _ = common.lora_split(lora)
    flat = {"/".join(p): np.asarray(v) for p, v in
            loraxs_jax.tree.flatten(trainable).items()}
    assert len(flat) == 2 * 7
    written = len(safetensors_bytes(flat, metadata={"format": "pt"}))
    sized = bench_adapter_size.safetensors_size(
        {k: (v.shape, v.dtype) for k, v in flat.items()}, {"format": "pt"})
    payload = sum(v.nbytes for v in flat.values())
    by_shapes = bench_adapter_size.lora_specs(s.params, cfg)
    assert sum(math.prod(sh) * 4 for sh, _ in by_shapes.values()) == payload
    assert written == sized


def test_merge_sane(smoke):
    for e in smoke[1]["merge"]["eval"].values():
        assert e["max_abs_diff_merged_vs_unmerged"] < 1e-3
        assert e["max_abs_diff_merged_vs_base"] > 0                 # the merge did something
        assert e["flops"]["merged"] == e["flops"]["base"] < e["flops"]["unmerged"]
        assert e["merge"]["matrices"] == 7


def test_scaling_sane(smoke):
    pts = smoke[1]["scaling"]["by_rank"]
    assert [p["rank"] for p in pts] == sorted(p["rank"] for p in pts)
    for p in pts:
        assert p["trainable"] == 7 * p["rank"] ** 2 and p["flops_ratio"] > 0.5
    assert pts[-1]["flops_ratio"] > pts[0]["flops_ratio"]
    assert smoke[1]["scaling"]["by_seq"]


def test_serving_sane(smoke):
    for r in smoke[1]["serving"]["models"].values():
        tp = r["throughput"]
        assert {"merged", "unmerged-1", "bank-1", "bank-16"} <= set(tp["median_s"])
        assert all(_finite_positive(v) for v in tp["rows_per_s"].values())
        mem = r["memory"]               # one slot holds R (r² per matrix, float32) and the head
        assert mem["bytes_per_adapter"] == mem["r2_matrices_4"] + mem["head_bytes"]
        assert mem["state_bytes_per_slot"] == mem["bytes_per_adapter"]
        assert mem["file_bytes"] > mem["r2_matrices_4"]
        assert r["load_file_s"]["p50"] > 0
        s = r["store"]
        assert s["adapters"] > 16 and s["row_bytes"] == mem["bytes_per_adapter"]
        assert 0 < s["cold_one_s"]["p50"] <= s["cold_one_s"]["p99"]
        assert s["million"]["store_bytes"] == s["row_bytes"] * 10**6


def test_million_sane(smoke):
    """The store benchmark at smoke size: every adapter registered, its row r² x matrices x 4
    bytes, the memory map on disk, cold adapters servable, both batches timed."""
    m = smoke[1]["million"]
    assert m["adapters"] == 3_000 and m["row_bytes"] == m["matrices"] * m["rank"] ** 2 * 4
    assert m["store_bytes"] >= m["adapters"] * m["row_bytes"]
    assert m["file_bytes"] > m["row_bytes"]
    assert 0 < m["cold_one_s"]["p50"] <= m["cold_one_s"]["p99"] and m["cold_one_s"]["n"] == 200
    assert _finite_positive(m["batch"]["cold_rows_per_s"])
    assert _finite_positive(m["batch"]["resident_rows_per_s"])
    rss = m["rss"]["after_serving"]
    assert rss["total"] > 0 and rss["anon"] + rss["file"] <= rss["total"] + 2**20


def test_lora_baseline_against_numpy():
    s = common.llama_small(True)
    lora = common.lora_apply(s.params, s.targets, 4, 8.0, 0)
    ids = s.batch["input_ids"]
    plain_fwd, lora_fwd = jax.jit(s.model.apply), jax.jit(common.lora_wrap(s.model.apply))
    base = np.asarray(plain_fwd({"params": s.params}, ids))
    np.testing.assert_allclose(np.asarray(lora_fwd({"params": lora}, ids)), base,
                               atol=1e-6)                             # B = 0: LoRA starts at W
    flat = loraxs_jax.tree.flatten(lora)
    rng = np.random.default_rng(1)
    merged = {}
    for p, v in list(flat.items()):
        if p[-1] == "kernel_lora_B":
            b = rng.standard_normal(v.shape).astype(np.float32) * 0.05
            flat[p] = jnp.asarray(b)
            a = np.asarray(flat[(*p[:-1], "kernel_lora_A")])
            w = np.asarray(flat[(*p[:-1], "kernel")])
            merged[(*p[:-1], "kernel")] = w + (8.0 / 4) * a @ b    # W + (α/r)·A·B in numpy
    plain = {p: v for p, v in flat.items() if "_lora_" not in p[-1]}
    plain.update(merged)
    want = plain_fwd({"params": loraxs_jax.tree.unflatten(plain, {})}, ids)
    got = lora_fwd({"params": loraxs_jax.tree.unflatten(flat, {})}, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4, rtol=2e-4)
    with pytest.raises(ValueError, match="matched no 2-D kernel"):
        common.lora_apply(s.params, ("nothing_here",), 4, 8.0)


def test_vs_torch_sane(tmp_path, monkeypatch):
    """bench_vs_torch at smoke size: ours and torch side by side on a tiny BERT, every method,
    finite positive times and ratios (the reference extra, torch, is installed by make test)."""
    pytest.importorskip("torch")
    from benchmarks import bench_vs_torch

    monkeypatch.setenv("LORAXS_BENCH_RESULTS", str(tmp_path))
    r = bench_vs_torch.run(smoke=True)
    methods = r["result"]["methods"]
    assert set(methods) == set(bench_vs_torch.METHODS)
    for d in methods.values():
        assert _finite_positive(d["ours_median_s"]) and _finite_positive(d["torch_median_s"])
        assert _finite_positive(d["ratio"]) and len(d["ours_times_s"]) == len(d["torch_times_s"])
    data = json.loads((tmp_path / "smoke" / "vs_torch.json").read_text())
    assert data["benchmark"] == "vs_torch" and data["smoke"] is True
    assert (tmp_path / "smoke" / "vs_torch.md").read_text().startswith("# vs_torch")
