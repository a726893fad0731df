"""Adapter files that hold R alone, base fingerprints, and a per-base cache of the bases.

An adapter is one safetensors file. The R's of all adapted matrices of rank r are stacked into
one tensor ``loraxs_R/r<r>`` of shape (matrices, r, r), so the file is r² × matrices × itemsize
plus a small JSON header; the header's ``__metadata__`` holds the LoraXSConfig, the library
version, the fingerprint of the base kernels and, per rank, how many kernels the rows belong to
and a digest of their paths. Rows follow the kernels' paths in sorted order (a stacked kernel,
e.g. nn.scan layers, contributes one row per matrix); the paths themselves are recomputed from
the config and the base at load time, so the header stays small (hundreds of bytes) however many
matrices are adapted. Extra trainable leaves
(``cfg.trainable``, e.g. a task head) are stored under their own paths. A, B are recomputed
from the base at load time (the config, including ``bases_seed``, determines them), or read
from the bases cache.

Files are untrusted input. Every file we write carries a SHA-256 of its header (less the digest)
and data in its metadata; :func:`read_tensors` checks the declared header length against the
file's size, the JSON header's schema, every tensor's dtype, shape and byte range, and the
digest, before safetensors builds an array, so a truncated, corrupted, renamed or hostile file
raises :class:`AdapterFileError` naming it, in memory and time bounded by the file's own size.
Nothing non-finite is ever written (:func:`save_tensors` refuses NaN/Inf, naming the tensor).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy
from jax.sharding import NamedSharding, PartitionSpec

from loraxs_jax import svd as svd_lib
from loraxs_jax.apply import adapted_geometries, insert
from loraxs_jax.bases import (
    Target,
    compute_bases,
    configured_geometry,
    find_targets,
    matching_kernels,
)
from loraxs_jax.config import LoraXSConfig
from loraxs_jax.geometry import Geometry
from loraxs_jax.parallel.hosts import to_host, write_file
from loraxs_jax.tree import adapter_key, flatten, leaf_role, path_str, unbox, unflatten

FORMAT = "loraxs-jax/adapter-v2"          # v1 files (no digest) are still read
_FORMAT_V1 = "loraxs-jax/adapter-v1"
_BASES_FORMAT = "loraxs-jax/bases-v2"
_SAMPLE = 1024
_R = "loraxs_R/r"
_DIGEST = "sha256"
_MAX_HEADER = 100 * 2**20                  # safetensors' own limit on the JSON header
_NUMPY = {"F16": np.float16, "BF16": ml_dtypes.bfloat16, "F32": np.float32, "F64": np.float64}
_ITEMSIZE = {k: np.dtype(v).itemsize for k, v in _NUMPY.items()}   # we write floats only


class AdapterFileError(ValueError):
    """A file that is not a well-formed file of ours (truncated, corrupted, renamed, hostile or
    made for something else); the message names the file and what is wrong with it."""


def _version() -> str:
    from loraxs_jax import __version__

    return __version__


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                 metadata: Mapping[str, str]) -> Path:
    """One safetensors file (``safetensors.numpy``; bf16 included, no torch) with a SHA-256 of
    its content in the metadata, written by process 0 atomically, then a barrier
    (``parallel.write_file``). A tensor holding NaN or Inf is refused, naming it: a file we
    keep is never poisoned."""
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    for name, v in tensors.items():
        if np.issubdtype(v.dtype, np.inexact) and not np.isfinite(v).all():
            bad = int(v.size - np.isfinite(v).sum())
            raise ValueError(f"refusing to write {path}: tensor {name} holds {bad} NaN/Inf of "
                             f"{v.size} values")
    meta = dict(metadata)
    unsigned = safetensors.numpy.save(tensors, metadata=meta)
    n = int.from_bytes(unsigned[:8], "little")
    meta[_DIGEST] = _digest(json.loads(unsigned[8:8 + n]), memoryview(unsigned)[8 + n:])
    return write_file(path, safetensors.numpy.save(tensors, metadata=meta))


def _digest(header: Mapping[str, Any], data: bytes | memoryview) -> str:
    """SHA-256 of a parsed header (tensor entries and metadata, less the digest itself, as
    canonical JSON) and the data bytes: any changed byte that still parses changes it."""
    meta = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != _DIGEST}
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    h = hashlib.sha256(json.dumps({"tensors": entries, "metadata": meta}, sort_keys=True,
                                  separators=(",", ":")).encode())
    h.update(data)
    return h.hexdigest()


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, checked before any array is made.

    The 8-byte header length must fit the file; the header must be a JSON object of tensor
    entries (a float dtype, a shape of non-negative ints, byte offsets that tile the data region
    exactly and match shape × itemsize) and string metadata; a digest in the metadata must match.
    Memory and time stay bounded by the file's size whatever the header declares.

    Raises:
      FileNotFoundError: no file at ``path``.
      AdapterFileError: anything else wrong, naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no adapter file at {p}")

    def bad(why: str) -> AdapterFileError:
        return AdapterFileError(f"{p}: {why}")

    size = p.stat().st_size
    if size < 8:
        raise bad(f"{size} bytes, too short for a safetensors file (empty or truncated)")
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, _MAX_HEADER) or n < 2:
            raise bad(f"declares a {n:,}-byte header but the file holds {size:,} bytes "
                      "(truncated, or not a safetensors file)")
        f.seek(0)
        blob = f.read()
    if len(blob) != size:
        raise bad("changed size while being read")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"header is not JSON ({type(e).__name__}: {str(e)[:80]}): corrupted, or not "
                  "a safetensors file") from None
    if not isinstance(header, dict):
        raise bad(f"header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in meta.items()):
        raise bad("__metadata__ is not a mapping of strings")
    data = memoryview(blob)[8 + n:]
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r}: entry {str(entry)[:80]} is not "
                      "{dtype, shape, data_offsets}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _ITEMSIZE:
            raise bad(f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(_ITEMSIZE)}")
        if not (isinstance(shape, list) and all(_nonneg_int(d) for d in shape)):
            raise bad(f"tensor {name!r}: shape {str(shape)[:80]} is not a list of ints >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(_nonneg_int(o) for o in offsets) and offsets[0] <= offsets[1]):
            raise bad(f"tensor {name!r}: data_offsets {str(offsets)[:80]} are not [begin, end]")
        need = math.prod(shape) * _ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != need or offsets[1] > len(data):
            raise bad(f"tensor {name!r} of shape {shape} {dtype} needs {need:,} bytes; the "
                      f"header gives it bytes {offsets} of a {len(data):,}-byte data region")
        spans.append(offsets)
    spans.sort()
    if [0] + [e for _, e in spans] != [b for b, _ in spans] + [len(data)]:
        raise bad(f"tensor byte ranges {spans[:4]}... do not tile the {len(data):,}-byte data "
                  "region (overlapping, gaps, or trailing bytes)")
    if _DIGEST in meta and not hmac.compare_digest(meta[_DIGEST], _digest(header, data)):
        raise bad("content does not match its sha256 (the file was corrupted or edited)")
    try:   # safetensors' own parser, as a second opinion on what was checked above
        views = safetensors.deserialize(blob)
    except Exception as e:
        raise bad(f"safetensors refused it: {e}") from None
    # sorted: deserialize's order varies from process to process (a Rust HashMap), and every
    # process of a multi-host job must place the tensors in one order (device_put is collective)
    tensors = {name: np.frombuffer(v["data"], _NUMPY[v["dtype"]]).reshape(v["shape"])
               for name, v in sorted(views, key=lambda x: x[0])}
    return tensors, meta


def _nonneg_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _as_tree(params: Any) -> Mapping:
    """An NNX module's variables as a plain tree (``nnx.params``); a tree as is."""
    from flax import nnx as flax_nnx

    if isinstance(params, flax_nnx.Module):
        from loraxs_jax import nnx

        return nnx.params(params)
    return params


def _adapter_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.suffix == ".safetensors" else p.with_name(p.name + ".safetensors")


# ----------------------------------------------------------------------------- fingerprints
def _strided(w: jax.Array) -> jax.Array:
    flat = jnp.ravel(w)
    stride = max(1, flat.shape[0] // _SAMPLE)
    return flat[::stride][:_SAMPLE].astype(jnp.float32)


def _sample(w: jax.Array) -> jax.Array:
    """1,024 strided entries; replicated when ``w`` is sharded, so every process can read them."""
    sharding = getattr(w, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return jax.jit(_strided, out_shardings=NamedSharding(sharding.mesh, PartitionSpec()))(w)
    return _strided(w)


def fingerprint(params: Mapping, cfg: LoraXSConfig, targets: list[Target] | None = None) -> str:
    """A hash of the targeted base kernels: their paths, shapes and 1,024 evenly strided values
    each (as float32). It tells one base model from another (different checkpoints, a fine-tuned
    copy, a different architecture) at the cost of a tiny device→host transfer, also for sharded
    7B models; it does not see a change confined to unsampled entries.
    """
    targets = find_targets(params, cfg) if targets is None else targets
    flat = flatten(params)
    samples = jax.device_get([_sample(jnp.asarray(unbox(flat[t.path]))) for t in targets])
    h = hashlib.sha256()
    for t, s in sorted(zip(targets, samples), key=lambda x: x[0].name):
        h.update(f"{t.name}:{t.shape}".encode())
        h.update(np.asarray(s, np.float32).tobytes())
    return h.hexdigest()[:32]


# ----------------------------------------------------------------------------- adapters
def save_adapter(path: str | os.PathLike, params: Mapping, cfg: LoraXSConfig, *,
                 dtype: Any = None, include_extras: bool = True,
                 base_fingerprint: str | None = None) -> Path:
    """Write the R's of an adapted tree (and, with ``include_extras``, the leaves matching
    ``cfg.trainable``, e.g. a task head) to ``path`` (``.safetensors`` appended if missing).

    Args:
      path: file to write, atomically.
      params: the adapted (unmerged) tree; its base kernels are fingerprinted.
      cfg: the config used in ``apply``.
      dtype: store R in this dtype (e.g. jnp.bfloat16 halves the file); default R's own dtype.
      include_extras: also store the ``cfg.trainable`` leaves.
      base_fingerprint: skip fingerprinting if you already have it.
    Returns: the path written.
    """
    params = _as_tree(params)
    flat = flatten(params)
    r_leaves = {path_str((*p[:-1], role[0])): v for p, v in flat.items()
                if (role := leaf_role(p[-1])) and role[1] == "R"}
    if not r_leaves:
        raise ValueError("no *_loraxs_R leaves in these params: nothing to save "
                         "(save the tree returned by loraxs_jax.apply, not a merged one)")
    base = {p: v for p, v in flat.items() if not leaf_role(p[-1])}
    geometries = adapted_geometries(params)
    targets = find_targets(_plain(base), cfg, geometries)
    want = {t.name: t.stack + (t.rank, t.rank) for t in targets}
    have = {name: tuple(unbox(v).shape) for name, v in r_leaves.items()}
    if want != have:
        diff = [f"{n}: cfg gives R {want.get(n, '(not a target)')}, the params hold "
                f"{have.get(n, '(no R)')}" for n in sorted(set(want) | set(have))
                if want.get(n) != have.get(n)]
        raise ValueError(f"cfg does not describe these params ({len(diff)} kernels differ; pass "
                         "the LoraXSConfig that apply was given): " + "; ".join(diff[:3]))
    tensors: dict[str, np.ndarray] = {}
    adapted: dict[int, list[str]] = {}
    for name in sorted(r_leaves):
        adapted.setdefault(have[name][-1], []).append(name)
    for rank, names in adapted.items():
        tensors[f"{_R}{rank}"] = np.concatenate([
            np.asarray(to_host(unbox(r_leaves[n])), dtype=dtype or unbox(r_leaves[n]).dtype
                       ).reshape(-1, rank, rank) for n in names])
    if include_extras and cfg.trainable:
        tensors.update({path_str(p): to_host(unbox(v)) for p, v in base.items()
                        if cfg.is_extra_trainable(path_str(p))})
    meta = {
        "format": FORMAT,
        "loraxs_jax_version": _version(),
        "config": json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":")),
        "base_fingerprint": base_fingerprint or fingerprint(_plain(base), cfg, targets),
        "adapted": json.dumps(_layout(adapted), separators=(",", ":")),
        "bases_algorithm": svd_lib.algorithm(cfg.svd_method),
    }
    table = _geometry_table(geometries, cfg)
    if table:
        meta["geometry"] = json.dumps(table, sort_keys=True, separators=(",", ":"))
    # multi-process: every process computes, process 0 writes
    return save_tensors(_adapter_path(path), tensors, meta)


def _layout(names_by_rank: Mapping[int, list[str]]) -> dict[str, dict[str, Any]]:
    """{rank: {"kernels": n, "digest": hash of the sorted paths}}: what the rows of each stacked
    R tensor belong to, without writing every path into the header."""
    out = {}
    for rank, names in sorted(names_by_rank.items()):
        digest = hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16]
        out[str(rank)] = {"kernels": len(names), "digest": digest}
    return out


def _geometry_table(geometries: Mapping[str, Geometry], cfg: LoraXSConfig) -> dict[str, str]:
    """The kernels whose geometry the config alone would not reproduce (read from the model by
    ``apply(forward=...)``: einsum weights, torch layouts), as {path pattern: roles}; layer
    numbers become '#' where every layer agrees, so the header stays small."""
    odd = {}
    for name, g in geometries.items():
        try:
            if configured_geometry(name, g.shape, cfg) == g:
                continue
        except ValueError:
            pass
        odd[name] = g.roles
    by_pattern: dict[str, set[str]] = {}
    for name, roles in odd.items():
        by_pattern.setdefault(re.sub(r"\d+", "#", name), set()).add(roles)
    table = {}
    for name, roles in odd.items():
        pattern = re.sub(r"\d+", "#", name)
        table[pattern if len(by_pattern[pattern]) == 1 else name] = roles
    return table


def _stored_geometries(table: Mapping[str, str], params: Mapping, cfg: LoraXSConfig
                       ) -> dict[str, Geometry]:
    """The geometries an adapter file records, for the kernels of ``params`` ``cfg`` targets."""
    out = {}
    for path, shape in matching_kernels(params, cfg).items():
        name = path_str(path)
        roles = table.get(name) or table.get(re.sub(r"\d+", "#", name))
        if roles:
            out[name] = Geometry.from_roles(shape, roles)
    return out


def _plain(flat: Mapping[tuple, Any]) -> dict:
    return unflatten(flat)


def adapter_info(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an adapter file: config (LoraXSConfig), version, fingerprint, adapted
    kernels, the SVD algorithm its bases came from (``svd.algorithm``), recorded geometries,
    tensor names, its path and its size in bytes. The whole file is checked first (see
    :func:`read_tensors`; then the metadata's schema and every tensor against the stored
    config), so an adapter that passes here loads, or fails only against the base it is given.

    Raises:
      FileNotFoundError: no file at ``path`` (``.safetensors`` appended if missing).
      AdapterFileError: a truncated, corrupted, foreign or inconsistent file, naming it.
    """
    return _read_adapter(path)[0]


def _read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    p = _adapter_path(path)
    tensors, meta = read_tensors(p)

    def bad(why: str) -> AdapterFileError:
        return AdapterFileError(f"{p}: {why}")

    fmt = meta.get("format")
    if fmt not in (FORMAT, _FORMAT_V1):
        raise bad(f"not a loraxs-jax adapter (format={fmt!r}, expected {FORMAT!r})")
    if fmt == FORMAT and _DIGEST not in meta:
        raise bad(f"has no {_DIGEST} digest, which every {FORMAT} file carries")
    missing = sorted({"config", "base_fingerprint", "adapted"} - set(meta))
    if missing:
        raise bad(f"its metadata lacks {missing}")
    try:
        config, layout = json.loads(meta["config"]), json.loads(meta["adapted"])
        if not isinstance(config, dict):
            raise ValueError(f"config is a JSON {type(config).__name__}")
        cfg = LoraXSConfig.from_dict(config)
    except (ValueError, TypeError, RecursionError) as e:
        raise bad(f"its stored config is not a valid LoraXSConfig: {e}") from None
    if not (isinstance(layout, dict) and layout and all(
            isinstance(k, str) and re.fullmatch(r"[1-9][0-9]{0,5}", k) and isinstance(v, dict)
            and set(v) == {"kernels", "digest"} and _nonneg_int(v["kernels"]) and v["kernels"]
            and isinstance(v["digest"], str) for k, v in layout.items())):
        raise bad(f"'adapted' metadata {meta['adapted'][:80]!r} is not {{rank: {{kernels, "
                  "digest}}}")
    layout = {int(k): v for k, v in layout.items()}
    ranks = {cfg.rank} if isinstance(cfg.rank, int) else {r for _, r in cfg.rank}
    if not set(layout) <= ranks:
        raise bad(f"holds R of ranks {sorted(layout)}, but its config gives ranks {sorted(ranks)}")
    for name, value in tensors.items():
        if name.startswith(_R):
            rank = int(name[len(_R):]) if name[len(_R):].isdecimal() else None
            if rank not in layout:
                raise bad(f"tensor {name} is not one of the R tensors its metadata lists "
                          f"({[f'{_R}{r}' for r in sorted(layout)]})")
            if value.ndim != 3 or value.shape[1:] != (rank, rank) or (
                    value.shape[0] < layout[rank]["kernels"]):
                raise bad(f"tensor {name} has shape {value.shape}; {layout[rank]['kernels']} "
                          f"kernels of rank {rank} need (>= {layout[rank]['kernels']}, {rank}, "
                          f"{rank})")
        elif not cfg.is_extra_trainable(name):
            raise bad(f"tensor {name!r} is neither an R nor a leaf its config's trainable "
                      f"{list(cfg.trainable)} names")
    absent = [f"{_R}{r}" for r in layout if f"{_R}{r}" not in tensors]
    if absent:
        raise bad(f"its metadata lists {absent}, which the file does not hold")
    try:
        geometry = json.loads(meta.get("geometry", "{}"))
    except ValueError as e:
        raise bad(f"its 'geometry' metadata is not JSON: {e}") from None
    if not (isinstance(geometry, dict) and all(
            isinstance(k, str) and isinstance(v, str) and v and set(v) <= set("sio")
            for k, v in geometry.items())):
        raise bad("'geometry' metadata is not {kernel path pattern: roles (s, i, o per axis)}")
    # files from before the tag: block_krylov was then version 1, the others as now
    algorithm = meta.get("bases_algorithm") or (
        "block_krylov-1" if cfg.svd_method == "block_krylov" else svd_lib.algorithm(cfg.svd_method))
    info = {"config": cfg, "version": meta.get("loraxs_jax_version"),
            "bases_algorithm": algorithm,
            "base_fingerprint": meta["base_fingerprint"], "adapted": layout,
            "geometry": geometry, "tensors": list(tensors), "path": p,
            "bytes": p.stat().st_size}
    return info, tensors


def _config_diff(a: LoraXSConfig, b: LoraXSConfig) -> dict[str, tuple]:
    da, db = a.to_dict(), b.to_dict()
    return {k: (da[k], db[k]) for k in da if k not in ("r_std", "svd_batch") and da[k] != db[k]}


def read_adapter(path: str | os.PathLike, base_params: Mapping, cfg: LoraXSConfig | None = None,
                 *, check_base: bool = True, memo: dict | None = None
                 ) -> tuple[dict[str, Any], list[Target], dict[str, np.ndarray]]:
    """Check an adapter file against a base exactly as :func:`load_adapter` does (the config,
    the kernels its rows belong to, the base's fingerprint) and read its tensors, without
    building the adapted tree: what a server that keeps many adapters over one base needs.

    Args:
      path: the adapter file.
      base_params: the base (plain tree) the adapter must have been trained on.
      cfg: if given, the stored config must agree with it (``r_std``, ``svd_batch`` aside).
      check_base: refuse a base whose fingerprint differs (see :func:`load_adapter`).
      memo: a dict shared across calls on the same ``base_params``: the targets, layout and
        fingerprint a stored config selects on this base are then worked out once, so checking
        a million files against one base costs one read of each (small) file: its checks and digest.
    Returns:
      (``adapter_info(path)`` plus ``"fingerprint_here"``, the targets at the stored ranks,
      {leaf path: host array}): each ``<kernel>_loraxs_R`` as (*stack, r, r) and each stored
      extra leaf (a head) by its path.
    Raises:
      ValueError naming the difference (config, kernels, fingerprint, tensor shapes).
    """
    info, stored_tensors = _read_adapter(path)      # the whole file checked before any work
    stored: LoraXSConfig = info["config"]
    if cfg is not None:
        diff = _config_diff(stored, cfg)
        if diff:
            raise ValueError(f"adapter {path} was made with a different config: "
                             + "; ".join(f"{k}: file {v[0]!r} vs given {v[1]!r}"
                                         for k, v in diff.items()))
    now = svd_lib.algorithm(stored.svd_method)
    if info["bases_algorithm"] != now and stored.init not in ("random", "svd_bottom", "given") and (
            stored.svd_method != "exact"):
        raise ValueError(
            f"adapter {path} was trained on bases from the {info['bases_algorithm']} SVD "
            f"(loraxs-jax {info['version']}), and this version computes {now}: its R would meet "
            "other A and B and the adapted model would be silently wrong. Load it with the "
            "loraxs-jax that wrote it (and keep its bases: lx.io.store_bases), or train it again")
    key = (json.dumps(stored.to_dict(), sort_keys=True),
           json.dumps(info["geometry"], sort_keys=True))
    if memo is None or key not in memo:
        targets = find_targets(base_params, stored,
                               _stored_geometries(info["geometry"], base_params, stored))
        by_rank: dict[int, list[str]] = {}
        for t in targets:
            by_rank.setdefault(t.rank, []).append(t.name)
        fp = fingerprint(base_params, stored, targets)
        found = (targets, by_rank, {int(k): v for k, v in _layout(by_rank).items()}, fp)
        if memo is not None:
            memo[key] = found
    targets, by_rank, here, fp = memo[key] if memo is not None else found
    if here != info["adapted"]:
        def show(layout):
            return ", ".join(f"{v['kernels']} of rank {k}" for k, v in sorted(layout.items()))
        raise ValueError(
            f"adapter {path} does not fit these params: it holds R for {show(info['adapted'])} "
            f"kernels, while its targets select {show(here)} here (or other paths: the digests "
            f"differ); targets here include {sorted(t.name for t in targets)[:4]}")
    info["fingerprint_here"] = fp
    if check_base and fp != info["base_fingerprint"]:
        raise ValueError(f"adapter {path} was trained on a different base model (fingerprint "
                         f"{info['base_fingerprint']} vs {fp} for these params). Load the base it "
                         "was made for, or pass check_base=False if the difference is intended.")
    values: dict[str, np.ndarray] = {}
    by_name = {t.name: t for t in targets}
    for rank, kernels in by_rank.items():
        stacked = stored_tensors.pop(f"{_R}{rank}", None)
        if stacked is None or stacked.ndim != 3 or stacked.shape[1:] != (rank, rank):
            raise ValueError(f"adapter {path}: {_R}{rank} is missing or not (matrices, {rank}, "
                             f"{rank}) (got {None if stacked is None else stacked.shape})")
        i = 0
        for name in sorted(kernels):
            shape = by_name[name].stack + (rank, rank)
            n = int(np.prod(shape[:-2]))
            if i + n > stacked.shape[0]:
                raise ValueError(f"adapter {path}: {_R}{rank} of shape {stacked.shape} does not "
                                 f"hold R for {name} (expected {shape})")
            values[adapter_key(name, "R")] = stacked[i:i + n].reshape(shape)
            i += n
    leftover = [n for n in stored_tensors if n.startswith(_R)]
    if leftover:
        raise ValueError(f"adapter {path}: tensors {leftover} belong to no rank of its config")
    values.update(stored_tensors)
    return info, targets, values


def load_adapter(path: str | os.PathLike, base_params: Mapping, cfg: LoraXSConfig | None = None,
                 *, bases_cache: str | os.PathLike | None = None,
                 check_base: bool = True) -> Mapping:
    """Rebuild the adapted tree: ``apply`` the stored config to ``base_params`` (A, B recomputed,
    or read from ``bases_cache``) and put the stored R's (and extras) in place.

    Raises a ValueError naming the difference when the base's fingerprint is not the one the
    adapter was trained on (pass ``check_base=False`` to override, e.g. after a dtype cast), when
    ``cfg`` is given and differs from the stored config, or when tensors are missing or
    mis-shaped (:func:`read_adapter` does these checks).
    """
    from flax import nnx as flax_nnx

    if isinstance(base_params, flax_nnx.Module):
        from loraxs_jax import nnx

        tree = load_adapter(path, nnx.params(base_params), cfg, bases_cache=bases_cache,
                            check_base=check_base)
        return nnx.load_into(base_params, tree)
    info, targets, values = read_adapter(path, base_params, cfg, check_base=check_base)
    stored: LoraXSConfig = info["config"]
    fp = info["fingerprint_here"]
    bases = cached_bases(base_params, stored, bases_cache, fp, targets) if bases_cache else None
    adapted = insert(base_params, stored, targets, 0, bases)
    new = dict(flatten(adapted))
    paths = {path_str(p): p for p in new}
    for name, value in values.items():
        if name not in paths:
            raise ValueError(f"adapter tensor {name} has no place in these params")
        p = paths[name]
        old = unbox(new[p])
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(f"adapter tensor {name} has shape {value.shape}, params expect "
                             f"{tuple(old.shape)}")
        arr = jnp.asarray(value, dtype=old.dtype)
        sharding = getattr(old, "sharding", None)
        new[p] = jax.device_put(arr, sharding) if sharding is not None else arr
    return unflatten(new, adapted)


# ----------------------------------------------------------------------------- bases cache
def _bases_file(cache_dir: str | os.PathLike, cfg: LoraXSConfig, fp: str,
                targets: list[Target]) -> Path:
    """The cache file of ``cfg``'s bases on the base of fingerprint ``fp``: keyed by what
    determines A and B (the config's bases fields and any geometry read from the model)."""
    geometry = sorted((t.name, t.geometry.roles) for t in targets if not t.geometry.standard)
    key = hashlib.sha256((fp + json.dumps(cfg.bases_dict(), sort_keys=True)
                          + json.dumps(geometry) + svd_lib.algorithm(cfg.svd_method)).encode())
    return Path(cache_dir) / f"bases-{key.hexdigest()[:24]}.safetensors"


def bases_digest(bases: Mapping[str, tuple[Any, Any]]) -> int:
    """A 31-bit digest of given bases {kernel path: (A, B)} (their paths, shapes and float32
    values). An imported adapter (``init="given"``) keeps it as ``bases_seed``, so two imports on
    one base never share a cache file and a cache whose bases differ is refused."""
    h = hashlib.sha256()
    for name in sorted(bases):
        for x in bases[name]:
            x = np.asarray(to_host(x), np.float32)
            h.update(f"{name}:{x.shape}".encode())
            h.update(x.tobytes())
    return int.from_bytes(h.digest()[:4], "big") & 0x7FFFFFFF


def store_bases(cache_dir: str | os.PathLike, base_params: Mapping, cfg: LoraXSConfig,
                bases: Mapping[str, tuple[Any, Any]], fp: str | None = None,
                targets: list[Target] | None = None) -> Path:
    """Write {kernel path: (A, B)} into ``cache_dir`` where ``cached_bases`` (and
    ``load_adapter(..., bases_cache=)``) look for ``cfg``'s bases on this base: how the bases of
    an imported adapter (``init="given"``), which cannot be recomputed, travel with it."""
    targets = find_targets(base_params, cfg) if targets is None else targets
    missing = sorted({t.name for t in targets} - set(bases))
    if missing:
        raise ValueError(f"bases for {missing[:4]} are missing ({len(missing)} kernels)")
    fp = fp or fingerprint(base_params, cfg, targets)
    tensors = {}
    for t in targets:
        a, b = bases[t.name]
        tensors[adapter_key(t.name, "A")] = to_host(a)
        tensors[adapter_key(t.name, "B")] = to_host(b)
    return save_tensors(_bases_file(cache_dir, cfg, fp, targets), tensors,
                        {"format": _BASES_FORMAT, "base_fingerprint": fp,
                         "bases_config": json.dumps(cfg.bases_dict())})


def cached_bases(base_params: Mapping, cfg: LoraXSConfig, cache_dir: str | os.PathLike,
                 fp: str | None = None, targets: list[Target] | None = None
                 ) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{kernel path: (A, B)} for ``cfg`` on this base, computed once and kept in ``cache_dir``
    (one safetensors file per base fingerprint and bases-relevant config), so a hundred adapters
    on one base pay for the SVDs once. Pass the result to ``apply(..., bases=...)``. Bases of
    ``init="given"`` cannot be computed: they must be there (``store_bases``), and their digest
    must be the config's ``bases_seed``."""
    targets = find_targets(base_params, cfg) if targets is None else targets
    fp = fp or fingerprint(base_params, cfg, targets)
    file = _bases_file(cache_dir, cfg, fp, targets)
    if file.exists():
        bases = _read_bases(file, targets)
        if cfg.init == "given" and bases_digest(bases) != cfg.bases_seed:
            raise ValueError(f"{file} holds other bases than the adapter's (digest "
                             f"{bases_digest(bases)} vs bases_seed {cfg.bases_seed}); import the "
                             "adapter again to rewrite them")
        return bases
    if cfg.init == "given":
        raise FileNotFoundError(
            f"no bases in {cache_dir} for this adapter (init='given': its A and B came from an "
            f"imported checkpoint and cannot be recomputed; expected {file.name}, written by "
            "loraxs_jax.interop.import_official with save_to=...)")
    bases = compute_bases(base_params, cfg, targets)
    store_bases(cache_dir, base_params, cfg, bases, fp, targets)
    return bases


def _read_bases(file: Path, targets: list[Target]) -> dict[str, tuple[jax.Array, jax.Array]]:
    """A bases cache file, checked like an adapter: the format, its digest and every A, B."""
    tensors, meta = read_tensors(file)
    fix = "delete it and it is recomputed"
    if meta.get("format") != _BASES_FORMAT or _DIGEST not in meta:
        raise AdapterFileError(f"{file}: not a {_BASES_FORMAT} bases cache with a digest "
                               f"(format={meta.get('format')!r}); {fix}")
    out = {}
    for t in targets:
        a, b = tensors.get(adapter_key(t.name, "A")), tensors.get(adapter_key(t.name, "B"))
        shapes = t.geometry.canonical_shapes(t.rank)
        want = (shapes["A"], shapes["B"])
        if a is None or b is None or (a.shape, b.shape) != want:
            raise AdapterFileError(f"{file}: holds no bases of shapes {want} for {t.name}; {fix}")
        out[t.name] = (jnp.asarray(a), jnp.asarray(b))
    return out
