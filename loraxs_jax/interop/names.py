"""Our param trees under Hugging Face (PyTorch) names, for every family we load.

The mapping itself lives beside each loader (``models.encoder.hf_names``,
``models.decoder.hf_names``); this module picks the family's and applies it to whole trees:
a plain tree becomes {HF tensor name: array in PyTorch layout} (kernels (in, out) transposed to
Linear weights (out, in), scanned layers split into one tensor per layer), and the inverse index
says which of our params (and which layer of it) an HF name is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np

from loraxs_jax.models import decoder, encoder
from loraxs_jax.parallel.hosts import to_host
from loraxs_jax.tree import flatten, is_adapted, path_str, unbox

# transformers' task-model classes we export to (the encoder with its classification head)
ARCHITECTURES = {
    "bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification",
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
}
# the top-level module of the base model inside the task model; other top-level modules
# (classifier, lm_head) are the task head
BASE_MODULES = ("bert", "roberta", "model")

NameFn = Callable[[tuple], tuple[list[str], bool]]


def family(config) -> str:
    """"encoder" or "decoder" for our architecture configs; anything else is refused."""
    if isinstance(config, encoder.EncoderConfig):
        return "encoder"
    if isinstance(config, decoder.DecoderConfig):
        return "decoder"
    raise ValueError(f"unknown model family {type(config).__name__}: loraxs-jax exports "
                     f"{', '.join(encoder.SUPPORTED_MODEL_TYPES)} (models.encoder.EncoderConfig) "
                     f"and {', '.join(decoder.SUPPORTED_MODEL_TYPES)} "
                     "(models.decoder.DecoderConfig)")


def hf_names(config) -> NameFn:
    """path -> (HF tensor names, one per stacked layer; transposed?) for this architecture,
    named as in transformers' task model (``bert.encoder...``, ``model.layers...``)."""
    if family(config) == "encoder":
        return lambda path: encoder.hf_names(tuple(map(str, path)), config)
    return lambda path: decoder.hf_names(tuple(map(str, path)), config)


def split_layers(x: np.ndarray, names: list[str], what: str) -> list[np.ndarray]:
    """One array per HF name: ``x`` itself, or its slices along the stacked-layer axis 0."""
    if len(names) == 1:
        return [x]
    if x.shape[0] != len(names):
        raise ValueError(f"{what} has shape {x.shape}: expected {len(names)} stacked layers on "
                         "axis 0")
    return list(x)


def torch_tensors(params: Mapping, config) -> dict[str, np.ndarray]:
    """A plain (merged) param tree -> {HF tensor name: host array in PyTorch layout}; the inverse
    of the loaders (``decoder.load_params``, ``encoder.load_encoder``)."""
    if is_adapted(params):
        raise ValueError("these params still carry LoRA-XS leaves: merge them first "
                         "(loraxs_jax.merge)")
    names_of = hf_names(config)
    out = {}
    for path, leaf in flatten(params).items():
        names, transpose = names_of(path)
        x = np.asarray(to_host(unbox(leaf)))
        for name, part in zip(names, split_layers(x, names, path_str(path))):
            out[name] = np.ascontiguousarray(part.T if transpose else part)
    return out


def hf_index(params: Mapping, config) -> dict[str, tuple[tuple, int | None, bool]]:
    """{HF tensor name: (our param path, layer index when stacked else None, transposed?)}."""
    names_of = hf_names(config)
    out = {}
    for path in flatten(params):
        names, transpose = names_of(path)
        for i, name in enumerate(names):
            out[name] = (path, i if len(names) > 1 else None, transpose)
    return out


def module_of(tensor_name: str) -> str:
    """"bert.pooler.dense.weight" -> "bert.pooler.dense"."""
    return tensor_name.rsplit(".", 1)[0]


def ancestors(names: Iterable[str]) -> set[str]:
    """Every module a set of tensor names lives in, containers included."""
    out = set()
    for n in names:
        parts = n.split(".")
        out |= {".".join(parts[:k]) for k in range(1, len(parts))}
    return out


def suffix_patterns(chosen: Iterable[str], modules: Iterable[str]) -> list[str]:
    """The shortest dotted suffixes that select exactly ``chosen`` among ``modules`` by PEFT's
    ``target_modules`` rule (a module matches ``s`` when its name is ``s`` or ends in ``.s``):
    ["query", "value", "output.dense"] for the paper's four BERT targets."""
    chosen, modules = set(chosen), set(modules) | set(chosen)
    out = set()
    for name in chosen:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            s = ".".join(parts[-k:])
            if all(m in chosen for m in modules if m == s or m.endswith("." + s)):
                out.add(s)
                break
    return sorted(out)
