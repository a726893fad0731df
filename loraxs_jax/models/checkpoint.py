"""Reading Hugging Face checkpoint folders tensor by tensor.

A folder holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. We parse safetensors ourselves (an 8-byte header length, a JSON
header, then raw little-endian data) and memory-map the files, so a tensor is read only when asked
for and bfloat16 works without torch (numpy has no bfloat16; ``ml_dtypes`` does). A hub id is
passed to ``huggingface_hub.snapshot_download`` for users who have a hub; here there is none.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def resolve(path_or_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as is; anything else is taken as a hub id and downloaded (if a hub exists)."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ValueError(f"{p} is a file; expected a checkpoint folder with config.json")
    text = str(path_or_id)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"checkpoint folder {p} does not exist (and {text!r} is not a hub id)")
    from huggingface_hub import snapshot_download  # only when a hub is in play

    try:
        local = snapshot_download(text, revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"])
    except Exception as e:  # offline, unknown repo, ...
        raise FileNotFoundError(f"{text!r} is not a local folder and the hub could not serve it: {e}") from e
    return Path(local)


class SafetensorsFile:
    """One memory-mapped safetensors file: ``keys()``, ``shape(name)``, ``get(name)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._base = 8 + n

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        e = self._entries[name]
        if e["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")
        dt = np.dtype(_DTYPES[e["dtype"]])
        start, end = e["data_offsets"]
        arr = np.frombuffer(self._mm, dtype=dt, count=(end - start) // dt.itemsize,
                            offset=self._base + start)
        return arr.reshape(e["shape"])


class Checkpoint:
    """A Hugging Face model folder: its config and lazily read tensors.

    ``Checkpoint(path).get(name)`` returns a read-only numpy view (PyTorch layout: Linear weights
    are (out, in)); converting and placing each tensor is the model loader's job.
    """

    def __init__(self, path_or_id: str | os.PathLike, revision: str | None = None):
        self.folder = resolve(path_or_id, revision)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        self._where: dict[str, Path] = {}
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._where = {k: self.folder / v for k, v in weight_map.items()}
        elif single.exists():
            self._where = {k: single for k in SafetensorsFile(single).keys()}
        else:
            found = sorted(x.name for x in self.folder.glob("*.safetensors"))
            if len(found) == 1:
                f = self.folder / found[0]
                self._where = {k: f for k in SafetensorsFile(f).keys()}
            else:
                raise FileNotFoundError(
                    f"{self.folder} has no model.safetensors or model.safetensors.index.json "
                    f"(safetensors files there: {found or 'none'}; .bin/.pt checkpoints are not read: "
                    "convert them with safetensors first)")
        self._files: dict[Path, SafetensorsFile] = {}

    @property
    def config_path(self) -> Path:
        return self.folder / "config.json"

    def config(self):
        """The transformers config (transformers 5 serves configs without torch)."""
        from transformers import AutoConfig

        if not self.config_path.exists():
            raise FileNotFoundError(f"{self.folder} has no config.json")
        return AutoConfig.from_pretrained(str(self.folder))

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            raise KeyError(f"tensor {name!r} is not in checkpoint {self.folder}")
        path = self._where[name]
        if path not in self._files:
            self._files[path] = SafetensorsFile(path)
        return self._files[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get(name)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for k in self._where:
            yield k, self.get(k)
