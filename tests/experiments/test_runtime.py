"""The config's ``runtime`` section (host devices, XLA flags, compilation cache) and the console
a user sees: ``train.py`` applies the section before JAX starts, shows the progress bar, one
line per evaluation and the summary, and sends every library log line to workdir/log.txt."""

import re
import subprocess
import sys

import pytest

from loraxs_jax.experiments import runtime
from loraxs_jax.experiments.validate import ConfigError, resume_changes, validate


@pytest.mark.parametrize("field,value,message", [
    ("runtime.host_devices", -1, "config.runtime.host_devices=-1: expected an int >= 0"),
    ("runtime.host_devices", 1.5, "expected an int >= 0"),
    ("runtime.xla_flags", "xla_cpu_enable_fast_math", "'xla_cpu_enable_fast_math' is not one"),
    ("runtime.xla_flags", 3, "space-separated --xla_... flags"),
    ("runtime.compile_cache", None, "a folder path"),
])
def test_bad_runtime_values_are_refused_by_name(load_config, with_values, field, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(with_values(load_config("configs/minilm_sst2.py"), **{field: value}))


def test_unknown_runtime_field_is_refused_with_the_fields(load_config, with_values):
    c = load_config("configs/minilm_sst2.py").to_dict()
    c["runtime"]["host_device"] = 2
    import ml_collections

    with pytest.raises(ConfigError, match=r"'runtime.host_device' is no field \(did you mean "
                                          r"'runtime.host_devices'\?\).*compile_cache"):
        validate(ml_collections.ConfigDict(c))


def test_runtime_may_change_on_resume(load_config, tmp_path):
    c = load_config("configs/minilm_sst2.py")
    (tmp_path / "config.json").write_text(c.to_json_best_effort())
    c.runtime.host_devices, c.runtime.compile_cache = 1, ""
    assert resume_changes(tmp_path, c) == {}


def test_configure_after_start_refuses_a_different_device_count():
    import jax

    jax.devices()                                  # the test session's backend has started
    with pytest.raises(RuntimeError, match="must run first"):
        runtime.configure({"host_devices": jax.device_count() + 1})
    assert runtime.configure({"host_devices": jax.device_count()}) == {}


def test_console_is_the_bar_one_line_per_eval_and_the_summary(repo, tiny_bert, tmp_path):
    """The demo's console contract, through the program: no library INFO line on stdout or
    stderr, ``step N/T: accuracy=...`` once per evaluation, the summary; every log line in
    workdir/log.txt; the runtime section reached JAX (two host devices, the cache folder)."""
    cache, workdir = tmp_path / "cache", tmp_path / "run"
    argv = [sys.executable, str(repo / "train.py"),
            f"--config={repo}/configs/minilm_sst2.py:rank=4", f"--config.model.path={tiny_bert}",
            "--config.task.train_limit=64", "--config.task.eval_limit=32",
            "--config.batch_size=16", "--config.num_train_steps=4",
            "--config.eval_every_steps=2", "--config.log_every_steps=1",
            "--config.eval_batch_size=32", f"--config.runtime.compile_cache={cache}",
            f"--workdir={workdir}"]
    p = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout.splitlines()
    evals = [line for line in out if re.match(r"step \d+/4: accuracy=\d\.\d{4} \(best", line)]
    assert [e.split(":")[0] for e in evals] == ["step 2/4", "step 4/4"]
    assert any(re.match(r"\s+final_accuracy\s+\d\.\d{4}$", line) for line in out)
    for stream in (p.stdout, p.stderr):
        assert not re.search(r"\bINFO\b|absl|orbax|Traceback", stream), stream[-2000:]
    bar = p.stderr.replace("\r", "\n")
    assert "4/4" in bar and ("step/s" in bar or "s/step" in bar)
    log = (workdir / "log.txt").read_text()
    assert "INFO absl:" in log and "step 2/4: accuracy=" in log
    assert "over 2 devices" in log                       # runtime.host_devices=2 (the demo's)
    assert any(cache.iterdir())                          # runtime.compile_cache
