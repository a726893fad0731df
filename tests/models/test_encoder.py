"""Encoder family: logit parity with transformers (PyTorch), real MiniLM weights, loader errors,
scan/remat/bf16/dropout, sharded loading, logical axes and LoRA-XS on the paper's targets."""

import dataclasses
import functools
import json
import logging
import re
import shutil
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import loraxs_jax
from loraxs_jax.models.encoder import (
    PAPER_TARGETS,
    Encoder,
    EncoderConfig,
    SelfAttention,
    init_encoder,
    load_encoder,
    param_logical_axes,
    roberta_base_config,
    roberta_large_config,
)
from loraxs_jax.models.hub import HFFolder

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64)
# Two sequences, the second right-padded (BERT pad 0, RoBERTa pad 1).
LENGTHS = np.array([7, 4])
MASK = (np.arange(7)[None] < LENGTHS[:, None]).astype(np.int32)


def _ids(pad: int) -> np.ndarray:
    ids = np.random.default_rng(0).integers(3, 99, size=(2, 7))
    return np.where(MASK == 1, ids, pad)


def _save_torch(kind: str, num_labels: int, folder) -> None:
    """A tiny transformers model with every weight randomised (LayerNorms too, so a wrong
    scale/bias mapping shows) saved as safetensors."""
    import torch
    import transformers

    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(**TINY, num_labels=num_labels)
        model = transformers.BertForSequenceClassification(cfg)
    else:
        cfg = transformers.RobertaConfig(**TINY, type_vocab_size=1, pad_token_id=1,
                                         num_labels=num_labels)
        model = transformers.RobertaForSequenceClassification(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("LayerNorm.weight") else 0))
    model.save_pretrained(folder, safe_serialization=True)


def _torch_outputs(kind: str, folder, ids, token_types):
    import torch
    import transformers

    cls = (transformers.BertForSequenceClassification if kind == "bert"
           else transformers.RobertaForSequenceClassification)
    model = cls.from_pretrained(folder).eval()
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(MASK))
    if token_types is not None:
        kwargs["token_type_ids"] = torch.tensor(token_types)
    with torch.no_grad():
        out = model(**kwargs, output_hidden_states=True)
    return out.logits.numpy(), out.hidden_states[-1].numpy()


@functools.cache
def _jit(config, method=None):
    """Encoder(config).apply, jitted once per (config, method) for all tests."""
    return jax.jit(partial(Encoder(config).apply, method=method))


def _abstract(config):
    return jax.eval_shape(partial(init_encoder, config), jax.random.key(0))


CASES = [("bert", 2), ("bert", 1), ("roberta", 2), ("roberta", 1)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{(kind, num_labels): folder} of tiny saved transformers models."""
    out = {}
    for kind, labels in CASES:
        folder = tmp_path_factory.mktemp(f"{kind}{labels}")
        _save_torch(kind, labels, folder)
        out[kind, labels] = folder
    return out


def _inputs(kind):
    ids = _ids(0 if kind == "bert" else 1)
    token_types = np.repeat((np.arange(7)[None] >= 3).astype(np.int32), 2, axis=0)
    return ids, (token_types if kind == "bert" else None)


@pytest.mark.parametrize("kind,num_labels", CASES)
def test_logits_and_hidden_states_match_transformers(checkpoints, kind, num_labels):
    folder = checkpoints[kind, num_labels]
    ids, token_types = _inputs(kind)
    ref_logits, ref_hidden = _torch_outputs(kind, folder, ids, token_types)
    config, params = load_encoder(folder, num_labels=num_labels)
    both = _jit(config, lambda model, *args: (model(*args), model.encode(*args)))
    logits, hidden = both({"params": params}, ids, MASK, token_types)
    assert logits.shape == (2, num_labels) and logits.dtype == jnp.float32
    assert np.abs(ref_logits).max() > 0.1  # a real signal, not near-zero logits
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(hidden), ref_hidden, atol=1e-4, rtol=0)


def test_scan_remat_and_bf16_agree_with_the_plain_model(checkpoints):
    folder = checkpoints["roberta", 2]
    ids, _ = _inputs("roberta")
    config, params = load_encoder(folder)
    plain = _jit(config)({"params": params}, ids, MASK)

    s_config, s_params = load_encoder(folder, scan_layers=True, remat=True)
    assert s_params["encoder"]["layer"]["attention"]["self"]["query"]["kernel"].shape == (2, 32, 32)
    np.testing.assert_array_equal(
        s_params["encoder"]["layer"]["output"]["dense"]["kernel"][1],
        params["encoder"]["layer"]["1"]["output"]["dense"]["kernel"])
    s_run = _jit(s_config)
    np.testing.assert_allclose(s_run({"params": s_params}, ids, MASK), plain, atol=1e-5)

    # Gradients through scan + remat against a central difference along a random direction.
    def loss(p):
        return jnp.sum(s_run({"params": p}, ids, MASK) ** 2)

    grad = jax.jit(jax.grad(loss))(s_params)
    rng = np.random.default_rng(0)
    direction = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), s_params)
    eps = 1e-3

    def shifted(t):  # shift on the host: no per-leaf op compiles
        return float(loss(jax.tree.map(lambda p, d: np.asarray(p) + t * d, s_params, direction)))

    numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(
        jax.tree.leaves(grad), jax.tree.leaves(direction), strict=True))
    assert abs(analytic) > 1.0
    np.testing.assert_allclose(analytic, numeric, rtol=5e-3)

    b_config, b_params = load_encoder(folder, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(b_params)} == {jnp.dtype(jnp.bfloat16)}
    low = _jit(b_config)({"params": b_params}, ids, MASK)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, plain, atol=0.05 * np.abs(plain).max())


def test_dropout_is_active_only_when_not_deterministic(checkpoints):
    config, params = load_encoder(checkpoints["bert", 2], scan_layers=True)  # faster compiles
    ids, _ = _inputs("bert")
    base = _jit(config)({"params": params}, ids, MASK)

    # rbg keys: threefry dropout masks take several times longer to compile on CPU.
    key = partial(jax.random.key, impl="rbg")
    dropped = jax.jit(lambda rng: Encoder(config).apply(
        {"params": params}, ids, MASK, deterministic=False, rngs={"dropout": rng}))
    a, a2, b = dropped(key(1)), dropped(key(1)), dropped(key(2))
    np.testing.assert_array_equal(a, a2)
    assert np.abs(a - b).max() > 1e-3 and np.abs(a - base).max() > 1e-3

    # The spelled-out attention (taken whenever attention dropout is drawn) equals
    # jax.nn.dot_product_attention, padding mask included, at a rate too small to drop anything.
    attn = SelfAttention(dataclasses.replace(config, attention_dropout=1e-12,
                                             initializer_range=0.5))
    x, mask = jax.random.normal(key(3), (2, 7, 32)), MASK.astype(bool)
    p = attn.init(key(4), x, mask, True)
    fast = attn.apply(p, x, mask, True)
    spelled = attn.apply(p, x, mask, False, rngs={"dropout": key(5)})
    np.testing.assert_allclose(spelled, fast, atol=1e-5)
    masked_keys = x.at[1, 4:].set(100.0)  # padding keys must not matter
    np.testing.assert_allclose(attn.apply(p, masked_keys, mask, False,
                                          rngs={"dropout": key(5)})[1, :4],
                               fast[1, :4], atol=1e-5)


def test_minilm_mean_embeddings_match_sentence_transformers_reference():
    import torch
    import transformers
    from tokenizers import Tokenizer

    from loraxs_jax.experiments.assets import asset_path

    folder = asset_path("minilm", fetch=True)
    sentences = ["A man is playing a guitar.", "A man plays the guitar.",
                 "The stock market fell sharply today."]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    enc = tok.encode_batch(sentences)
    ids = np.array([e.ids for e in enc])
    mask = np.array([e.attention_mask for e in enc])
    assert mask.min() == 0  # padding is exercised

    config, params = load_encoder(folder, head="mean", num_labels=3)
    emb = _jit(config, method=Encoder.embed)({"params": params}, ids, mask)
    emb = np.asarray(emb / jnp.linalg.norm(emb, axis=-1, keepdims=True))

    ref_model = transformers.BertModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        h = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))[0].numpy()
    m = mask[..., None].astype(np.float32)
    ref = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)  # sentence-transformers mean pooling
    ref /= np.linalg.norm(ref, axis=-1, keepdims=True)  # and its Normalize module
    np.testing.assert_allclose(emb, ref, atol=1e-4, rtol=0)

    cos = emb @ emb.T
    assert cos[0, 1] > 0.7, cos
    assert abs(cos[0, 2]) < 0.2 and abs(cos[1, 2]) < 0.2, cos


def test_missing_head_is_initialised_and_logged(checkpoints, tmp_path, caplog):
    folder = checkpoints["bert", 2]
    _, ref = load_encoder(folder)

    def drop_head(tensors):
        for k in [k for k in tensors if k.startswith(("bert.pooler.", "classifier."))]:
            del tensors[k]

    _rewrite(folder, tmp_path / "body", drop_head)  # like a saved BertModel without pooler
    with caplog.at_level(logging.INFO, logger="loraxs_jax.models.encoder"):
        _, params = load_encoder(tmp_path / "body", rng=jax.random.key(7))
    (record,) = [r for r in caplog.records if "freshly initialised" in r.getMessage()]
    assert record.levelno == logging.WARNING  # not asked for: say it loudly
    assert "pooler/dense/kernel" in record.getMessage()
    assert "classifier/kernel" in record.getMessage()
    assert 0.015 < float(jnp.std(params["pooler"]["dense"]["kernel"])) < 0.025  # N(0, 0.02²)
    np.testing.assert_array_equal(params["encoder"]["layer"]["1"]["output"]["dense"]["kernel"],
                                  ref["encoder"]["layer"]["1"]["output"]["dense"]["kernel"])

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="loraxs_jax.models.encoder"):
        _, params = load_encoder(folder, head="mean", num_labels=3)
    (record,) = [r for r in caplog.records if "freshly initialised" in r.getMessage()]
    assert record.levelno == logging.INFO and "classifier/kernel" in record.getMessage()
    assert "bert.pooler.dense.weight" in caplog.text  # unused by the mean head, and said so
    assert "pooler" not in params and params["classifier"]["kernel"].shape == (32, 3)

    # A 2-label head cannot serve 3 labels unless asked to start the head afresh.
    with pytest.raises(ValueError, match=r"classifier\.weight: checkpoint \(2, 32\)"):
        load_encoder(folder, num_labels=3)
    _, fresh = load_encoder(folder, num_labels=3, fresh_head=True)
    assert fresh["classifier"]["kernel"].shape == (32, 3)
    np.testing.assert_array_equal(fresh["pooler"]["dense"]["kernel"],
                                  ref["pooler"]["dense"]["kernel"])


def _rewrite(src, dst, change) -> None:
    from safetensors.numpy import save_file

    shutil.copytree(src, dst)
    ckpt = HFFolder(src)
    tensors = {k: np.array(v) for k, v in ckpt.items()}
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"))


def test_loader_errors_name_the_tensors(checkpoints, tmp_path):
    src = checkpoints["roberta", 2]
    query = "roberta.encoder.layer.1.attention.self.query.weight"

    _rewrite(src, tmp_path / "missing", lambda t: t.pop(query))
    with pytest.raises(ValueError, match=re.escape(
            f"1 missing tensors:\n  {query} (for encoder/layer/1/attention/self/query/kernel)")):
        load_encoder(tmp_path / "missing")

    def reshape(t):
        t["roberta.encoder.layer.0.output.dense.weight"] = np.zeros((32, 36), np.float32)
        t["roberta.encoder.layer.9.output.dense.weight"] = np.zeros((32, 37), np.float32)

    _rewrite(src, tmp_path / "shape", reshape)
    with pytest.raises(ValueError) as err:
        load_encoder(tmp_path / "shape")
    msg = str(err.value)
    assert ("roberta.encoder.layer.0.output.dense.weight: checkpoint (32, 36) (as "
            "encoder/layer/0/output/dense/kernel: (36, 32)), model wants (37, 32)") in msg
    assert "1 unexpected tensors:\n  roberta.encoder.layer.9.output.dense.weight" in msg

    (tmp_path / "other").mkdir()
    shutil.copy(src / "model.safetensors", tmp_path / "other")
    config = json.loads((src / "config.json").read_text())
    (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported.*bert, roberta"):
        load_encoder(tmp_path / "other")


def test_sharded_loading_places_each_tensor(checkpoints):
    folder = checkpoints["roberta", 2]
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("model",))
    seen = []

    def sharding(path: str):
        seen.append(path)
        spec = PartitionSpec(None, "model") if path.endswith("query/kernel") else PartitionSpec()
        return NamedSharding(mesh, spec)

    config, params = load_encoder(folder, sharding=sharding, scan_layers=True)
    flat = {"/".join(str(k.key) for k in p): x
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert sorted(seen) == sorted(flat)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params, is_leaf=_boxed))
    q = flat["encoder/layer/attention/self/query/kernel"]
    assert q.sharding == NamedSharding(mesh, PartitionSpec(None, "model"))
    ids, _ = _inputs("roberta")
    plain_config, plain = load_encoder(folder)
    np.testing.assert_allclose(_jit(config)({"params": params}, ids, MASK),
                               _jit(plain_config)({"params": plain}, ids, MASK), atol=1e-5)


def _boxed(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _paths(tree) -> list[str]:
    return ["/".join(str(k.key) for k in p)
            for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_paper_configs_have_hf_names_and_shapes():
    """Every tensor of transformers' RobertaForSequenceClassification (built on the meta device,
    no memory) has our counterpart with the transposed-Linear shape, and vice versa."""
    import torch
    import transformers

    config = roberta_large_config()
    hf = transformers.RobertaConfig(
        vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
        layer_norm_eps=1e-5)
    assert EncoderConfig.from_hf(hf) == config
    with torch.device("meta"):
        ref = transformers.RobertaForSequenceClassification(hf)
    ref_shapes = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    ours = _abstract(config)
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
    mapped = {}
    for path, x in zip(_paths(ours), jax.tree.leaves(ours), strict=True):
        *mods, name = path.split("/")
        torch_name = ".".join(mods + [leaf[name]])
        if mods[0] != "classifier":
            torch_name = "roberta." + torch_name
        mapped[torch_name] = x.shape[::-1] if name == "kernel" else x.shape
    assert mapped == ref_shapes
    assert sum(np.prod(s) for s in mapped.values()) == 355_361_794

    base = _abstract(roberta_base_config(num_labels=1))
    assert sum(x.size for x in jax.tree.leaves(base)) == 124_646_401


def test_paths_logical_axes_and_paper_targets():
    config = EncoderConfig(vocab_size=50, hidden_size=16, num_layers=3, num_heads=2,
                           intermediate_size=24, max_positions=20, num_labels=2)
    paths = _paths(_abstract(config))
    targets = [p for p in paths if any(re.search(t, p) for t in PAPER_TARGETS)]
    assert targets == [f"encoder/layer/{i}/{m}/kernel" for i in range(3) for m in (
        "attention/output/dense", "attention/self/query", "attention/self/value", "output/dense")]
    assert "pooler/dense/kernel" in paths and "classifier/kernel" in paths
    assert "embeddings/token_type_embeddings/embedding" in paths

    axes = param_logical_axes(config)
    layer = axes["encoder"]["layer"]["0"]
    assert layer["attention"]["self"]["query"]["kernel"] == PartitionSpec("embed", "heads")
    assert layer["attention"]["output"]["dense"]["kernel"] == PartitionSpec("heads", "embed")
    assert layer["intermediate"]["dense"]["kernel"] == PartitionSpec("embed", "mlp")
    assert layer["output"]["LayerNorm"]["scale"] == PartitionSpec("embed")
    assert axes["embeddings"]["word_embeddings"]["embedding"] == PartitionSpec("vocab", "embed")
    scanned = param_logical_axes(dataclasses.replace(config, scan_layers=True))
    assert scanned["encoder"]["layer"]["output"]["dense"]["kernel"] == PartitionSpec(
        "layers", "mlp", "embed")


@pytest.mark.parametrize("scan,remat", [(False, True), (True, False)])
def test_loraxs_adapts_the_paper_targets_through_dense_interception(checkpoints, scan, remat):
    folder = checkpoints["roberta", 2]
    config, params = load_encoder(folder, scan_layers=scan, remat=remat)
    lcfg = loraxs_jax.LoraXSConfig(rank=4, alpha=16, targets=PAPER_TARGETS, r_std=0.05,
                                   stacked_axes=1 if scan else 0)
    adapted = loraxs_jax.apply(params, lcfg, jax.random.key(0))
    assert loraxs_jax.count(adapted)["adapted_matrices"] == 4 * config.num_layers
    ids, _ = _inputs("roberta")
    run = _jit(config)
    out = jax.jit(loraxs_jax.wrap(Encoder(config).apply))({"params": adapted}, ids, MASK)
    merged = run({"params": loraxs_jax.merge(adapted)}, ids, MASK)
    base = run({"params": params}, ids, MASK)
    assert np.abs(out - base).max() > 1e-3  # the adapters do act
    np.testing.assert_allclose(out, merged, atol=1e-4)
