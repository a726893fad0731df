"""GLUE tasks: sharded predictions on meshes equal the single-device ones."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import loraxs_jax as lx
from loraxs_jax import parallel as sh
from loraxs_jax.experiments.tasks import classifier_predict_fn
from loraxs_jax.models import encoder as enc

MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]


ENC = enc.EncoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64, max_positions=24, num_labels=3)


ENC_LORA = lx.LoraXSConfig(rank=4, alpha=8.0, r_std=0.3, targets=enc.PAPER_TARGETS)


ENC_APPLY = lx.wrap(enc.Encoder(ENC).apply)     # one object each: compile caches hit


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


def test_train_limit_draws_a_stratified_seeded_subset(tiny_config, tiny_bert):
    """Row 4 of the reliability issue: train_limit=320 took the first 320 rows of SST-2's train
    set, 310 positive and 10 negative."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from loraxs_jax.experiments.tasks import GlueTask

    model = SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(str(tiny_bert)))
    task = GlueTask(tiny_config(tiny_bert, **{"task.train_limit": 320}), model)
    labels = task.train_arrays["labels"]
    assert task.num_train == len(labels) == 320
    assert abs(int(labels.sum()) - 320 * 4824 / 9749) <= 1          # 4,824 of 9,749 positive
    other = GlueTask(tiny_config(tiny_bert, **{"task.train_limit": 320, "seed": 1}), model)
    assert not np.array_equal(task.train_arrays["input_ids"], other.train_arrays["input_ids"])
