"""Adapter bytes on disk: ours (R only) vs r² × matrices × 4, vs LoRA, vs the official A+B+R.

Our file is written for real by ``loraxs_jax.save_adapter`` from abstract shapes (R as zeros of
the right shape; base weights are never needed, the fingerprint is given). LoRA (A (in, r) and
B (r, out) per target, PEFT-style names, float32 safetensors) and the official LoRA-XS layout
(A, B and R per target) are sized exactly from shapes (the safetensors header is built as the
file would have it; the test checks the sizing against written files).

    python -m benchmarks.bench_adapter_size [--smoke]
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import loraxs_jax
from benchmarks import common
from loraxs_jax.bases import find_targets
from loraxs_jax.models import decoder as dec
from loraxs_jax.models import encoder as enc
from loraxs_jax.tree import flatten, leaf_role, unflatten

PAPER_RANKS = (4, 8, 12, 16, 20, 25)
F32 = np.dtype(np.float32)
# safetensors' dtype names, and its writer's order of tensors: by dtype (this enum order,
# descending), then by name.
_ST_NAMES = {np.dtype(np.float64): "F64", F32: "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
             np.dtype(np.float16): "F16"}
_ST_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32",
             "F32", "F64", "I64", "U64")


def safetensors_size(specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                     metadata: Mapping[str, str] | None = None) -> int:
    """Exact size of the safetensors file ``safetensors.numpy.save`` (what ``loraxs_jax.io``
    writes) makes of tensors of these shapes and dtypes, without making them."""
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    order = sorted(specs, key=lambda k: (-_ST_ORDER.index(_ST_NAMES[np.dtype(specs[k][1])]), k))
    for name in order:
        shape, dtype = specs[name]
        n = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _ST_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    head = len(json.dumps(header, separators=(",", ":")).encode())
    return len(struct.pack("<Q", 0)) + head + (-head % 8) + offset


def lora_specs(params: Mapping, cfg: loraxs_jax.LoraXSConfig, with_r: bool = False) -> dict:
    """PEFT-style tensors of a LoRA adapter on ``cfg``'s targets (with R: the official LoRA-XS
    file, which stores A, B and R of every target)."""
    specs = {}
    for t in find_targets(params, cfg):
        r, stem = t.rank, "base_model.model." + t.name.replace("/", ".").removesuffix(".kernel")
        for i in range(t.count):
            s = stem if t.count == 1 else f"{stem}.{i}"
            specs[f"{s}.lora_A.weight"] = ((r, t.m), F32)            # torch layout (out, in)
            specs[f"{s}.lora_B.weight"] = ((t.n, r), F32)
            if with_r:
                specs[f"{s}.default_lora_latent_mapping.weight"] = ((r, r), F32)
    return specs


def our_adapter_bytes(abstract_params: Mapping, cfg: loraxs_jax.LoraXSConfig, folder: Path
                      ) -> dict:
    """Write our adapter for ``cfg`` on a base known only by shapes; return its sizes."""
    def adapt(p):      # the SVD would only be traced for shapes: give apply zero bases instead
        bases = {t.name: (jnp.zeros(t.stack + t.in_dims + (t.rank,)),
                          jnp.zeros(t.stack + (t.rank,) + t.out_dims))
                 for t in find_targets(p, cfg)}
        return loraxs_jax.apply(p, cfg, 0, bases=bases)

    adapted = jax.eval_shape(adapt, abstract_params)
    flat = {p: (np.zeros(v.shape, v.dtype) if leaf_role(p[-1]) and leaf_role(p[-1])[1] == "R"
                else v) for p, v in flatten(adapted).items()}
    path = loraxs_jax.save_adapter(folder / f"r{cfg.rank}", unflatten(flat, {}), cfg,
                                   base_fingerprint="0" * 32)
    counts = loraxs_jax.count(adapted, cfg)
    size = path.stat().st_size
    return {"file_bytes": size, "r2_count_4": counts["R"] * 4,
            "header_bytes": size - counts["R"] * 4, "trainable": counts["R"],
            "matrices": counts["adapted_matrices"]}


def sizes(abstract_params: Mapping, ranks, targets, folder: Path) -> list[dict]:
    rows = []
    for r in ranks:
        cfg = loraxs_jax.LoraXSConfig(rank=r, alpha=16.0, targets=tuple(targets))
        ours = our_adapter_bytes(abstract_params, cfg, folder)
        lora = safetensors_size(lora_specs(abstract_params, cfg), {"format": "pt"})
        official = safetensors_size(lora_specs(abstract_params, cfg, True), {"format": "pt"})
        rows.append({"rank": r, **ours, "lora_bytes": lora, "official_ABR_bytes": official,
                     "lora_over_ours": lora / ours["file_bytes"],
                     "official_over_ours": official / ours["file_bytes"]})
    return rows


def mistral_7b_config(layers: int = 32) -> dec.DecoderConfig:
    return dec.DecoderConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                             num_layers=layers, num_heads=32, num_kv_heads=8, head_dim=128,
                             max_position_embeddings=32768, sliding_window=4096,
                             rope_theta=10000.0, model_type="mistral")


def abstract_encoder(config: enc.EncoderConfig) -> dict:
    return jax.eval_shape(lambda: enc.init_encoder(config, jax.random.key(0)))


def run(smoke: bool = False) -> dict:
    models = {}
    if smoke:
        models["bert-small (smoke)"] = (abstract_encoder(common.bert_small(True).model.config),
                                        (2, 4), common.ENCODER_TARGETS)
    else:
        minilm = enc.EncoderConfig(hidden_size=384, num_layers=6, num_heads=12,
                                   intermediate_size=1536)
        models["MiniLM-L6"] = (abstract_encoder(minilm), PAPER_RANKS, common.ENCODER_TARGETS)
    models["RoBERTa-large (paper GLUE targets)"] = (
        abstract_encoder(enc.roberta_large_config()), (4,) if smoke else PAPER_RANKS,
        common.ENCODER_TARGETS)
    mistral = mistral_7b_config(2 if smoke else 32)
    models[f"Mistral-7B ({mistral.num_layers} layers; q,k,v,o,gate,up,down)"] = (
        dec.param_shapes(mistral), (64,), common.DECODER_TARGETS)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (params, ranks, targets) in models.items():
            out[name] = sizes(params, ranks, targets, Path(tmp))
            print(f"[adapter_size] {name}: " + ", ".join(
                f"r={x['rank']} {x['file_bytes']:,} B (LoRA ×{x['lora_over_ours']:.0f})"
                for x in out[name]), flush=True)
    path = common.write_result("adapter_size", {"models": out}, tables, smoke)
    return {"path": str(path), "models": out}


def tables(data: dict) -> str:
    parts = []
    for name, rows in data["models"].items():
        parts.append(f"## {name}\n\n" + common.md_table(
            ["rank", "matrices", "trainable (r²·n)", "ours: file bytes", "r²·n·4", "header",
             "LoRA A+B bytes", "official A+B+R bytes", "LoRA / ours", "official / ours"],
            [[x["rank"], x["matrices"], x["trainable"], x["file_bytes"], x["r2_count_4"],
              x["header_bytes"], x["lora_bytes"], x["official_ABR_bytes"], x["lora_over_ours"],
              x["official_over_ours"]] for x in rows]) + "\n")
    parts.append("Ours: a real file from `loraxs_jax.save_adapter` (float32 R stacked per rank + "
                 "a JSON header with the config, fingerprint and the adapted paths). LoRA and "
                 "official sizes: exact safetensors sizes (PEFT-style names, float32) from "
                 "shapes. Trainable counts match the paper (RoBERTa-large r=25: 60K; Mistral-7B "
                 "r=64: 0.92M).\n")
    return "\n".join(parts)


def main(argv=None):
    common.cli(__doc__, run, argv, reps=False)


if __name__ == "__main__":
    main()
