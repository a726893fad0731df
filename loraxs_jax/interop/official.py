"""Importing checkpoints of the official LoRA-XS code (MohammadrezaBanaei/LoRA-XS, PEFT 0.10).

Their adapter folder is a PEFT LoRA folder plus one r×r latent per module::

    base_model.model.<module>.lora_A.weight                  (r, in)    = Aᵀ
    base_model.model.<module>.lora_B.weight                  (out, r)   = Bᵀ
    base_model.model.<module>_lora_latent_mapping.weight     (r, r)     = Rᵀ  (an nn.Linear(r, r))
    base_model.model.classifier.*                            the GLUE head, when trained

and their forward adds ``lora_B(latent(lora_A(x)))·(lora_alpha/r)``, i.e. (α/r)·x·A·R·B in our
notation. A and B come from scikit-learn's randomized SVD and cannot be reproduced, so they are
taken from the file: the imported config has ``init="given"`` and, saved with ``save_to``, the
bases travel in a bases cache beside our adapter file (``load_adapter(..., bases_cache=)``).
Stock PEFT would load such a folder silently without its latents; we refuse any key we cannot
place.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from loraxs_jax.apply import apply
from loraxs_jax.bases import find_targets
from loraxs_jax.config import LoraXSConfig
from loraxs_jax.interop.names import hf_index
from loraxs_jax.io import bases_digest, save_adapter, store_bases
from loraxs_jax.tree import adapter_key, flatten, path_str, shape_of, unbox, unflatten

PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+?)(?:\.(?P<ab>lora_A|lora_B)|_lora_latent_mapping)\.weight$")
MAX_FILE_BYTES = 64 << 30


def read_official(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(adapter_config.json, {key without "base_model.model.": tensor}) of an official folder."""
    folder = Path(folder)
    cfg_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder} has no adapter_config.json: not a PEFT/LoRA-XS "
                                "adapter folder")
    if not weights.is_file():
        legacy = folder / "adapter_model.bin"
        raise FileNotFoundError(
            f"{folder} has no adapter_model.safetensors" + (
                " (only adapter_model.bin, a pickle we do not read: convert it with "
                "safetensors.torch.save_file(torch.load(path)))" if legacy.exists() else ""))
    if weights.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{weights} is {weights.stat().st_size} bytes: not an adapter")
    config = json.loads(cfg_file.read_text())
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type {config.get('peft_type')!r}, expected 'LORA'")
    tensors = {}
    with safe_open(weights, framework="numpy") as f:
        for key in f.keys():
            if not key.startswith(PREFIX):
                raise ValueError(f"{weights}: key {key!r} lacks PEFT's {PREFIX!r} prefix")
            tensors[key[len(PREFIX):]] = f.get_tensor(key)
    return config, tensors


def _alpha(config: Mapping[str, Any], rank: int) -> float:
    """Our α (scale α/r) for PEFT's lora_alpha, with rsLoRA's α/√r honoured."""
    for bad in ("use_dora",):
        if config.get(bad):
            raise ValueError(f"adapter_config.json has {bad}=true: not a LoRA-XS adapter")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern):
            raise ValueError(f"adapter_config.json has a {pattern} ({config[pattern]}); the "
                             "official LoRA-XS code writes none and we import one rank and α")
    if config.get("r") not in (None, rank):
        raise ValueError(f"adapter_config.json says r={config['r']}, the tensors have rank {rank}")
    alpha = float(config.get("lora_alpha", 8))
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def _targets(config: Mapping[str, Any], paths: set[str], base: Mapping,
             fields: Mapping[str, Any]) -> tuple[str, ...]:
    """The checkpoint's PEFT ``target_modules`` as our regexes when they select exactly the
    adapted kernels here; else the kernels' exact paths."""
    modules = config.get("target_modules")
    if isinstance(modules, list) and modules:
        suffixes = tuple(rf"(^|/){re.escape(m).replace(chr(92) + '.', '/')}/kernel$"
                         for m in modules)
        try:
            found = {t.name for t in find_targets(base, LoraXSConfig(targets=suffixes, **fields))}
        except ValueError:       # a suffix that matches nothing here
            found = None
        if found == paths:
            return suffixes
    return (rf"^({'|'.join(re.escape(p) for p in sorted(paths))})$",)


def import_official(folder: str | os.PathLike, base_params: Mapping, config, *,
                    save_to: str | os.PathLike | None = None) -> tuple[Mapping, LoraXSConfig]:
    """An official LoRA-XS checkpoint as our adapted tree.

    Args:
      folder: the official adapter folder (adapter_config.json + adapter_model.safetensors).
      base_params: our base params of the model it was trained on (``load_encoder`` with the
        head's num_labels / ``load_decoder``; scanned layers too).
      config: their architecture config (names the HF modules).
      save_to: also write ``save_to/adapter.safetensors`` (our format: R and the head) and the
        file's bases into ``save_to/bases`` (a bases cache), so that
        ``load_adapter(save_to/"adapter.safetensors", base, bases_cache=save_to/"bases")``
        rebuilds the same tree.
    Returns: (adapted params with A = lora_Aᵀ, B = lora_Bᵀ, R = latentᵀ and the head put in
      place, the LoraXSConfig, ``init="given"``).
    Raises: ValueError naming every key that has no place in these params, a module with a
      LoRA but no latent (a plain LoRA), or a shape that does not fit.
    """
    peft_config, tensors = read_official(folder)
    index = hf_index(base_params, config)
    flat = flatten(base_params)
    parts: dict[str, dict[str, np.ndarray]] = {}
    extras, unplaced = {}, []
    for key, value in tensors.items():
        m = _LORA.match(key)
        if m:
            parts.setdefault(m["module"], {})[m["ab"] or "latent"] = value
        elif key in index:          # a trained head (modules_to_save): replaces the base's
            extras[key] = value
        else:
            unplaced.append(key)
    incomplete = {k: sorted(v) for k, v in parts.items() if set(v) != {"lora_A", "lora_B", "latent"}}
    if incomplete:
        k, have = next(iter(incomplete.items()))
        raise ValueError(f"{folder}: {len(incomplete)} modules lack part of LoRA-XS's "
                         f"lora_A/lora_B/_lora_latent_mapping, e.g. {k} has only {have}"
                         + (" (a plain LoRA adapter: load it with PEFT)"
                            if "latent" not in have else ""))
    if not parts:
        raise ValueError(f"{folder} holds no LoRA-XS modules (no *_lora_latent_mapping.weight)")
    by_path: dict[tuple, dict[int | None, dict[str, np.ndarray]]] = {}
    for module, p in parts.items():
        where = index.get(module + ".weight")
        if where is None:
            unplaced.append(f"{module}.*")
            continue
        path, layer, _ = where
        by_path.setdefault(path, {})[layer] = p
    if unplaced:
        raise ValueError(f"{folder}: {len(unplaced)} tensors have no place in this "
                         f"{config.model_type} model: {sorted(unplaced)[:6]}; was it trained on "
                         "another base model?")
    ranks = {p["latent"].shape[0] for per in by_path.values() for p in per.values()}
    if len(ranks) != 1:
        raise ValueError(f"{folder}: latents of several ranks {sorted(ranks)}")
    rank = ranks.pop()

    bases, rs = {}, {}
    for path, per in by_path.items():
        name, shape = path_str(path), shape_of(flat[path])
        stacked = len(shape) == 3
        layers = sorted(per, key=lambda i: -1 if i is None else i)
        if stacked and layers != list(range(shape[0])):
            raise ValueError(f"{name} stacks {shape[0]} layers; the checkpoint adapts layers "
                             f"{layers} of it (all or none can be imported)")
        a, b, r = [], [], []
        for i in layers:
            p = per[i]
            want = {"lora_A": (rank, shape[-2]), "lora_B": (shape[-1], rank),
                    "latent": (rank, rank)}
            for k, w in want.items():
                if p[k].shape != w:
                    raise ValueError(f"{name}{'' if i is None else f' layer {i}'}: {k} has "
                                     f"shape {p[k].shape}, expected {w} for kernel {shape}")
            a.append(p["lora_A"].T)
            b.append(p["lora_B"].T)
            r.append(p["latent"].T)
        pick = (lambda xs: np.stack(xs)) if stacked else (lambda xs: xs[0])
        bases[name] = (jnp.asarray(pick(a), jnp.float32), jnp.asarray(pick(b), jnp.float32))
        rs[path] = jnp.asarray(pick(r), jnp.float32)

    fields = dict(rank=rank, alpha=_alpha(peft_config, rank), init="given", r_std=0.0,
                  bases_seed=bases_digest(bases),
                  stacked_axes=1 if getattr(config, "scan_layers", False) else 0,
                  trainable=tuple(f"^{re.escape(p)}$"
                                  for p in sorted({path_str(index[k][0]) for k in extras})))
    cfg = LoraXSConfig(targets=_targets(peft_config, set(bases), base_params, fields), **fields)
    adapted = dict(flatten(apply(base_params, cfg, 0, bases=bases)))
    for path, r in rs.items():
        adapted[(*path[:-1], adapter_key(str(path[-1]), "R"))] = r
    _place_extras(adapted, extras, index)
    params = unflatten(adapted, base_params)
    if save_to is not None:
        save_to = Path(save_to)
        save_adapter(save_to / "adapter.safetensors", params, cfg)
        store_bases(save_to / "bases", base_params, cfg, bases)
    return params, cfg


def _place_extras(adapted: dict, extras: Mapping[str, np.ndarray], index: Mapping) -> None:
    """Put the checkpoint's other tensors (HF layout: a head) into our tree, per layer when
    stacked."""
    for key, value in extras.items():
        path, layer, transpose = index[key]
        old = unbox(adapted[path])
        ours = value.T if transpose else value
        want = tuple(old.shape[1:] if layer is not None else old.shape)
        if ours.shape != want:
            raise ValueError(f"checkpoint tensor {key} {value.shape} does not fit "
                             f"{path_str(path)} {tuple(old.shape)} (a head with another number "
                             "of labels? load the base with the checkpoint's num_labels)")
        ours = jnp.asarray(ours, old.dtype)
        adapted[path] = old.at[layer].set(ours) if layer is not None else ours
