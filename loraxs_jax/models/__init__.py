"""Our Flax implementations of the paper's model families, and loaders for real checkpoints.

* ``encoder``: BERT / RoBERTa with classification and regression heads (``load_encoder``).
* ``decoder``: Llama-2/3, Mistral, Qwen2, Gemma causal LMs (``load_decoder``).
* ``gguf``: Llama-architecture GGUF files with their tokenizer (``load_gguf``).
* ``generate``: batched KV-cache generation (``generate``).
* ``configs``: the paper's 7B/8B configs, built without a hub.
* ``checkpoint``: memory-mapped safetensors reading of Hugging Face folders.
"""

from loraxs_jax.models.decoder import DecoderConfig, DecoderForCausalLM, load_decoder
from loraxs_jax.models.encoder import Encoder, EncoderConfig, load_encoder
from loraxs_jax.models.generate import generate
from loraxs_jax.models.gguf import load_gguf

__all__ = ["DecoderConfig", "DecoderForCausalLM", "Encoder", "EncoderConfig", "generate",
           "load_decoder", "load_encoder", "load_gguf"]
