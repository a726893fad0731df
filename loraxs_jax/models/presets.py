"""The paper's decoder architectures as transformers configs, written out so no hub is needed.

Numbers are those of the released checkpoints' ``config.json``. Use them for shapes, memory and
sharding plans (``DecoderConfig.from_hf(llama2_7b())`` with ``param_shapes``) or to build a model
whose weights come from elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable


def llama2_7b():
    """meta-llama/Llama-2-7b-hf: 6.74B params."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def llama3_8b():
    """meta-llama/Meta-Llama-3-8B: 8.03B params, GQA with 8 KV heads, rope base 500000."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                       bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False)


def mistral_7b():
    """mistralai/Mistral-7B-v0.1: 7.24B params, GQA with 8 KV heads, 4096-token sliding window."""
    from transformers import MistralConfig

    return MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         sliding_window=4096, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)


def gemma_7b():
    """google/gemma-7b: 8.54B params, head_dim 256 (16 heads x 256 != hidden 3072), GeGLU, tied."""
    from transformers import GemmaConfig

    return GemmaConfig(vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                       head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       hidden_act="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1,
                       pad_token_id=0, tie_word_embeddings=True)


PAPER_CONFIGS: dict[str, Callable] = {
    "llama2-7b": llama2_7b,
    "llama3-8b": llama3_8b,
    "mistral-7b": mistral_7b,
    "gemma-7b": gemma_7b,
}

# Hub ids of the paper's models -> the presets above (so planning a run needs no hub).
HUB_IDS = {"mistralai/Mistral-7B-v0.1": "mistral-7b", "meta-llama/Llama-2-7b-hf": "llama2-7b",
           "meta-llama/Meta-Llama-3-8B": "llama3-8b", "google/gemma-7b": "gemma-7b"}
