"""How JAX runs on this machine, from the config's ``runtime`` section: applied by the programs
(``train.py``, ``eval.py``) before JAX starts its backend, so nobody hand-sets an environment
variable.

Fields (``defaults.base()``):
  runtime.host_devices   CPU only: split the host into this many XLA devices, so the data axis
                         of the mesh runs a data-parallel step over them (0 = JAX's default, one
                         device). Ignored when an accelerator is present.
  runtime.xla_flags      extra XLA flags (``--xla_cpu_...=...``), appended to ``XLA_FLAGS``.
  runtime.compile_cache  folder of JAX's persistent compilation cache ("" = off): a rerun, or
                         a run of another config with the same shapes, loads its compiled
                         steps instead of compiling them again (the demo's first steps were a
                         compile per length bucket). ``~`` is expanded.

Why these defaults, with measurements: ``benchmarks/results/vs_torch.md``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("loraxs")

DEFAULT_CACHE = "~/.cache/loraxs_jax/xla_cache"


def check_xla_flags(v: Any) -> str | None:
    """A string of space-separated ``--xla_...`` flags (or empty)."""
    if not isinstance(v, str):
        return "a string of space-separated --xla_... flags"
    bad = [f for f in v.split() if not f.startswith("--xla_")]
    return f"space-separated --xla_... flags ({bad[0]!r} is not one)" if bad else None


def check_cache(v: Any) -> str | None:
    return None if isinstance(v, str) else 'a folder path, or "" for no compilation cache'


def _started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def _has_accelerator() -> bool:
    """A GPU or TPU plugin is installed (then host_devices does not apply). Reads no device."""
    import importlib.util

    return any(importlib.util.find_spec(m) is not None
               for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu", "jax_rocm7_plugin"))


def configure(runtime: Any) -> dict[str, Any]:
    """Apply a config's ``runtime`` section (a ConfigDict or mapping) to JAX; return what was
    set. Call it before anything runs on a device: once the backend started, the device count
    and XLA flags can no longer change, and a request that differs from what runs raises."""
    import jax

    get = runtime.get if hasattr(runtime, "get") else (lambda k, d=None: getattr(runtime, k, d))
    devices, flags = int(get("host_devices", 0)), str(get("xla_flags", ""))
    cache = str(get("compile_cache", ""))
    done: dict[str, Any] = {}
    if cache:
        folder = Path(cache).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(folder))
        # every program, not only those over 1 s to compile: on 2 cores each eager op's
        # compile is tens of milliseconds and a run has hundreds of them
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        done["compile_cache"] = str(folder)
    if _started():
        if devices and jax.default_backend() == "cpu" and jax.device_count() != devices:
            raise RuntimeError(f"runtime.host_devices={devices}, but JAX already started with "
                               f"{jax.device_count()} CPU device(s): configure() must run first")
        if flags and not all(f in os.environ.get("XLA_FLAGS", "") for f in flags.split()):
            raise RuntimeError(f"runtime.xla_flags={flags!r}, but JAX already started without "
                               "them: configure() must run first")
        return done
    if flags:
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), flags]).strip()
        done["xla_flags"] = flags
    if devices and not _has_accelerator():
        jax.config.update("jax_num_cpu_devices", devices)
        done["host_devices"] = devices
    return done


def host_devices() -> int:
    """The number of devices JAX runs on (starts the backend)."""
    import jax

    return jax.device_count()


def demo_runtime() -> Any:
    """The demo's runtime section (``configs/minilm_sst2.py`` in a checkout, else
    ``defaults.base()``'s)."""
    from loraxs_jax.experiments.defaults import base

    demo = Path(__file__).resolve().parents[2] / "configs" / "minilm_sst2.py"
    if demo.is_file():
        from loraxs_jax.experiments.cli import load_config

        return load_config(str(demo)).runtime
    return base().runtime


def configure_cpu_from_default() -> dict[str, Any]:
    """``configure`` with the demo's runtime section: the benchmarks measure what the demo
    runs."""
    return configure(demo_runtime())
