"""Tiny random transformers models of every family we load, and forwards on both sides (logits
as float32 numpy); the fixtures that build them are in conftest.py."""

import numpy as np

import loraxs_jax as lx
from loraxs_jax.models import decoder, encoder

FAMILIES = ("bert", "roberta", "llama", "mistral", "qwen2", "gemma")
VOCAB = 97
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64)
# two rows; the second right-padded (encoders) -- decoders run unpadded
IDS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 9))
MASK = (np.arange(9)[None] < np.array([9, 6])[:, None]).astype(np.int64)


def hf_config(fam):
    import transformers as t

    return {
        "bert": lambda: t.BertConfig(**SMALL, num_labels=3),
        "roberta": lambda: t.RobertaConfig(**{**SMALL, "max_position_embeddings": 66},
                                           type_vocab_size=1, pad_token_id=1, num_labels=3),
        "llama": lambda: t.LlamaConfig(**SMALL, num_key_value_heads=2, rms_norm_eps=1e-5),
        "mistral": lambda: t.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=4),
        "qwen2": lambda: t.Qwen2Config(**SMALL, num_key_value_heads=2),
        "gemma": lambda: t.GemmaConfig(**SMALL, num_key_value_heads=2, head_dim=12),
    }[fam]()


def is_encoder(fam):
    return fam in encoder.SUPPORTED_MODEL_TYPES


def torch_class(fam):
    import transformers as t

    return (t.AutoModelForSequenceClassification if is_encoder(fam)
            else t.AutoModelForCausalLM)


def torch_logits(model, fam):
    import torch

    mask = MASK if is_encoder(fam) else np.ones_like(MASK)
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(mask)
                     ).logits.float().numpy()


def our_logits(config, params):
    """Our forward, through ``lx.wrap``: plain (merged) or adapted params."""
    if isinstance(config, encoder.EncoderConfig):
        return np.asarray(lx.wrap(encoder.Encoder(config).apply)({"params": params}, IDS, MASK),
                          np.float32)
    return np.asarray(lx.wrap(decoder.DecoderForCausalLM(config).apply)(
        {"params": params}, IDS, np.ones_like(MASK)), np.float32)


def real_diff(a, b, fam):
    """max |a - b| over the real tokens."""
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d.max() if is_encoder(fam) else d[np.ones_like(MASK, bool)].max())


def load_ours(folder, fam, **over):
    if is_encoder(fam):
        return encoder.load_encoder(folder, num_labels=3, **over)
    return decoder.load_decoder(folder, **over)


def lora_config(fam, rank=4, **over):
    """The paper's targets for the family, R large enough to move logits, the head trainable."""
    if is_encoder(fam):
        return lx.LoraXSConfig(rank=rank, alpha=8.0, r_std=0.5, targets=encoder.PAPER_TARGETS,
                               trainable=(r"^classifier/",), **over)
    return lx.LoraXSConfig(rank=rank, alpha=8.0, r_std=0.5, targets=decoder.PAPER_TARGETS, **over)
