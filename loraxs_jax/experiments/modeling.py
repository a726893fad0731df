"""Model building for experiments: the base model named by a config's ``model`` section.

A ``Family`` says, for one of our model families (``models.encoder``, ``models.decoder``), how to
make the linen module from its architecture config, its abstract params and their logical axis
names; ``build_model`` loads real weights (HF folder, hub id, GGUF or ``asset:NAME``) and
``place_params`` shards any tree of that model (base, adapted or merged) on the config's mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from loraxs_jax import parallel
from loraxs_jax.models import decoder, encoder


@dataclasses.dataclass(frozen=True)
class Family:
    """What experiments need to know about one of our model families."""

    kind: str                                  # "encoder" | "decoder" (config.model.kind)
    config_type: type                          # EncoderConfig | DecoderConfig
    module: Callable[[Any], Any]               # architecture config -> linen module
    param_shapes: Callable[[Any], dict]        # architecture config -> ShapeDtypeStruct tree
    logical_axes: Callable[[Any], dict]        # architecture config -> logical names per param


FAMILIES = {
    "encoder": Family("encoder", encoder.EncoderConfig, encoder.Encoder, encoder.param_shapes,
                      encoder.param_logical_axes),
    "decoder": Family("decoder", decoder.DecoderConfig, decoder.DecoderForCausalLM,
                      decoder.param_shapes, decoder.param_logical_axes),
}


def family(kind_or_config: Any) -> Family:
    """The family of ``config.model.kind`` ("encoder"/"decoder") or of an architecture config."""
    for f in FAMILIES.values():
        if kind_or_config == f.kind or isinstance(kind_or_config, f.config_type):
            return f
    raise ValueError(f"config.model.kind={kind_or_config!r}: expected one of "
                     f"{', '.join(FAMILIES)}")


@dataclasses.dataclass
class Model:
    module: Any          # the Flax linen module (unmodified; LoRA-XS comes in through lx.wrap)
    params: dict         # the base params (plain tree)
    tokenizer: Any
    config: Any          # EncoderConfig | DecoderConfig
    kind: str            # encoder | decoder

    @property
    def family(self) -> Family:
        return FAMILIES[self.kind]


def resolve_path(path: str) -> str:
    """"asset:NAME" → the cached asset's folder or file (``experiments.assets``); anything else
    as is."""
    if not path:
        raise ValueError("config.model.path is empty: give an HF folder, a hub id, a .gguf file "
                         "or asset:NAME")
    if path.startswith("asset:"):
        from loraxs_jax.experiments.assets import asset_path

        p = asset_path(path.split(":", 1)[1])
        if p.is_dir():
            ggufs = sorted(p.glob("*.gguf"))
            if ggufs and not (p / "config.json").exists():
                return str(ggufs[0])
        return str(p)
    return path


def _tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def build_model(config: ml_collections.ConfigDict, num_labels: int = 2) -> Model:
    """Load the base model named by ``config.model`` (weights from disk, hub or GGUF)."""
    m = config.model
    fam = family(m.kind)
    dtype, param_dtype = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
    path = resolve_path(m.path)
    if fam.kind == "encoder":
        # the encoder rematerialises whole layers or nothing ("none" is a truthy string)
        options = {"scan_layers": m.scan_layers, "remat": m.remat != "none",
                   "param_dtype": param_dtype}
        if m.dropout >= 0:
            options.update(hidden_dropout=m.dropout, attention_dropout=m.dropout)
        cfg, params = encoder.load_encoder(path, num_labels=num_labels, head=m.head, dtype=dtype,
                                           rng=jax.random.key(config.seed),
                                           fresh_head=m.fresh_head, **options)
        tok = _tokenizer(path)
    else:
        options = {"scan_layers": m.scan_layers, "remat": m.remat}
        if path.endswith(".gguf"):
            from loraxs_jax.models.gguf import load_gguf

            cfg, params, tok = load_gguf(path, dtype=dtype, param_dtype=param_dtype, **options)
        else:
            cfg, params = decoder.load_decoder(path, dtype=dtype, param_dtype=param_dtype,
                                               **options)
            tok = _tokenizer(path)
    return Model(fam.module(cfg), params, tok, cfg, fam.kind)


def place_params(config: ml_collections.ConfigDict, model: Model, params: dict, mesh=None):
    """Shard ``params`` (base, adapted or merged) on the mesh of ``config.mesh``: base leaves by
    the model's logical axes and the rules, LoRA-XS leaves like their kernel (A: input axes, B:
    output axes, R replicated). Returns (mesh, placed params, their NamedSharding tree)."""
    mesh = mesh or parallel.make_mesh(config.mesh)
    base = parallel.param_shardings(model.params, model.family.logical_axes(model.config), mesh)
    shardings = parallel.adapted_shardings(params, base)
    return mesh, parallel.shard_params(params, shardings), shardings


def workdir_path(workdir: str | Path) -> Path:
    p = Path(workdir)
    p.mkdir(parents=True, exist_ok=True)
    return p
