"""Tiny random transformers models of every family we load, and forwards on both sides (logits
as float32 numpy); the fixtures that build them are in conftest.py."""

import json

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
    """Our forward: through ``lx.wrap`` for adapted params, plain for merged ones."""
    model = encoder.Encoder(config) if isinstance(config, encoder.EncoderConfig) else (
        decoder.DecoderForCausalLM(config))
    apply = lx.wrap(model.apply) if lx.tree.is_adapted(params) else model.apply
    mask = MASK if isinstance(config, encoder.EncoderConfig) else np.ones_like(MASK)
    return np.asarray(apply({"params": params}, IDS, mask), np.float32)


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


def write_official(model, folder, targets, rank, alpha, task_type, head=None, seed=0):
    """Write ``model``'s LoRA-XS adapter as their code saves it and give ``model`` their forward
    (``base(x) + lora_B(latent(lora_A(x))) * lora_alpha / r``, utils/latent_utils.py). A = U_rΣ_r
    and B = V_rᵀ of the weight, turned by a random orthogonal r×r matrix (their randomized SVD
    is not ours); the latent (Rᵀ) random; ``head`` names modules saved whole (GLUE)."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or not any(
                name == t or name.endswith("." + t) for t in targets):
            continue
        u, s, vh = torch.linalg.svd(mod.weight.detach().double().T, full_matrices=False)
        q, _ = torch.linalg.qr(torch.randn(rank, rank, generator=gen, dtype=torch.float64))
        a_w = ((u[:, :rank] * s[:rank]) @ q).T.float().contiguous()        # (r, in)
        b_w = (q.T @ vh[:rank]).T.float().contiguous()                      # (out, r)
        latent = (0.5 * torch.randn(rank, rank, generator=gen)).contiguous()
        key = f"base_model.model.{name}"
        tensors.update({f"{key}.lora_A.weight": a_w, f"{key}.lora_B.weight": b_w,
                        f"{key}_lora_latent_mapping.weight": latent})
        mod.forward = (lambda x, base=mod.forward, a=a_w, b=b_w, lat=latent:
                       base(x) + F.linear(F.linear(F.linear(x, a), lat), b) * (alpha / rank))
    for module in head or ():
        with torch.no_grad():
            for pname, p in model.get_submodule(module).named_parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
                tensors[f"base_model.model.{module}.{pname}"] = p.detach().clone()
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": task_type, "r": rank, "lora_alpha": alpha,
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "fan_in_fan_out": False,
        "inference_mode": True, "peft_version": "0.10.0"}))
    return folder


GLUE_TARGETS = ["query", "value", "attention.output.dense", "output.dense"]   # main_glue.py
MATH_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# fam -> (targets, rank, alpha, task type, head): the official GLUE and math setups
OFFICIAL_CASES = {
    "roberta": (GLUE_TARGETS, 4, 16, "SEQ_CLS", ["classifier"]),
    "llama": (MATH_TARGETS, 6, 6, "CAUSAL_LM", None),
}


def byte_bpe(folder):
    """A tiny GPT-2-style byte-level BPE tokenizer saved by transformers (256 bytes, 3 merges,
    one special token)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(folder)
    return len(vocab) + 1
