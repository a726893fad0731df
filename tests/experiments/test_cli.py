"""The programs as an installed package runs them: a wheel of this repository in a fresh venv,
``loraxs-train``/``loraxs-eval`` started from a directory outside the repository, with a config
file that imports its siblings; and bad ``key=value`` arguments refused before anything loads."""

import json
import shutil
import subprocess
import sys
import sysconfig

import pytest

from loraxs_jax.experiments.cli import load_config

TINY = ["--config.task.train_limit=64", "--config.task.eval_limit=32", "--config.batch_size=16",
        "--config.num_train_steps=2", "--config.eval_every_steps=2", "--config.log_every_steps=1",
        "--config.eval_batch_size=32", "--config.checkpoint_every_steps=2"]


@pytest.fixture(scope="module")
def installed(repo, tmp_path_factory):
    """A venv holding a wheel of this repository (its dependencies come from the test venv
    through a .pth file, so nothing is downloaded): the bin/ folder of its console scripts."""
    root = tmp_path_factory.mktemp("installed")
    src = root / "src"                    # a copy: building writes build/ beside the sources
    shutil.copytree(repo / "loraxs_jax", src / "loraxs_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(root / "dist"), str(src)], check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")],
                   check=True)
    venv_py = root / "venv" / "bin" / "python"
    site = subprocess.run([str(venv_py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True).stdout
    (root / site.strip()).joinpath("_deps.pth").write_text(sysconfig.get_paths()["purelib"])
    wheel = next((root / "dist").glob("loraxs_jax-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv_py), "install", "-q",
                    "--no-deps", str(wheel)], check=True, capture_output=True)
    return root / "venv" / "bin"


def _run(cmd, cwd):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_installed_programs_run_outside_the_repository(installed, repo, tiny_bert, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(installed / "python"), "-c", "import loraxs_jax; print(loraxs_jax.__file__)"],
                 elsewhere)
    assert str(installed.parent) in where.stdout          # the wheel's copy, not the repository's
    # gemma_math.py imports its sibling configs.mistral_math: the loader makes that work
    config = repo / "configs" / "minilm_sst2.py"
    train = _run([str(installed / "loraxs-train"), f"--config={config}:rank=4",
                  f"--config.model.path={tiny_bert}", "--workdir=run", *TINY], elsewhere)
    assert train.returncode == 0, train.stderr[-3000:]
    summary = json.loads((elsewhere / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["rank"] == 4 and summary["trainable_params"] == 128
    ev = _run([str(installed / "loraxs-eval"), f"--config={config}:rank=4",
               f"--config.model.path={tiny_bert}", "--config.task.eval_limit=32",
               "--adapter=run/adapter.safetensors", "--mode=both", "--out=ev"], elsewhere)
    assert ev.returncode == 0, ev.stderr[-3000:]
    scores = json.loads((elsewhere / "ev" / "scores_merged.json").read_text())
    assert scores == json.loads((elsewhere / "ev" / "scores_adapted.json").read_text())
    assert len((elsewhere / "ev" / "predictions_merged.jsonl").read_text().splitlines()) == 32
    # the demo's head is a mean-pooling one: loraxs-export refuses to put it on [CLS] and
    # exports the LoRA alone when told so
    export = [str(installed / "loraxs-export"), "peft", "--adapter", "run/adapter.safetensors",
              f"--base={tiny_bert}", "--out=peft"]
    refused = _run(export, elsewhere)
    assert refused.returncode == 2 and "mean-pooled tokens" in refused.stderr
    peft = _run([*export, "--no-head"], elsewhere)
    assert peft.returncode == 0, peft.stderr[-3000:]
    assert json.loads((elsewhere / "peft" / "adapter_config.json").read_text())["r"] == 4
    assets = _run([str(installed / "loraxs-assets"), "list"], elsewhere)
    assert assets.returncode == 0 and "minilm" in assets.stdout


def test_a_misspelt_argument_stops_the_program_naming_it(installed, repo, tmp_path):
    out = _run([str(installed / "loraxs-train"), f"--config={repo}/configs/minilm_sst2.py:rnak=4",
                f"--workdir={tmp_path / 'w'}"], tmp_path)
    assert out.returncode != 0
    assert "unknown argument 'rnak' (did you mean 'rank'?)" in out.stderr
    assert not (tmp_path / "w").exists()                  # refused before anything was made


def test_load_config_imports_siblings(repo):
    c = load_config(f"{repo}/configs/gemma_math.py:rank=16")
    assert (c.model.path, c.loraxs.rank, c.loraxs.alpha) == ("google/gemma-7b", 16, 16.0)
    with pytest.raises(FileNotFoundError, match="config file .*nope.py does not exist"):
        load_config(f"{repo}/configs/nope.py")
