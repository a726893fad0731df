"""Reading Hugging Face checkpoint folders tensor by tensor.

A folder holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Tensors are read one at a time with ``safetensors``' own numpy
API (bfloat16 included, no torch), so a 7B checkpoint never sits in host memory whole. A hub id is
passed to ``huggingface_hub.snapshot_download`` for users who have a hub; here there is none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' reader needs)
import numpy as np
from safetensors import safe_open


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


class HFFolder:
    """A Hugging Face model folder: its config and lazily read tensors.

    ``HFFolder(path).get(name)`` returns a numpy array (PyTorch layout: Linear weights are
    (out, in)); converting and placing each tensor is the model loader's job.
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
            self._where = {k: single for k in _keys(single)}
        else:
            found = sorted(x.name for x in self.folder.glob("*.safetensors"))
            if len(found) == 1:
                f = self.folder / found[0]
                self._where = {k: f for k in _keys(f)}
            else:
                raise FileNotFoundError(
                    f"{self.folder} has no model.safetensors or model.safetensors.index.json "
                    f"(safetensors files there: {found or 'none'}; .bin/.pt checkpoints are not read: "
                    "convert them with safetensors first)")
        self._files: dict[Path, object] = {}

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

    def _file(self, name: str):
        if name not in self._where:
            raise KeyError(f"tensor {name!r} is not in checkpoint {self.folder}")
        path = self._where[name]
        if path not in self._files:
            self._files[path] = safe_open(path, framework="numpy")
        return self._files[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get_tensor(name)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for k in self._where:
            yield k, self.get(k)


def _keys(path: Path) -> list[str]:
    with safe_open(path, framework="numpy") as f:
        return list(f.keys())
