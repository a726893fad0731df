"""What the command-line programs share: the --config flag, config loading, start-up.

An experiment config is a Python file (``configs/*.py``) whose ``get_config(arg)`` returns an
ml-collections ``ConfigDict``; ``--config=configs/glue.py:task=rte,rank=25`` passes the text after
the colon as ``arg`` and ``--config.optim.lr=2e-3`` overrides any field (ml-collections'
``config_flags``). A config file may import its siblings as ``configs.<name>``: the folder above
the config's folder is put on ``sys.path`` first, so configs load the same from the repository,
from an installed package (``loraxs-train``) or from any working directory.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections


def make_importable(config_path: str) -> None:
    """Put the folder above a config file's folder on ``sys.path`` (``configs.<sibling>``)."""
    root = str(Path(config_path).expanduser().resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``"configs/glue.py:task=rte,rank=25"`` → that file's ``get_config("task=rte,rank=25")``
    (what ``--config=`` loads, without command-line overrides)."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    make_importable(path)
    name = f"_loraxs_config_{Path(path).stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def define_config_flag() -> None:
    """``--config=FILE[:args]`` plus ``--config.<field>=value`` overrides."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py[:args])")


def run(main: Callable[[Sequence[str]], None], argv: Sequence[str] | None = None,
        errors: tuple[type[BaseException], ...] = ()) -> None:
    """``absl.app.run(main)``, with the --config file's siblings importable. ``errors`` are a
    user's mistakes whose messages say the fix (a bad config, a bad file, a NaN stop): they end
    the program with ``error: <message>`` and status 1, not a traceback."""
    from absl import app

    argv = list(sys.argv if argv is None else argv)
    importable_configs(argv)

    def guarded(args):
        try:
            main(args)
        except errors as e:
            raise SystemExit(f"error: {e}") from None

    app.run(guarded, argv=argv)


def importable_configs(argv: Sequence[str]) -> None:
    """``make_importable`` for the file of a ``--config=FILE[:args]`` argument, if any."""
    for a in argv:
        if a.startswith("--config="):
            make_importable(a.split("=", 1)[1].split(":", 1)[0])


def start(config: ml_collections.ConfigDict | None = None) -> None:
    """First thing in a program: validate ``config`` and apply its ``runtime`` section (host
    devices, XLA flags, compilation cache: :mod:`~loraxs_jax.experiments.runtime`) before JAX
    starts, join a multi-process job if the environment describes one, and set up a quiet
    console (:func:`quiet_console`)."""
    from loraxs_jax.parallel import maybe_initialize_distributed

    if config is not None:
        from loraxs_jax.experiments import runtime
        from loraxs_jax.experiments.validate import validate

        validate(config)
        runtime.configure(config.runtime)
    maybe_initialize_distributed()
    quiet_console()


def _for_console(record: logging.LogRecord) -> bool:
    ours = record.name.split(".")[0] in ("loraxs", "loraxs_jax")
    return record.levelno >= (logging.WARNING if ours else logging.ERROR)


def quiet_console() -> None:
    """Log everything at INFO, but show on the console only our warnings and anyone's errors:
    the progress bar, the evaluation lines and the summary stay readable, and the libraries'
    INFO lines (orbax writes ~20 per checkpoint) go to the run's log.txt
    (``reporting.run_log``). absl's and transformers' own console handlers are replaced;
    Python warnings are logged, not printed."""
    from absl import logging as absl_logging
    from transformers.utils import logging as hf_logging

    root = logging.getLogger()
    root.removeHandler(absl_logging.get_absl_handler())
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    console = logging.StreamHandler()
    console.addFilter(_for_console)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(console)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
