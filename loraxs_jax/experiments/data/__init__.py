"""Tasks of the paper (GLUE, commonsense, math): offline-safe loading, prompts, tokenization,
resumable batching and metrics. Everything returns ``datasets.Dataset`` or numpy arrays."""

from loraxs_jax.experiments.data.batching import Batches, bucketed_plan, shuffled_plan
from loraxs_jax.experiments.data.commonsense import (
    COMMONSENSE_TASKS,
    EVAL_SPLIT,
    commonsense_accuracy,
    commonsense_prompt,
    commonsense_train_mixture,
    load_commonsense,
    load_commonsense_eval,
    load_llm_adapters_json,
)
from loraxs_jax.experiments.data.glue import (
    GLUE_TASKS,
    glue_batches,
    load_glue,
    sst2_train_from_vader,
    tokenize_glue,
    tokenize_pairs,
)
from loraxs_jax.experiments.data.lm import (
    IGNORE,
    LMExamples,
    collate_lm,
    generation_batch,
    lm_batches,
    tokenize_lm,
)
from loraxs_jax.experiments.data.math import (
    METAMATH_PROMPT,
    gsm_symbolic_train,
    load_gsm8k_test,
    load_math_test,
    load_metamathqa,
    math_prompt,
)
from loraxs_jax.experiments.data.metrics import (
    accuracy,
    extract_commonsense_answer,
    extract_gsm8k_answer,
    extract_math_answer,
    f1_score,
    glue_metrics,
    gsm8k_equal,
    math_equal,
    matthews_corrcoef,
    normalize_math_answer,
    pearson,
    spearman,
)

__all__ = [
    "Batches", "bucketed_plan", "shuffled_plan",
    "COMMONSENSE_TASKS", "EVAL_SPLIT", "commonsense_accuracy", "commonsense_prompt",
    "commonsense_train_mixture", "load_commonsense", "load_commonsense_eval",
    "load_llm_adapters_json",
    "GLUE_TASKS", "glue_batches", "load_glue", "sst2_train_from_vader", "tokenize_glue",
    "tokenize_pairs",
    "IGNORE", "LMExamples", "collate_lm", "generation_batch", "lm_batches", "tokenize_lm",
    "METAMATH_PROMPT", "gsm_symbolic_train", "load_gsm8k_test", "load_math_test",
    "load_metamathqa", "math_prompt",
    "accuracy", "extract_commonsense_answer", "extract_gsm8k_answer", "extract_math_answer",
    "f1_score", "glue_metrics", "gsm8k_equal", "math_equal", "matthews_corrcoef",
    "normalize_math_answer", "pearson", "spearman",
]  # fmt: skip
