"""Moving adapters to and from PyTorch: PEFT/vLLM LoRA folders, Hugging Face model folders,
llama.cpp GGUF files, and official LoRA-XS checkpoints.

* ``export_peft``: a LoRA-XS adapter as a standard PEFT LoRA (lora_A = (A·R)ᵀ, lora_B = Bᵀ).
* ``export_hf``: a merged model as a transformers folder (safetensors, config.json, tokenizer).
* ``export_gguf``: a merged Llama-family model as a llama.cpp GGUF file.
* ``import_official``: a checkpoint of the official LoRA-XS code as our adapted tree (A, B
  from the file, R = latentᵀ), optionally saved as our adapter plus a bases cache.
"""

from loraxs_jax.interop.gguf import export_gguf
from loraxs_jax.interop.hf import export_hf
from loraxs_jax.interop.official import import_official
from loraxs_jax.interop.peft import export_peft

__all__ = ["export_gguf", "export_hf", "export_peft", "import_official"]
