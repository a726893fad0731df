"""The decoder family against transformers' PyTorch implementations, and the HF loader."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from loraxs_jax.models import presets as configs
from loraxs_jax.models.decoder import (
    DecoderConfig,
    DecoderForCausalLM,
    load_decoder,
    param_logical_axes,
    param_shapes,
)

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _hf_config(family):
    import transformers as t

    return {
        "llama2": lambda: t.LlamaConfig(**COMMON, rms_norm_eps=1e-5),
        # original context 16 puts the head_dim-8 frequencies in all three llama3 bands.
        "llama3": lambda: t.LlamaConfig(**COMMON, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        "mistral": lambda: t.MistralConfig(**COMMON, sliding_window=3),
        "qwen2": lambda: t.Qwen2Config(**COMMON),
        "gemma": lambda: t.GemmaConfig(**{**COMMON, "head_dim": 12}),
    }[family]()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (folder, torch model): a tiny random model saved as safetensors."""
    import torch
    import transformers as t

    made = {}

    def make(family):
        if family not in made:
            torch.manual_seed(0)
            model = t.AutoModelForCausalLM.from_config(_hf_config(family)).eval()
            with torch.no_grad():  # move norms/biases off their 1/0 init so they are tested
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            folder = tmp_path_factory.mktemp(family)
            model.save_pretrained(folder, safe_serialization=True)
            made[family] = (folder, model)
        return made[family]

    return make


def _batch():
    ids = np.random.RandomState(0).randint(0, VOCAB, (2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[1, :3] = 0  # left padding
    return ids, mask


def _torch_logits(model, ids, mask):
    import torch

    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.numpy()


def _logits(config, params, ids, mask):
    return np.asarray(DecoderForCausalLM(config).apply({"params": params}, ids, mask),
                      np.float32)


@pytest.mark.parametrize("family", ["llama2", "llama3", "mistral", "qwen2", "gemma"])
def test_logits_match_transformers(checkpoints, family):
    folder, model = checkpoints(family)
    ids, mask = _batch()
    config, params = load_decoder(folder)
    ref = _torch_logits(model, ids, mask)
    real = mask.astype(bool)
    diff = np.abs(_logits(config, params, ids, mask) - ref)[real].max()
    assert diff <= 1e-4, f"{family}: max |Δlogit| {diff}"
    # The family switch under test matters: turning it off breaks parity.
    switch = {"llama3": dict(rope_type="default"), "mistral": dict(sliding_window=None),
              "qwen2": None, "gemma": dict(norm_plus_one=False), "llama2": None}[family]
    if switch:
        import dataclasses

        off = _logits(dataclasses.replace(config, **switch), params, ids, mask)
        assert np.abs(off - ref)[real].max() > 1e-3


def test_config_from_hf_reads_family_switches():
    c = DecoderConfig.from_hf(_hf_config("gemma"))
    assert (c.head_dim, c.norm_plus_one, c.scale_embeddings, c.tie_word_embeddings,
            c.hidden_act) == (12, True, True, True, "gelu_pytorch_tanh")
    c = DecoderConfig.from_hf(_hf_config("llama3"))
    assert (c.rope_type, c.rope_theta, c.rope_factor, c.rope_original_max_position) == (
        "llama3", 500000.0, 8.0, 16)
    assert DecoderConfig.from_hf(_hf_config("qwen2")).qkv_bias
    assert DecoderConfig.from_hf(_hf_config("mistral")).sliding_window == 3


def test_scan_remat_and_bf16_match_plain(checkpoints):
    folder, _ = checkpoints("llama2")
    ids, mask = _batch()
    config, params = load_decoder(folder)
    want = _logits(config, params, ids, mask)
    scfg, sparams = load_decoder(folder, scan_layers=True, remat="dots_saveable")
    q = sparams["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(q[1], params["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"])
    assert np.abs(_logits(scfg, sparams, ids, mask) - want).max() <= 1e-5
    bcfg, bparams = load_decoder(folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert bparams["model"]["norm"]["weight"].dtype == jnp.bfloat16
    bf16 = _logits(bcfg, bparams, ids, mask)
    assert 0 < np.abs(bf16 - want)[mask.astype(bool)].max() < 0.1


def test_param_paths_and_logical_axes():
    c = DecoderConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=4)
    params = param_shapes(c)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for _, x in leaves)  # plain, not boxed
    paths = {"/".join(k.key for k in p) for p, _ in leaves}
    assert {"model/embed_tokens/embedding", "model/layers_1/self_attn/k_proj/kernel",
            "model/layers_0/mlp/down_proj/kernel", "model/layers_0/input_layernorm/weight",
            "model/norm/weight", "lm_head/kernel"} <= paths
    assert params["model"]["layers_0"]["self_attn"]["k_proj"]["kernel"].shape == (8, 4)
    axes = param_logical_axes(c)
    assert axes["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"] == ("embed", "heads")
    assert axes["model"]["layers_0"]["mlp"]["down_proj"]["kernel"] == ("mlp", "embed")
    assert axes["lm_head"]["kernel"] == ("embed", "vocab")
    import dataclasses

    scanned = param_logical_axes(dataclasses.replace(c, scan_layers=True))
    assert scanned["model"]["layers"]["self_attn"]["k_proj"]["kernel"] == ("layers", "embed", "kv")


def test_paper_configs_have_published_sizes():
    counts = {name: sum(x.size for x in jax.tree.leaves(
        param_shapes(DecoderConfig.from_hf(make(), scan_layers=True))))
        for name, make in configs.PAPER_CONFIGS.items()}
    assert counts == {"llama2-7b": 6_738_415_616, "llama3-8b": 8_030_261_248,
                      "mistral-7b": 7_241_732_096, "gemma-7b": 8_537_680_896}


def test_sharding_callable_places_every_tensor(checkpoints):
    folder, _ = checkpoints("qwen2")
    dev = jax.devices()[-1]
    seen = []

    def place(path):
        seen.append(path)
        return jax.sharding.SingleDeviceSharding(dev)

    _, params = load_decoder(folder, sharding=place)
    leaves = jax.tree.leaves(params)
    assert len(seen) == len(leaves) and "model/layers_1/self_attn/q_proj/bias" in seen
    assert all(x.devices() == {dev} for x in leaves)


def _copy_checkpoint(src, dst, edit):
    tensors = dict(load_file(src / "model.safetensors"))
    edit(tensors)
    dst.mkdir()
    save_file(tensors, dst / "model.safetensors")
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_loader_names_missing_unexpected_and_misshapen_tensors(checkpoints, tmp_path):
    folder, _ = checkpoints("llama2")

    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((5, 32), np.float32)
        t["model.layers.0.extra.weight"] = np.zeros(3, np.float32)

    bad = _copy_checkpoint(folder, tmp_path / "bad", edit)
    with pytest.raises(ValueError) as e:
        load_decoder(bad)
    msg = str(e.value)
    assert "missing tensors (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "model.layers.0.self_attn.k_proj.weight: checkpoint (5, 32), expected (16, 32)" in msg
    assert "unexpected tensors (1): model.layers.0.extra.weight" in msg


def test_loader_refuses_unsupported_model_type(checkpoints, tmp_path):
    folder, _ = checkpoints("llama2")
    other = _copy_checkpoint(folder, tmp_path / "gpt2", lambda t: None)
    cfg = json.loads((folder / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2",
                                                   "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        load_decoder(other)
