"""Evaluation, generation and merge jitted with explicit shardings on 8 virtual CPU devices
equal their single-device results and place their outputs where they promise."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import loraxs_jax as lx
from experiment import classifier_predict_fn
from loraxs_jax import sharding as sh
from loraxs_jax.models import decoder as dec
from loraxs_jax.models import encoder as enc
from loraxs_jax.models.generate import generate
from loraxs_jax.transform import flatten, path_str

MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]

ENC = enc.EncoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64, max_positions=24, num_labels=3)
ENC_LORA = lx.LoraXSConfig(rank=4, alpha=8.0, r_std=0.3, targets=enc.PAPER_TARGETS)
DEC = dec.DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=4, head_dim=8, scan_layers=True)
DEC_LORA = lx.LoraXSConfig(rank=4, alpha=8.0, r_std=0.3, stacked_axes=1,
                           targets=(r"(q|k|v|o|gate|up|down)_proj/kernel$",))
ENC_APPLY = lx.wrap(enc.Encoder(ENC).apply)     # one object each: compile caches hit
DEC_APPLY = lx.wrap(dec.DecoderForCausalLM(DEC).apply)


def mesh_of(shape):
    return sh.make_mesh(dict(zip(sh.MESH_AXES, shape)))


def place(params, base_shardings):
    shardings = sh.adapted_shardings(params, base_shardings)
    return sh.shard_params(params, shardings), shardings


@pytest.fixture(scope="module")
def encoder_params():
    # Large random kernels and R so predictions spread over the three classes.
    base = jax.tree.map(lambda x: 6 * x if x.ndim == 2 else x,
                        enc.init_encoder(ENC, jax.random.key(0)))
    return lx.apply(base, ENC_LORA, jax.random.key(1))


@pytest.fixture(scope="module")
def decoder_params():
    base = jax.tree.map(lambda x: 8 * x if x.ndim >= 2 else x,
                        dec.init_params(DEC, jax.random.key(2)))
    return lx.apply(base, DEC_LORA, jax.random.key(3))


def glue_batch(rows):
    rng = np.random.default_rng(0)
    mask = (np.arange(16)[None] < rng.integers(4, 17, (rows, 1))).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(2, ENC.vocab_size, (rows, 16)), 0).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
            "labels": np.zeros(rows, np.int32)}


@pytest.mark.parametrize("shape", MESHES)
def test_eval_predictions_on_a_mesh_equal_single_device(encoder_params, shape):
    # 13 rows: no mesh below divides it, so the sharded path pads and drops the extra rows
    batch = glue_batch(13)
    want = np.asarray(classifier_predict_fn(ENC_APPLY, 3)(encoder_params, batch))
    assert len(set(want.tolist())) > 1   # the comparison is not between constant outputs
    mesh = mesh_of(shape)
    base_sh = sh.param_shardings(enc.init_encoder(ENC, jax.random.key(0)),
                                 enc.param_logical_axes(ENC), mesh)
    params, shardings = place(encoder_params, base_sh)
    predict = classifier_predict_fn(ENC_APPLY, 3, mesh, shardings)
    got = predict(params, batch)
    np.testing.assert_array_equal(np.asarray(got), want)
    # the jitted program itself: batch split along data+fsdp on the way in, replicated out
    padded, n = sh.pad_rows({k: v for k, v in batch.items() if k != "labels"},
                            sh.batch_ways(mesh))
    assert n == 13 and padded["input_ids"].shape[0] % sh.batch_ways(mesh) == 0
    placed = sh.shard_batch(padded, mesh)
    assert placed["input_ids"].sharding.spec == P(("data", "fsdp"))
    out = predict.jitted(params, placed)
    assert out.sharding.is_fully_replicated and out.shape == (padded["input_ids"].shape[0],)


def prompts(rows):
    rng = np.random.default_rng(1)
    starts = rng.integers(0, 5, rows)
    mask = (np.arange(8)[None] >= starts[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(3, DEC.vocab_size, (rows, 8)), 0).astype(np.int32)
    return ids, mask


@pytest.mark.parametrize("shape", MESHES)
def test_generation_on_a_mesh_equals_single_device(decoder_params, shape):
    ids, mask = prompts(8)
    want = np.asarray(generate(DEC_APPLY, decoder_params, DEC, ids, mask, 6, eos_token_id=1))
    assert len({tuple(r) for r in want.tolist()}) > 1
    mesh = mesh_of(shape)
    base_sh = sh.param_shardings(dec.param_shapes(DEC), dec.param_logical_axes(DEC), mesh)
    params, shardings = place(decoder_params, base_sh)
    got = generate(DEC_APPLY, params, DEC, ids, mask, 6, eos_token_id=1, mesh=mesh,
                   param_shardings=shardings)
    assert got.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(got), want)


def test_generation_on_a_mesh_checks_its_inputs(decoder_params):
    mesh = mesh_of((8, 1, 1))
    ids, mask = prompts(6)
    with pytest.raises(ValueError, match=r"global batch size 6 .* data\*fsdp = 8\*1 = 8"):
        generate(DEC_APPLY, decoder_params, DEC, ids, mask, 2, mesh=mesh,
                 param_shardings=jax.tree.map(lambda _: sh.replicated(mesh), decoder_params))
    with pytest.raises(ValueError, match="both mesh and param_shardings"):
        generate(DEC_APPLY, decoder_params, DEC, ids, mask, 2, mesh=mesh)


def test_merge_into_another_mesh_layout(decoder_params):
    """Adapted params sharded on (2,2,2); the merge writes the kernels straight into the
    (1,8,1) layout of a serving mesh over the same devices."""
    train_mesh, serve_mesh = mesh_of((2, 2, 2)), mesh_of((1, 8, 1))
    shapes, axes = dec.param_shapes(DEC), dec.param_logical_axes(DEC)
    params, _ = place(decoder_params, sh.param_shardings(shapes, axes, train_mesh))
    serve_sh = sh.param_shardings(shapes, axes, serve_mesh)
    merged = lx.merge(params, out_shardings=serve_sh)
    plain = flatten(lx.merge(jax.device_get(decoder_params)))
    want_sh = flatten(serve_sh)
    q = ("model", "layers", "self_attn", "q_proj", "kernel")
    assert want_sh[q].spec == P(None, "fsdp", "tensor")     # tensor has size 1 here
    assert merged["model"]["layers"]["self_attn"]["q_proj"]["kernel"].addressable_shards[
        0].data.shape == (2, 32 // 8, 32)
    for path, leaf in flatten(merged).items():
        assert leaf.sharding == want_sh[path], path_str(path)
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(plain[path]), rtol=1e-6,
                                   atol=1e-6, err_msg=path_str(path))
    # the merged tree runs as a plain model and agrees with the adapted one
    ids, mask = prompts(8)
    adapted_out = generate(DEC_APPLY, decoder_params, DEC, ids, mask, 4)
    merged_out = generate(dec.DecoderForCausalLM(DEC).apply, jax.device_get(merged), DEC, ids,
                          mask, 4)
    np.testing.assert_array_equal(np.asarray(merged_out), np.asarray(adapted_out))


def test_merge_out_shardings_errors(decoder_params):
    mesh = mesh_of((2, 2, 2))
    shapes, axes = dec.param_shapes(DEC), dec.param_logical_axes(DEC)
    base_sh = sh.param_shardings(shapes, axes, mesh)
    params, _ = place(decoder_params, base_sh)
    partial = {k: v for k, v in base_sh.items() if k != "lm_head"}
    with pytest.raises(ValueError, match=r"out_shardings has no entry for \['lm_head/kernel'\]"):
        lx.merge(params, out_shardings=partial)
    # host params: merged on one device, then placed in the requested layout
    merged = flatten(lx.merge(jax.device_get(decoder_params), out_shardings=base_sh))
    assert all(merged[p].sharding == s for p, s in flatten(base_sh).items())


def test_unscanned_decoder_merge_keeps_each_kernels_sharding():
    cfg = dataclasses.replace(DEC, scan_layers=False)
    lora = dataclasses.replace(DEC_LORA, stacked_axes=0)
    mesh = mesh_of((1, 4, 2))
    base = dec.init_params(cfg, jax.random.key(4))
    base_sh = sh.param_shardings(base, dec.param_logical_axes(cfg), mesh)
    params, _ = place(lx.apply(base, lora, jax.random.key(5)), base_sh)
    merged = flatten(lx.merge(params, donate=True))
    for path, s in flatten(base_sh).items():
        assert merged[path].sharding.is_equivalent_to(s, merged[path].ndim), path_str(path)
    o = ("model", "layers_0", "self_attn", "o_proj", "kernel")
    assert merged[o].sharding.spec == P("tensor", "fsdp")


@pytest.mark.parametrize("init, method, atol", [("svd", "exact", 1e-6),
                                                ("svd_no_sigma", "randomized", 1e-4),
                                                ("svd_random", "exact", 1e-4)])
def test_bases_of_sharded_kernels_are_computed_split_over_the_mesh(init, method, atol):
    """On a mesh, every device decomposes whole matrices of its own (the SVD batch is split
    over all 8 devices, padded when it does not divide); A and B equal the one-device bases."""
    from loraxs_jax import transform

    cfg = dataclasses.replace(DEC, scan_layers=False, num_layers=3)
    lora = lx.LoraXSConfig(rank=4, targets=DEC_LORA.targets, init=init, svd_method=method)
    base = dec.init_params(cfg, jax.random.key(6))
    want = transform.compute_bases(base, lora)
    mesh = mesh_of((2, 2, 2))
    placed = sh.shard_params(base, sh.param_shardings(base, dec.param_logical_axes(cfg), mesh))
    before = transform._bases_program.cache_info()
    got = transform.compute_bases(placed, lora)
    after = transform._bases_program.cache_info()
    # one call per shape group: q,k,v,o 32x32; gate,up 32x64; down 64x32
    assert after.hits + after.misses - before.hits - before.misses == 3
    split = P(("data", "fsdp", "tensor"), None, None)
    assert transform._matrix_batch_sharding(placed["lm_head"]["kernel"]).spec == split
    assert transform._matrix_batch_sharding(base["lm_head"]["kernel"]) is None  # one device
    for name, (a, b) in want.items():
        np.testing.assert_allclose(np.asarray(got[name][0]), np.asarray(a), atol=atol, err_msg=name)
        np.testing.assert_allclose(np.asarray(got[name][1]), np.asarray(b), atol=atol, err_msg=name)


def test_matrix_batch_reshard_moves_one_axis_at_a_time():
    from jax.sharding import NamedSharding

    from loraxs_jax import transform

    mesh = mesh_of((2, 2, 2))
    x = np.arange(8 * 4 * 8, dtype=np.float32).reshape(8, 4, 8)
    for spec, want in [(P(None, "fsdp", "tensor"), P(("data", "fsdp", "tensor"), None, None)),
                       (P(None, None, ("tensor", "fsdp")), P(("data", "tensor", "fsdp"), None, None)),
                       (P(), P(("data", "fsdp", "tensor"), None, None)),
                       (P("data", None, "tensor"), P(("data", "fsdp", "tensor"), None, None))]:
        got = transform._to_matrix_batch(jax.device_put(x, NamedSharding(mesh, spec)))
        assert got.sharding.spec == want, spec
        assert got.addressable_shards[0].data.shape == (1, 4, 8)     # whole matrices
        np.testing.assert_array_equal(np.asarray(got), x)
