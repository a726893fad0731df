"""A LoRA-XS adapter as a standard PEFT LoRA adapter folder, which PEFT and vLLM load with no
LoRA-XS code.

LoRA-XS adds (α/r)·x·A·R·B to x·W; PEFT's LoRA adds (lora_alpha/r)·x·lora_Aᵀ·lora_Bᵀ with
lora_A (r, in) and lora_B (out, r). So the same rank-r update is

    lora_A = (A·R)ᵀ   (r, in)        lora_B = Bᵀ   (out, r)        lora_alpha = α

and PEFT's scaling α/r is ours. A kernel whose stored scale is not α/r (or whose rank differs
from the adapter's most common one: ``rank_pattern``) keeps its own scale folded into lora_A.
The folder holds ``adapter_model.safetensors`` (keys ``base_model.model.<HF module>.lora_A
.weight`` as PEFT writes them), ``adapter_config.json`` (``peft_type``, ``r``, ``lora_alpha``,
``target_modules``, ``base_model_name_or_path``, nothing vLLM rejects) and a README. Trainable
extras (a classification head) go into ``modules_to_save``, which PEFT loads; vLLM loads only a
single Linear named ``classifier`` or ``score`` there, and only for classification models, so
exporting any other extra warns.

The file costs r·(in + out) numbers per matrix, not r²: the price of standard tooling.
"""

from __future__ import annotations

import collections
import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from loraxs_jax.config import LoraXSConfig
from loraxs_jax.interop.names import (
    BASE_MODULES,
    ancestors,
    family,
    hf_names,
    module_of,
    split_layers,
    suffix_patterns,
)
from loraxs_jax.io import save_tensors
from loraxs_jax.parallel.hosts import to_host, write_file
from loraxs_jax.tree import adapted_kernels, flatten, leaf_role, path_str, unbox

PREFIX = "base_model.model."
# vLLM's --max-lora-rank must be one of these (vllm/config/lora.py); 16 is its default
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_HEADS = ("classifier", "score")


def _host(x: Any) -> np.ndarray:
    return np.asarray(to_host(unbox(x)), np.float64)


def _matrices(path: tuple, leaves: dict, count: int) -> list[dict[str, Any]]:
    """One {A (in, r), R (r, r), B (r, out), scale, rank} per HF module of an adapted kernel
    (``count`` of them: its stacked layers)."""
    a, r, b, s = (_host(leaves[k]) for k in ("A", "R", "B", "scale"))
    if a.ndim != r.ndim or b.ndim != r.ndim:
        raise ValueError(f"{path_str(path)}: a kernel with more than two matrix axes has no "
                         f"PyTorch Linear counterpart (A {a.shape}, B {b.shape})")
    if int(np.prod(r.shape[:-2], dtype=int)) != count:
        raise ValueError(f"{path_str(path)} holds {r.shape[:-2]} stacked matrices, its HF "
                         f"names {count} modules")
    a, r, b = (x.reshape(count, *x.shape[-2:]) for x in (a, r, b))
    s = s.reshape(count)
    return [{"A": a[i], "R": r[i], "B": b[i], "scale": s[i], "rank": r.shape[-1]}
            for i in range(count)]


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM accepts that serves ``rank`` (None: none does)."""
    return next((m for m in VLLM_MAX_LORA_RANKS if m >= rank), None)


def peft_lora(params: Mapping, config, cfg: LoraXSConfig | None = None, *,
              max_rank: int = VLLM_MAX_LORA_RANKS[-1], dtype: Any = np.float32
              ) -> tuple[dict[str, np.ndarray], dict[str, Any], list[str]]:
    """The tensors and adapter_config.json of the PEFT LoRA equal to an adapted tree.

    Args:
      params: the adapted tree (``apply`` / ``load_adapter``), unmerged.
      config: our architecture config (``EncoderConfig`` / ``DecoderConfig``): which HF names.
      cfg: the adapter's LoraXSConfig; its ``trainable`` leaves (a task head) are exported as
        ``modules_to_save``. None exports the LoRA part alone.
      max_rank: refuse a kernel of higher rank (vLLM serves at most ``--max-lora-rank``).
      dtype: dtype of the LoRA factors (computed in float64).
    Returns: (tensors by saved key, adapter_config dict, vLLM caveats as sentences).
    """
    kind = family(config)
    names_of = hf_names(config)
    kernels = adapted_kernels(params)
    if not kernels:
        raise ValueError("no LoRA-XS leaves in these params: export the tree returned by "
                         "loraxs_jax.apply / load_adapter, not a merged one")
    modules: dict[str, dict[str, Any]] = {}
    for path, leaves in sorted(kernels.items(), key=lambda kv: path_str(kv[0])):
        names, transpose = names_of(path)
        if not transpose:
            raise ValueError(f"{path_str(path)} is not a Linear kernel in PyTorch; PEFT cannot "
                             "hold its LoRA")
        for tensor, m in zip(names, _matrices(path, leaves, len(names))):
            if m["rank"] > max_rank:
                raise ValueError(
                    f"rank {m['rank']} of {path_str(path)} exceeds max_rank={max_rank} (vLLM "
                    f"serves LoRA ranks up to --max-lora-rank, at most {VLLM_MAX_LORA_RANKS[-1]}"
                    "); raise max_rank to the server's --max-lora-rank or train a lower rank")
            modules[module_of(tensor)] = m
    ranks = collections.Counter(m["rank"] for m in modules.values())
    r = ranks.most_common(1)[0][0]
    first = next(iter(modules.values()))     # α: the config's, else what the first scale says
    alpha = float(cfg.alpha) if cfg is not None else round(float(first["scale"] * first["rank"]), 5)
    alpha = int(alpha) if alpha.is_integer() else alpha

    every = ancestors(n for p in flatten(params) if not leaf_role(p[-1])
                      for n in names_of(p)[0])
    tensors: dict[str, np.ndarray] = {}
    for module, m in modules.items():
        fold = m["scale"] / (alpha / m["rank"])      # 1 unless this kernel's scale is its own
        tensors[f"{PREFIX}{module}.lora_A.weight"] = (fold * m["A"] @ m["R"]).T.astype(dtype)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = m["B"].T.astype(dtype)
    rank_pattern = {}
    for rank in sorted(set(ranks) - {r}):
        chosen = [k for k, m in modules.items() if m["rank"] == rank]
        rank_pattern.update({re.escape(s): rank for s in suffix_patterns(chosen, modules)})

    to_save, caveats = _modules_to_save(params, config, cfg, names_of, set(modules), tensors)
    need = vllm_max_lora_rank(max(ranks))
    if need and need > 16:
        caveats.append(f"rank {max(ranks)} needs vLLM's --max-lora-rank {need} (default 16)")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": ("CAUSAL_LM" if kind == "decoder"
                      else "SEQ_CLS" if "classifier" in to_save else None),
        "r": r,
        "lora_alpha": alpha,
        "target_modules": suffix_patterns(modules, every),
        "rank_pattern": rank_pattern,
        "alpha_pattern": {},
        "modules_to_save": to_save or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    return tensors, adapter_config, caveats


def _modules_to_save(params, config, cfg, names_of, targets: set[str],
                     tensors: dict[str, np.ndarray]) -> tuple[list[str], list[str]]:
    """Whole modules holding ``cfg.trainable`` leaves: a head outside the base model (BERT's
    ``classifier``, RoBERTa's ``classifier`` with dense and out_proj) by its top-level name, any
    other by its own; every param of such a module is written (PEFT replaces the module)."""
    if cfg is None or not cfg.trainable:
        return [], []
    flat = {p: v for p, v in flatten(params).items() if not leaf_role(p[-1])}
    chosen = set()
    for path in flat:
        if cfg.is_extra_trainable(path_str(path)):
            for name in names_of(path)[0]:
                top = name.split(".")[0]
                chosen.add(top if top not in BASE_MODULES else module_of(name))
    if "classifier" in chosen and getattr(config, "head", "cls") != "cls":
        raise ValueError(f"a head={config.head!r} classifier reads mean-pooled tokens, while "
                         "transformers' *ForSequenceClassification reads [CLS]: PEFT cannot "
                         "hold it (export the LoRA alone: cfg=None, or --no-head)")
    clash = sorted(t for t in targets for m in chosen if t == m or t.startswith(m + "."))
    if clash:
        raise ValueError(f"modules_to_save {sorted(chosen)} contain LoRA targets {clash[:3]}: "
                         "PEFT cannot replace a module and adapt it at once")
    for path, leaf in flat.items():
        names, transpose = names_of(path)
        for name, x in zip(names, split_layers(np.asarray(to_host(unbox(leaf))), names,
                                               path_str(path))):
            if any(name.startswith(m + ".") for m in chosen):
                tensors[PREFIX + name] = np.ascontiguousarray(x.T if transpose else x)
    caveats = []
    for m in sorted(chosen):
        if m not in VLLM_HEADS:
            caveats.append(f"vLLM refuses modules_to_save {m!r} (it takes only a 'classifier' or "
                           "'score' head); merge it into the base (export hf) to serve it")
        elif {k.removeprefix(f"{PREFIX}{m}.") for k in tensors
              if k.startswith(f"{PREFIX}{m}.")} - {"weight", "bias"}:
            caveats.append(f"vLLM refuses the {m!r} head: it is not one Linear (RoBERTa's "
                           "classifier.dense + out_proj); merge it into the base (export hf)")
        else:
            caveats.append(f"vLLM loads the {m!r} head only when serving a classification "
                           "(pooling) model")
    return sorted(chosen), caveats


def export_peft(params: Mapping, config, out: str | os.PathLike, cfg: LoraXSConfig | None = None,
                *, base_model_name_or_path: str | None = None,
                max_rank: int = VLLM_MAX_LORA_RANKS[-1], dtype: Any = np.float32,
                metadata: Mapping[str, str] | None = None) -> Path:
    """Write an adapted tree as a PEFT LoRA folder (``adapter_model.safetensors``,
    ``adapter_config.json``, ``README.md``) that ``peft.PeftModel.from_pretrained`` and vLLM load
    onto the transformers model with no LoRA-XS code. See :func:`peft_lora` for the arguments;
    ``metadata`` goes into the safetensors header (e.g. the source adapter's fingerprint). vLLM
    caveats (a head it refuses, a rank above its default limit) are issued as warnings.
    Returns the folder."""
    tensors, adapter_config, caveats = peft_lora(params, config, cfg, max_rank=max_rank,
                                                 dtype=dtype)
    adapter_config["base_model_name_or_path"] = base_model_name_or_path
    out = Path(out)
    meta = {"format": "pt", "exported_by": "loraxs-jax (LoRA-XS as a standard LoRA)",
            **(metadata or {})}
    if cfg is not None:
        meta["loraxs_config"] = cfg.to_json()
    save_tensors(out / "adapter_model.safetensors", tensors, meta)
    write_file(out / "adapter_config.json",
               (json.dumps(adapter_config, indent=2) + "\n").encode())
    write_file(out / "README.md", _readme(adapter_config, caveats).encode())
    for c in caveats:
        warnings.warn(c, stacklevel=2)
    return out


def _readme(c: Mapping[str, Any], caveats: list[str]) -> str:
    lines = [
        "# LoRA adapter exported from loraxs-jax", "",
        f"A LoRA-XS adapter written as a standard PEFT LoRA of rank {c['r']} "
        f"(lora_A = (A·R)ᵀ, lora_B = Bᵀ, lora_alpha = {c['lora_alpha']}): its forward equals "
        "the LoRA-XS model's.", "",
        f"Base model: {c['base_model_name_or_path'] or '(not recorded)'}; targets: "
        f"{', '.join(c['target_modules'])}.", "",
        "```python", "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, this_folder)", "```", "",
    ]
    if caveats:
        lines += ["vLLM:", *[f"- {x}" for x in caveats], ""]
    return "\n".join(lines)
