"""Moving adapters to and from PyTorch: PEFT/vLLM LoRA folders, Hugging Face model folders,
llama.cpp GGUF files, and official LoRA-XS checkpoints.

* ``export_peft``: a LoRA-XS adapter as a standard PEFT LoRA (lora_A = (A·R)ᵀ, lora_B = Bᵀ).
"""

from loraxs_jax.interop.peft import export_peft

__all__ = ["export_peft"]
