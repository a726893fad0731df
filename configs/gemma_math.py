"""Table 3: Gemma-7B + LoRA-XS on MetaMathQA, evaluated on GSM8K and MATH (same recipe as
configs/mistral_math.py; rank 64 trains 802,816 parameters)."""

from configs.mistral_math import math_config


def get_config(arg: str = ""):
    return math_config("google/gemma-7b", arg, source="configs/gemma_math.py")
