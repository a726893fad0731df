"""Command line: move adapters to and from PyTorch.

    python -m loraxs_jax.interop export peft --adapter run/adapter.safetensors --base BASE --out DIR
    python -m loraxs_jax.interop export hf   --adapter ... --base BASE --out DIR [--dtype bfloat16]
    python -m loraxs_jax.interop export gguf --adapter ... --base BASE --out FILE.gguf [--quant q8_0]
    python -m loraxs_jax.interop import-official --checkpoint DIR --base BASE --out DIR

(installed as ``loraxs-export {peft,hf,gguf} ...`` and ``loraxs-import ...``). BASE is the base
model the adapter was trained on: a Hugging Face folder (BERT, RoBERTa, Llama, Mistral, Qwen2,
Gemma) or a Llama GGUF file. Errors (an adapter on the wrong base, a rank over vLLM's limit, an
unknown model family, ...) end the program with status 2 and one line naming the culprit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open

from loraxs_jax.interop.gguf import TYPES, export_gguf
from loraxs_jax.interop.hf import export_hf, has_tokenizer
from loraxs_jax.interop.official import import_official
from loraxs_jax.interop.peft import VLLM_MAX_LORA_RANKS, export_peft
from loraxs_jax.io import adapter_info, load_adapter
from loraxs_jax.models import decoder, encoder
from loraxs_jax.models.hub import HFFolder
from loraxs_jax.tree import flatten, path_str

_START = time.monotonic()
_HEADS = ("classifier/kernel", "classifier/out_proj/kernel")           # ours: (hidden, labels)
_OFFICIAL_HEADS = ("base_model.model.classifier.weight",               # theirs: (labels, hidden)
                   "base_model.model.classifier.out_proj.weight")


def say(msg: str) -> None:
    """Progress on stderr, with the seconds since start."""
    print(f"[{time.monotonic() - _START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def load_base(path: str, *, num_labels: int = 2, head: str = "cls",
              scan_layers: bool = False) -> tuple[Any, dict, Any]:
    """(architecture config, params, tokenizer source: a folder, a .gguf file) of a base model:
    a Hugging Face folder of a family we implement, or a Llama GGUF file."""
    p = Path(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"no GGUF file at {p}")
        from loraxs_jax.models.gguf import load_gguf

        say(f"loading {p.name} (GGUF)")
        config, params, _ = load_gguf(p, scan_layers=scan_layers)
        return config, params, p
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} is neither a Hugging Face folder (config.json) nor a .gguf "
                                "file")
    model_type = json.loads((p / "config.json").read_text()).get("model_type")
    say(f"loading {p} ({model_type})")
    if model_type in encoder.SUPPORTED_MODEL_TYPES:
        config, params = encoder.load_encoder(p, num_labels=num_labels, head=head,
                                              scan_layers=scan_layers)
    elif model_type in decoder.SUPPORTED_MODEL_TYPES:
        config, params = decoder.load_decoder(p, scan_layers=scan_layers)
    else:
        raise ValueError(
            f"unknown model family {model_type!r} in {p / 'config.json'}: loraxs-jax loads "
            f"{', '.join(encoder.SUPPORTED_MODEL_TYPES + decoder.SUPPORTED_MODEL_TYPES)}")
    return config, params, p


def fresh_head(path: str, config, params: dict, supplied: set[str]) -> list[str]:
    """Head params (pooler, classifier) that neither the base checkpoint nor ``supplied`` (the
    adapter's tensors) holds: the loader made them up, so an export would carry them random."""
    if not isinstance(config, encoder.EncoderConfig):
        return []
    keys = set(HFFolder(path).keys())
    prefix = encoder.checkpoint_prefix(config.model_type, keys)
    return [path_str(p) for p in flatten(params) if p[0] in ("pooler", "classifier")
            and path_str(p) not in supplied
            and not set(encoder.hf_names(p, config, prefix)[0]) <= keys]


def _shape(file: Path, names: Sequence[str]) -> tuple[int, ...] | None:
    with safe_open(file, framework="numpy") as f:
        found = [n for n in names if n in f.keys()]
        return tuple(f.get_slice(found[0]).get_shape()) if found else None


def head_kind(adapter: Path, given: str | None, has_head: bool) -> str:
    """How the adapter's encoder head was trained ("cls" or "mean"): ``--head``, else the
    training run's config.json beside the adapter (``model.head``). A stored head of unknown kind
    is refused: a mean-pooling classifier put on [CLS] would be silently wrong."""
    run = adapter.parent / "config.json"
    recorded = None
    if run.is_file():
        model = json.loads(run.read_text()).get("model")
        recorded = model.get("head") if isinstance(model, dict) else None
    if given and recorded and given != recorded:
        raise ValueError(f"--head {given}, but {run} says the run trained model.head="
                         f"{recorded!r}")
    if given or recorded:
        return given or recorded
    if has_head:
        raise ValueError(f"{adapter} holds a classifier head and nothing says how it was "
                         "trained: pass --head cls (HF's pooler head) or --head mean (on "
                         "mean-pooled tokens), as the run's config model.head")
    return "cls"


def run_export(args: argparse.Namespace) -> Path:
    info = adapter_info(args.adapter)
    cfg = info["config"]
    say(f"adapter {args.adapter}: rank {cfg.rank}, α {cfg.alpha}, "
        f"{sum(v['kernels'] for v in info['adapted'].values())} kernels")
    head = _shape(info["path"], _HEADS)
    kind = head_kind(info["path"], args.head, head is not None)
    scan = bool(cfg.stacked_axes)                    # stacked kernels: the layers were scanned
    config, base, source = load_base(args.base, num_labels=head[-1] if head else 2,
                                     head=kind, scan_layers=scan)
    made_up = fresh_head(args.base, config, base, set(info["tensors"])) if source.is_dir() else []
    if made_up:
        raise ValueError(f"{args.base} lacks {made_up} and the adapter does not hold them: the "
                         "export would carry a random head. Use the base the head was trained "
                         "on, or train the head (LoraXSConfig.trainable)")
    say("rebuilding the adapted model (A, B " + ("from the bases cache)" if args.bases_cache
                                                  else "by SVD of the base kernels)"))
    params = load_adapter(args.adapter, base, bases_cache=args.bases_cache)
    say(f"writing {args.format} to {args.out}")
    if args.format == "peft":
        if args.no_head:
            cfg = dataclasses.replace(cfg, trainable=())
        out = export_peft(params, config, args.out, cfg, max_rank=args.max_rank,
                          base_model_name_or_path=args.base_name or str(Path(args.base).resolve()),
                          metadata={"source_adapter": str(args.adapter),
                                    "base_fingerprint": info["base_fingerprint"]})
    elif args.format == "hf":
        if source.suffix == ".gguf":
            from gguf import GGUFReader

            from loraxs_jax.models.gguf import gguf_tokenizer

            tokenizer, base_config = gguf_tokenizer(GGUFReader(str(source))), None
        else:
            tokenizer = base_config = source
            if not has_tokenizer(source):
                say(f"{source} holds no tokenizer: the folder will hold the model alone")
                tokenizer = None
        out = export_hf(params, config, args.out, tokenizer=tokenizer, base_config=base_config,
                        dtype=args.dtype)
    else:
        out = export_gguf(params, config, args.out, tokenizer=source, quant=args.quant)
    say(f"done: {out}")
    return out


def run_import(args: argparse.Namespace) -> Path:
    ckpt = Path(args.checkpoint)
    weights = ckpt / "adapter_model.safetensors"
    head = _shape(weights, _OFFICIAL_HEADS) if weights.is_file() else None
    config, base, _ = load_base(args.base, num_labels=head[0] if head else args.num_labels,
                                head=args.head)
    say(f"importing {ckpt}")
    _, cfg = import_official(ckpt, base, config, save_to=args.out)
    out = Path(args.out)
    say(f"done: {out / 'adapter.safetensors'} (rank {cfg.rank}, α {cfg.alpha}) and its bases in "
        f"{out / 'bases'}; load with loraxs_jax.load_adapter(adapter, base, "
        f"bases_cache='{out / 'bases'}')")
    return out


def _export_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=("peft", "hf", "gguf"),
                   help="peft: a PEFT/vLLM LoRA folder; hf: a merged transformers folder; "
                        "gguf: a merged llama.cpp file")
    p.add_argument("--adapter", required=True, help="our adapter file (save_adapter)")
    p.add_argument("--base", required=True, help="the base model: HF folder or .gguf file")
    p.add_argument("--out", required=True, help="folder (peft, hf) or .gguf file to write")
    p.add_argument("--bases-cache", help="bases cache folder (required for imported adapters)")
    p.add_argument("--head", choices=encoder.HEADS,
                   help="the encoder head the adapter was trained with (default: the run's "
                        "config.json beside the adapter, model.head)")
    p.add_argument("--no-head", action="store_true",
                   help="peft: export the LoRA alone, without the trained head (a 'mean' head "
                        "has no transformers class)")
    p.add_argument("--max-rank", type=int, default=VLLM_MAX_LORA_RANKS[-1],
                   help="peft: refuse a higher rank (vLLM serves up to its --max-lora-rank)")
    p.add_argument("--base-name", help="peft: base_model_name_or_path (default: --base)")
    p.add_argument("--dtype", help="hf: weight dtype, e.g. bfloat16 (default: the base's)")
    p.add_argument("--quant", default="f32", choices=TYPES, help="gguf: matrix type")
    p.set_defaults(run=run_export)


def _import_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="an official LoRA-XS adapter folder (MohammadrezaBanaei/LoRA-XS)")
    p.add_argument("--base", required=True, help="the base model it was trained on")
    p.add_argument("--out", required=True,
                   help="folder for our adapter.safetensors and its bases cache")
    p.add_argument("--num-labels", type=int, default=2,
                   help="encoder head size when the checkpoint holds no head")
    p.add_argument("--head", default="cls", choices=encoder.HEADS)
    p.set_defaults(run=run_import)


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, NotImplementedError, KeyError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m loraxs_jax.interop {export,import-official} ...``."""
    parser = argparse.ArgumentParser(prog="python -m loraxs_jax.interop",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _export_parser(sub.add_parser("export", help="our adapter -> PEFT / HF / GGUF"))
    _import_parser(sub.add_parser("import-official", help="official LoRA-XS -> our adapter"))
    return _run(parser, argv)


def export_main(argv: Sequence[str] | None = None) -> int:
    """``loraxs-export {peft,hf,gguf} ...``."""
    parser = argparse.ArgumentParser(prog="loraxs-export", description="our adapter -> "
                                     "PEFT / Hugging Face / GGUF")
    _export_parser(parser)
    return _run(parser, argv)


def import_main(argv: Sequence[str] | None = None) -> int:
    """``loraxs-import --checkpoint ... --base ... --out ...``."""
    parser = argparse.ArgumentParser(prog="loraxs-import",
                                     description="official LoRA-XS checkpoint -> our adapter")
    _import_parser(parser)
    return _run(parser, argv)
