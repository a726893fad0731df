"""The engine behind the server and the batch scorer: one base model, its tokenizer and an
adapter bank; it runs one batch of rows, each naming its adapter.

Shapes are bucketed so a server compiles a handful of programs, not one per request: the rows
are padded to a power of two (extra rows run the base model on one pad token and are dropped),
sequences to a multiple of 16 (left padding for generation, right padding for classification)
and ``max_new_tokens`` to a power of two (each row is cut at its own ``max_tokens``).

Errors the caller can fix raise ``RequestError`` with an HTTP status (404 unknown adapter,
413 too large, 422 bad value); the server turns them into 4xx answers.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from loraxs_jax.config import LoraXSConfig
from loraxs_jax.io import adapter_info
from loraxs_jax.serving import rows
from loraxs_jax.serving.bank import (
    BASE,
    NAME,
    SHARED_FIELDS,
    AdapterBank,
    AdapterDirectory,
    BankError,
)

KINDS = ("encoder", "decoder")


class RequestError(ValueError):
    """A request the server refuses: ``status`` is the HTTP code, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def bucket(n: int, multiple: int = 1) -> int:
    """The padded size for ``n``: the next power of two (``multiple=1``), or the next multiple."""
    if multiple > 1:
        return -(-max(n, 1) // multiple) * multiple
    return 1 << max(0, (max(n, 1) - 1).bit_length())


def bank_config(folder: str | os.PathLike) -> LoraXSConfig:
    """The bank config for a folder of adapter files: their shared fields (targets, bases
    options, head) must agree; the bank's rank is the largest rank among them."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise BankError(f"no adapter files (*.safetensors) in {folder}: give the folder the "
                        "adapters were saved into, or --rank and --targets")
    cfgs = [adapter_info(f)["config"] for f in files]
    first = cfgs[0].to_dict()
    for f, c in zip(files, cfgs):
        d = c.to_dict()
        bad = [k for k in SHARED_FIELDS if d[k] != first[k]]
        if bad:
            raise BankError(f"{f.name} and {files[0].name} differ in {bad}: one bank serves "
                            "adapters of one base and one bases config")
    ranks = [c.rank for c in cfgs]
    if all(isinstance(r, int) for r in ranks):
        return dataclasses.replace(cfgs[0], rank=max(ranks))
    if any(r != ranks[0] for r in ranks):
        raise BankError(f"adapters in {folder} have per-target ranks that differ; give --rank")
    return cfgs[0]


@dataclasses.dataclass
class Engine:
    """Runs batches of rows for one base model and its bank.

    kind: "encoder" (classification, per-adapter heads) or "decoder" (completion).
    model: the linen module; config: its architecture config (``model.config``).
    tokenizer: a transformers tokenizer.
    bank: the ``AdapterBank``.
    max_prompt_tokens: longest tokenized input accepted (413 beyond).
    max_new_tokens: largest ``max_tokens`` a completion may ask for (413 beyond).
    eos_token_id: ids that end a completion (default: the tokenizer's EOS).
    """

    kind: str
    model: Any
    tokenizer: Any
    bank: AdapterBank
    max_prompt_tokens: int = 512
    max_new_tokens: int = 256
    eos_token_id: Sequence[int] | None = None
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: expected one of {KINDS}")
        if self.eos_token_id is None and self.tokenizer.eos_token_id is not None:
            self.eos_token_id = (int(self.tokenizer.eos_token_id),)
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                          else (self.eos_token_id or (0,))[0])
        self._calls = 0
        if self.kind == "encoder":
            self._classify = jax.jit(functools.partial(rows.encoder_logits, self.model))

    # ----------------------------------------------------------------------------- adapters
    def check_adapter(self, name: str) -> None:
        """404 unless ``name`` is resident or its source has it."""
        if name == BASE or name in self.bank:
            return
        src = self.bank.source
        if not NAME.match(str(name)) or src is None or name not in src:
            raise RequestError(404, f"unknown adapter {name!r}: not loaded and not in the "
                                    f"adapter directory (GET /v1/adapters lists them)")

    def available(self) -> list[str]:
        src = self.bank.source
        return sorted(set(self.bank.resident) | set(src.names() if src is not None else ()))

    def load(self, name: str) -> int:
        if not isinstance(name, str) or not NAME.match(name):
            raise RequestError(422, f"adapter name {name!r} is not valid")
        self.check_adapter(name)
        try:
            return self.bank.load(name)
        except BankError as e:
            raise RequestError(409 if "do not fit" in str(e) else 422, str(e)) from None

    def unload(self, name: str) -> None:
        if name not in self.bank:
            raise RequestError(404, f"adapter {name!r} is not loaded")
        try:
            self.bank.unload(name)
        except BankError as e:
            raise RequestError(422, str(e)) from None

    def _slots(self, names: Sequence[str]) -> np.ndarray:
        try:
            return self.bank.ensure(names)
        except BankError as e:
            raise RequestError(404 if "unknown adapter" in str(e) else 409, str(e)) from None

    def chunks(self, names: Sequence[str]) -> list[list[int]]:
        """Row indices split so that no chunk needs more distinct adapters than the bank has
        unpinned slots."""
        room = self.bank.capacity - len(self.bank.pinned)
        out, seen = [[]], set()
        for i, n in enumerate(names):
            if n not in self.bank.pinned and n not in seen and len(seen) >= room:
                out.append([])
                seen = set()
            if n not in self.bank.pinned:
                seen.add(n)
            out[-1].append(i)
        return out

    # ----------------------------------------------------------------------------- encoder
    def tokenize(self, texts: Sequence[str], left: bool) -> tuple[np.ndarray, np.ndarray]:
        """(B, T) ids and mask, T a multiple of 16; 413 when a text is too long."""
        enc = self.tokenizer(list(texts), add_special_tokens=self.kind == "encoder")
        lengths = [len(x) for x in enc["input_ids"]]
        if max(lengths) > self.max_prompt_tokens:
            i = int(np.argmax(lengths))
            raise RequestError(413, f"input {i} is {lengths[i]} tokens; this server accepts at "
                                    f"most {self.max_prompt_tokens}")
        if min(lengths) == 0:
            raise RequestError(422, "an input is empty (no tokens)")
        t = min(bucket(max(lengths), 16), max(self.max_prompt_tokens, max(lengths)))
        ids = np.full((len(texts), t), self.pad_id, np.int32)
        mask = np.zeros((len(texts), t), np.int32)
        for b, x in enumerate(enc["input_ids"]):
            sl = slice(t - len(x), t) if left else slice(0, len(x))
            ids[b, sl], mask[b, sl] = x, 1
        return ids, mask

    def _padded(self, slots: np.ndarray, ids: np.ndarray, mask: np.ndarray, left: bool):
        """Rows padded to a power of two with base-model rows holding one pad token."""
        b, t = ids.shape
        n = bucket(b)
        s = np.zeros(n, np.int32)
        s[:b] = slots
        ids2 = np.full((n, t), self.pad_id, np.int32)
        mask2 = np.zeros((n, t), np.int32)
        ids2[:b], mask2[:b] = ids, mask
        mask2[b:, -1 if left else 0] = 1
        return jnp.asarray(s), jnp.asarray(ids2), jnp.asarray(mask2)

    def classify(self, names: Sequence[str], texts: Sequence[str]) -> list[dict[str, Any]]:
        """Per row: {'logits', 'probs' (softmax; for one label: the regression value alone),
        'label' (argmax)}."""
        if self.kind != "encoder":
            raise RequestError(400, "this server runs a decoder: use /v1/completions")
        out: list[dict[str, Any]] = [{}] * len(names)
        for chunk in self.chunks(names):
            slots = self._slots([names[i] for i in chunk])
            ids, mask = self.tokenize([texts[i] for i in chunk], left=False)
            logits = np.asarray(self._classify(self.bank.arrays(),
                                               *self._padded(slots, ids, mask, left=False)))
            for j, i in enumerate(chunk):
                z = logits[j].astype(np.float64)
                p = np.exp(z - z.max())
                out[i] = {"logits": z.tolist(), "label": int(np.argmax(z)),
                          "probs": (p / p.sum()).tolist() if z.size > 1 else None}
        return out

    # ----------------------------------------------------------------------------- decoder
    def complete(self, names: Sequence[str], prompts: Sequence[str], max_tokens: Sequence[int],
                 temperature: float = 0.0, top_p: float | None = None,
                 top_k: int | None = None) -> list[dict[str, Any]]:
        """Per row: {'text', 'tokens' (generated ids), 'finish_reason' ('stop' at EOS, else
        'length'), 'prompt_tokens'}; rows share the sampling settings."""
        if self.kind != "decoder":
            raise RequestError(400, "this server runs an encoder: use /v1/classify")
        if max(max_tokens) > self.max_new_tokens or min(max_tokens) < 1:
            raise RequestError(413, f"max_tokens must be in [1, {self.max_new_tokens}]")
        out: list[dict[str, Any]] = [{}] * len(names)
        for chunk in self.chunks(names):
            slots = self._slots([names[i] for i in chunk])
            ids, mask = self.tokenize([prompts[i] for i in chunk], left=True)
            self._calls += 1
            new = rows.generate(self.model, self.bank.arrays(),
                                *self._padded(slots, ids, mask, left=True),
                                max_new_tokens=bucket(max(max_tokens[i] for i in chunk)),
                                temperature=float(temperature), top_p=top_p, top_k=top_k,
                                rng=jax.random.key(self.seed * 1_000_003 + self._calls),
                                eos_token_id=self.eos_token_id, pad_token_id=self.pad_id)
            new = np.asarray(new)
            for j, i in enumerate(chunk):
                toks = new[j, :max_tokens[i]].tolist()
                stop = next((k for k, t in enumerate(toks) if t in (self.eos_token_id or ())),
                            None)
                if stop is not None:
                    toks = toks[:stop]
                out[i] = {"tokens": toks, "finish_reason": "stop" if stop is not None else "length",
                          "text": self.tokenizer.decode(toks, skip_special_tokens=True),
                          "prompt_tokens": int(mask[j].sum())}
        return out


def load_engine(model_path: str, adapters: str, *, kind: str | None = None, capacity: int = 64,
                num_labels: int = 2, head: str = "mean", rank: int | None = None,
                dtype: str = "float32", **engine_options: Any) -> Engine:
    """An Engine from files: a base model (a Hugging Face folder of BERT/RoBERTa/Llama/Mistral/
    Qwen2/Gemma, or a Llama GGUF file), a folder of adapter files (the bank's config comes from
    them: ``bank_config``), ``capacity`` device slots."""
    from transformers import AutoTokenizer

    from loraxs_jax.models import decoder, encoder

    path = Path(model_path)
    dt = jnp.dtype(dtype)
    if path.suffix == ".gguf":
        from loraxs_jax.models.gguf import load_gguf

        kind = kind or "decoder"
        config, params, tokenizer = load_gguf(path, dtype=dt, param_dtype=dt)
        model = decoder.DecoderForCausalLM(config)
    else:
        if kind is None:
            import json

            mt = json.loads((path / "config.json").read_text()).get("model_type")
            kind = "encoder" if mt in encoder.SUPPORTED_MODEL_TYPES else "decoder"
        tokenizer = AutoTokenizer.from_pretrained(path)
        if kind == "encoder":
            config, params = encoder.load_encoder(path, num_labels=num_labels, head=head, dtype=dt)
            model = encoder.Encoder(config)
        else:
            config, params = decoder.load_decoder(path, dtype=dt, param_dtype=dt)
            model = decoder.DecoderForCausalLM(config)
    cfg = bank_config(adapters)
    if rank is not None:
        cfg = dataclasses.replace(cfg, rank=rank)
    bank = AdapterBank(params, cfg, capacity, source=AdapterDirectory(adapters))
    return Engine(kind, model, tokenizer, bank, **engine_options)
