"""Import shim: load gemma==3.3.0's linen Gemma model without tensorflow (written for our
third-party test; see tests/third_party/test_gemma.py).

Why it is needed:
  * gemma's model modules import `kauldron.typing` / `kauldron.kontext` /
    `kauldron.kd`; `kauldron/typing/array_types.py:25` does a top-level
    `import tensorflow as tf`, used only for `tf.Tensor` in TfArray aliases.
  * `gemma/gm/nn/_gemma.py:21` (the Gemma2/Gemma3 preset classes) does
    `from gemma.gm.ckpts import _paths`, which runs `gemma/gm/ckpts/__init__.py`
    -> `kd.train` -> `clu.metric_writers` -> tensorboard/tensorflow, and
    `kd.ckpts.AbstractPartialLoader` (gone in kauldron>=1.4.0).

What it does:
  1. puts a tiny fake `tensorflow` module (only `Tensor`) in sys.modules,
  2. imports the kauldron + gemma leaf modules the model needs (including the
     ones gemma resolves lazily at trace time: kauldron.modules for
     `kd.nn.Identity`, kauldron.utils.sharding_utils for `kd.sharding`),
  3. imports `gemma.gm.nn._gemma` (presets) through a hollow `gemma.gm.ckpts`
     package so that only `gemma/gm/ckpts/_paths.py` (pure enum) runs,
  4. removes the fake tensorflow and the hollow package from sys.modules again,
     so nothing else (transformers, etils.enp, orbax...) believes TF exists.

Usage:
    import gemma_shim
    nn_mods = gemma_shim.load()   # SimpleNamespace(transformer, config, modules, layers, gemma)
    # after load(), `from gemma import gm; gm.nn.Transformer / gm.nn.Gemma3_1B` also work.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

_LOADED = None


def _fake_tensorflow() -> types.ModuleType:
    tf = types.ModuleType("tensorflow")

    class Tensor:  # only used in isinstance()/jaxtyping aliases by kauldron
        pass

    tf.Tensor = Tensor
    return tf


def load() -> types.SimpleNamespace:
    global _LOADED
    if _LOADED is not None:
        return _LOADED

    had_tf = "tensorflow" in sys.modules
    if not had_tf:
        sys.modules["tensorflow"] = _fake_tensorflow()
    try:
        # kauldron pieces used by the model path (eagerly, while the stub is in place).
        importlib.import_module("kauldron.typing")
        importlib.import_module("kauldron.kontext")
        importlib.import_module("kauldron.modules")  # kd.nn.Identity (gemma/gm/nn/_modules.py:164)
        importlib.import_module("kauldron.utils.sharding_utils")  # kd.sharding (_transformer.py:328)

        # gemma leaf modules.
        layers = importlib.import_module("gemma.gm.nn._layers")
        modules = importlib.import_module("gemma.gm.nn._modules")
        config = importlib.import_module("gemma.gm.nn._config")
        transformer = importlib.import_module("gemma.gm.nn._transformer")

        # Presets (Gemma3_1B, GEMMA3_ATTENTION_PATTERN...) via a hollow gemma.gm.ckpts.
        import gemma.gm as _gm_pkg  # noqa: F401  (lazy API module, cheap)

        hollow_name = "gemma.gm.ckpts"
        real_ckpts = sys.modules.get(hollow_name)
        if real_ckpts is None:
            hollow = types.ModuleType(hollow_name)
            hollow.__path__ = [os.path.join(os.path.dirname(_gm_pkg.__file__), "ckpts")]
            sys.modules[hollow_name] = hollow
        try:
            gemma_presets = importlib.import_module("gemma.gm.nn._gemma")
        finally:
            if real_ckpts is None:
                sys.modules.pop(hollow_name, None)
                sys.modules.pop(hollow_name + "._paths", None)
    finally:
        if not had_tf:
            sys.modules.pop("tensorflow", None)

    _LOADED = types.SimpleNamespace(
            layers=layers,
            modules=modules,
            config=config,
            transformer=transformer,
            gemma=gemma_presets,
    )
    return _LOADED
