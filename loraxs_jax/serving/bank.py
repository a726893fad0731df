"""An adapter bank: the R's (and heads) of many LoRA-XS adapters of one base, resident on device.

All adapters of one base model and one config share the frozen bases A and B of every adapted
kernel; only R (r×r per matrix) and the extra trainable leaves (a task head) differ. The bank
keeps, per adapted kernel and per extra leaf, one array with a leading SLOT axis::

    R      (N, *stack, r, r)   float32, already times the adapter's α/r (so the scale is shared: 1)
    extra  (N, *leaf shape)    the leaf's dtype (e.g. classifier/kernel (N, H, labels))
    A, B   as in an adapted tree, shared by every slot (computed once, or from a bases cache)

so memory per resident adapter is r² × matrices × 4 bytes (+ the head). N (``capacity``) is
fixed: loading an adapter writes its rows into a free slot with one jitted scatter (slot ids are
traced, so nothing recompiles), unloading frees the slot. Slot 0 is reserved for the base model
(R = 0, the base's own extras), under the name ``BASE``. With a ``mesh`` the slot axis is split
over one mesh axis (``P(axis)``), A and B are replicated.

Every adapter is checked as ``load_adapter`` checks it (``io.read_adapter``: its config, the
kernels its rows belong to, the base's fingerprint) plus what sharing requires: the same targets,
geometry and bases config (init, SVD method and seed, dtype) as the bank, the same extra leaves,
and a rank per kernel no larger than the bank's. A refused file leaves the bank unchanged.

**Ranks.** An adapter of rank r' < the bank's r is placed in R's top-left r'×r' block, zeros
elsewhere. That is exact iff its own bases are the first r' columns of the bank's A (rows of B):
true for ``init="svd"`` and ``"svd_no_sigma"`` with ``svd_method="exact"`` (nested truncations of
one sign-canonical SVD), false for randomized SVDs, random bases and ``svd_bottom``, which the
bank refuses for a smaller rank (serve such adapters in a bank of their own rank).

**Sources.** ``AdapterDirectory`` (a folder of ``<name>.safetensors`` files) and ``AdapterStore``
(one memory-mapped file of packed rows, for a million adapters) give adapters by name;
``AdapterBank.ensure(names)`` makes a batch's adapters resident, evicting the least recently used
ones (never the base, never those ``load``-ed explicitly, never those of the same batch).

The bank is not thread-safe: a server serialises calls (``serving.server`` does).
"""

from __future__ import annotations

import collections
import json
import os
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from loraxs_jax.bases import compute_bases, find_targets
from loraxs_jax.config import LoraXSConfig
from loraxs_jax.io import cached_bases, fingerprint, read_adapter
from loraxs_jax.tree import adapter_key, flatten, path_str, unbox

BASE = "base"                                   # the reserved name of slot 0 (R = 0)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Fields that decide A and B besides the rank: adapters sharing a bank must agree on them.
SHARED_FIELDS = ("targets", "init", "svd_method", "oversample", "power_iters", "bases_dtype",
                 "in_axes", "stacked_axes", "bases_seed", "trainable")
NESTED_INITS = ("svd", "svd_no_sigma")           # rank-r' bases = first r' columns of rank-r ones


class BankError(ValueError):
    """An adapter cannot go into (or be found in) the bank; the message names it and the fix."""


class BankFull(BankError):
    """A batch needs more distinct adapters than the bank has slots."""


def check_name(name: str) -> str:
    """Adapter names are file stems: letters, digits, '.', '_', '-' (no paths), ≤ 128 chars."""
    if not isinstance(name, str) or not NAME.match(name) or name.endswith(".safetensors"):
        raise BankError(f"adapter name {name!r} is not valid: use letters, digits, '.', '_' and "
                        "'-' (at most 128, starting with a letter or digit, no path)")
    return name


class AdapterBank:
    """N slots of LoRA-XS adapters over one base; see the module docstring.

    Args:
      base_params: the base model's params (a plain tree, no LoRA-XS leaves).
      cfg: the bank's config: targets, rank (the largest an adapter may have; int or per
        target), init and SVD options (the shared bases), ``trainable`` (the per-adapter extras,
        e.g. ``(r"^classifier/",)``); α and r_std play no part.
      capacity: N, slots including the base's slot 0.
      bases: precomputed {kernel path: (A, B)} (canonical, at the bank's rank), or
      bases_cache: a folder for ``io.cached_bases``; else the SVDs run here.
      source: where ``ensure`` finds adapters by name (``AdapterDirectory``, ``AdapterStore``).
      mesh, axis: split the slot axis over ``mesh.shape[axis]`` devices (must divide N).
    """

    def __init__(self, base_params: Mapping, cfg: LoraXSConfig, capacity: int, *,
                 bases: Mapping | None = None, bases_cache: str | os.PathLike | None = None,
                 source: Any = None, mesh: jax.sharding.Mesh | None = None,
                 axis: str | None = None):
        if capacity < 2:
            raise BankError(f"capacity={capacity}: a bank needs slot 0 (the base) and at least one "
                            "adapter slot")
        self.base = base_params
        self.cfg = cfg
        self.capacity = int(capacity)
        self.targets = find_targets(base_params, cfg)
        self._memo: dict = {}
        self.fingerprint = fingerprint(base_params, cfg, self.targets)
        if bases is None:
            bases = (cached_bases(base_params, cfg, bases_cache, self.fingerprint, self.targets)
                     if bases_cache else compute_bases(base_params, cfg, self.targets))
        flat = flatten(base_params)
        dtype = (lambda t: jnp.dtype(cfg.bases_dtype) if cfg.bases_dtype
                 else unbox(flat[t.path]).dtype)
        self.shared = {}
        for t in self.targets:
            a, b = t.geometry.store(*bases[t.name])
            self.shared[t.name] = {"A": jnp.asarray(a, dtype(t)), "B": jnp.asarray(b, dtype(t))}
        self.extra_paths = sorted(path_str(p) for p in flat if cfg.is_extra_trainable(path_str(p)))
        if cfg.trainable and not self.extra_paths:
            raise BankError(f"the bank's trainable={list(cfg.trainable)} matches no param of the "
                            "base: give the regexes of the per-adapter head, or none")
        # row layout: every leaf a slot holds, in one order (R's, then extras)
        self.layout: list[tuple[str, tuple[int, ...], np.dtype]] = [
            (adapter_key(t.name, "R"), t.stack + (t.rank, t.rank), np.dtype(np.float32))
            for t in sorted(self.targets, key=lambda t: t.name)]
        self.layout += [(p, tuple(np.shape(unbox(flat[tuple(p.split("/"))]))),
                         np.dtype(unbox(flat[tuple(p.split("/"))]).dtype))
                        for p in self.extra_paths]
        self.row_size = sum(int(np.prod(s)) for _, s, _ in self.layout)
        self.mesh, self.axis = mesh, axis
        if mesh is not None:
            if axis is None or self.capacity % mesh.shape[axis]:
                raise BankError(f"a sharded bank needs a mesh axis that divides capacity="
                                f"{self.capacity} (axis={axis!r}, mesh {dict(mesh.shape)})")
            self.sharding = NamedSharding(mesh, PartitionSpec(axis))
        else:
            self.sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        # slot 0: R = 0 and the base's own extras; every other slot zeros until loaded
        base_row = self._fill(np.zeros(self.row_size, np.float32),
                              {p: np.asarray(unbox(flat[tuple(p.split("/"))]))
                               for p in self.extra_paths})
        self.state = {}
        for (p, shape, d), part in zip(self.layout, self._split(base_row), strict=True):
            host = np.zeros((self.capacity, *shape), d)
            host[0] = part
            self.state[p] = jax.device_put(host, self.sharding)
        self._slots: dict[str, int] = {BASE: 0}
        self._names: list[str | None] = [BASE] + [None] * (self.capacity - 1)
        self._pinned: set[str] = {BASE}
        self._lru: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.source = source
        if source is not None and hasattr(source, "check_bank"):
            source.check_bank(self)
        self._write = jax.jit(_scatter, static_argnums=(3,), donate_argnums=(0,),
                              out_shardings=jax.tree.map(lambda _: self.sharding, self.state))

    # ----------------------------------------------------------------------------- reading
    def _split(self, row: np.ndarray) -> list[np.ndarray]:
        """A row (row_size,) as its leaves, in layout order and shapes."""
        out, off = [], 0
        for _, shape, _ in self.layout:
            n = int(np.prod(shape))
            out.append(row[off:off + n].reshape(shape))
            off += n
        return out

    def _fill(self, row: np.ndarray, values: Mapping[str, np.ndarray]) -> np.ndarray:
        off = 0
        for p, shape, _ in self.layout:
            n = int(np.prod(shape))
            if p in values:
                row[off:off + n] = np.asarray(values[p], np.float32).reshape(-1)
            off += n
        return row

    def pack(self, path: str | os.PathLike) -> np.ndarray:
        """One adapter file as a bank row (row_size,) float32: checked as ``load_adapter``
        checks it and against the bank (module docstring), R padded to the bank's rank and
        multiplied by its α/r, extras as stored. Raises BankError naming the file and why."""
        try:
            info, targets, values = read_adapter(path, self.base, memo=self._memo)
        except (ValueError, FileNotFoundError) as e:
            raise BankError(str(e)) from None
        got: LoraXSConfig = info["config"]
        mine, theirs = self.cfg.to_dict(), got.to_dict()
        diff = {k: (theirs[k], mine[k]) for k in SHARED_FIELDS if theirs[k] != mine[k]}
        if diff:
            raise BankError(f"adapter {path} cannot share this bank's bases: " + "; ".join(
                f"{k}: file {v[0]!r} vs bank {v[1]!r}" for k, v in diff.items())
                + ". Serve it from a bank built with its config.")
        mine_t = {t.name: t for t in self.targets}
        rows: dict[str, np.ndarray] = {}
        for t in targets:
            bank_t = mine_t.get(t.name)
            if bank_t is None or bank_t.geometry != t.geometry:
                raise BankError(f"adapter {path}: kernel {t.name} is adapted as "
                                f"{t.geometry}, the bank has "
                                f"{bank_t.geometry if bank_t else 'no such target'}")
            r, big = t.rank, bank_t.rank
            if r > big:
                raise BankError(f"adapter {path} has rank {r} at {t.name}, above the bank's "
                                f"{big}: build the bank with rank >= {r}")
            if r < big and (got.init not in NESTED_INITS or got.svd_method != "exact"):
                raise BankError(
                    f"adapter {path} has rank {r} at {t.name} in a bank of rank {big}: zero-"
                    f"padding R is exact only when rank-{r} bases are the first {r} columns of "
                    f"rank-{big} ones (init in {NESTED_INITS} with svd_method='exact'), not for "
                    f"init={got.init!r}, svd_method={got.svd_method!r}. Serve it in a bank of "
                    f"rank {r}.")
            key = adapter_key(t.name, "R")
            padded = np.zeros(t.stack + (big, big), np.float32)
            scale = np.float32(got.alpha / r)
            padded[..., :r, :r] = np.asarray(values.pop(key), np.float32) * scale
            rows[key] = padded
        missing = [p for p in self.extra_paths if p not in values]
        unknown = sorted(set(values) - set(self.extra_paths))
        if missing or unknown:
            raise BankError(f"adapter {path}: the bank holds per-adapter {self.extra_paths}; the "
                            f"file lacks {missing} and has {unknown} besides R. Save adapters "
                            "with their head (include_extras=True) and the bank's trainable=.")
        for p, shape, _ in self.layout[len(self.targets):]:
            if tuple(values[p].shape) != shape:
                raise BankError(f"adapter {path}: {p} has shape {tuple(values[p].shape)}, the "
                                f"bank's is {shape}")
            rows[p] = values[p]
        return self._fill(np.zeros(self.row_size, np.float32), rows)

    # ----------------------------------------------------------------------------- slots
    def __contains__(self, name: str) -> bool:
        return name in self._slots

    def __len__(self) -> int:
        """Resident adapters, the base included."""
        return len(self._slots)

    @property
    def pinned(self) -> frozenset[str]:
        """Names ``ensure`` never evicts: the base and adapters ``load``-ed explicitly."""
        return frozenset(self._pinned)

    @property
    def resident(self) -> dict[str, int]:
        """{name: slot} of every resident adapter (the base is slot 0)."""
        return dict(self._slots)

    def slot(self, name: str) -> int:
        if name not in self._slots:
            raise BankError(f"adapter {name!r} is not loaded (resident: "
                            f"{sorted(self._slots)[:8]}{' ...' if len(self._slots) > 8 else ''})")
        return self._slots[name]

    def load(self, name: str, path: str | os.PathLike | None = None, *, pin: bool = True) -> int:
        """Check ``path`` (default: the source's file for ``name``) and write it into a free slot
        (or ``name``'s own slot, replacing it). Returns the slot. A refused file changes
        nothing. ``pin``: never evicted by ``ensure`` (until ``unload``)."""
        check_name(name)
        if name == BASE:
            raise BankError(f"{BASE!r} is the reserved name of slot 0 (the base model)")
        if path is None:
            if self.source is None:
                raise BankError(f"no file given for {name!r} and the bank has no source")
            rows = self.source.rows(self, [name])
        else:
            rows = self.pack(path)[None]
        slot = self._slots.get(name)
        if slot is None:
            slot = self._free_slots(1, keep=())[0]
        self._assign([name], [slot], rows)
        if pin:
            self._pinned.add(name)
        return slot

    def unload(self, name: str) -> None:
        """Free ``name``'s slot (its rows are zeroed: a stale id would run the base model)."""
        if name == BASE:
            raise BankError(f"{BASE!r} (slot 0, the base model) cannot be unloaded")
        slot = self.slot(name)
        self._write_rows([slot], np.zeros((1, self.row_size), np.float32))
        del self._slots[name]
        self._names[slot] = None
        self._pinned.discard(name)
        self._lru.pop(name, None)

    def ensure(self, names: Sequence[str]) -> np.ndarray:
        """Slot ids (B,) int32 for a batch naming its rows' adapters (``BASE`` for the base):
        adapters not resident are read from the source, all in one scatter, evicting the least
        recently used unpinned ones that this batch does not need."""
        wanted = list(dict.fromkeys(names))
        missing = [n for n in wanted if n not in self._slots]
        if missing:
            if self.source is None:
                raise BankError(f"adapters {missing[:5]} are not loaded and the bank has no "
                                "source to load them from")
            for n in missing:
                check_name(n)
            slots = self._free_slots(len(missing), keep=set(wanted))
            self._assign(missing, slots, self.source.rows(self, missing))
        for n in wanted:
            if n not in self._pinned:
                self._lru[n] = None
                self._lru.move_to_end(n)
        return np.asarray([self._slots[n] for n in names], np.int32)

    def _free_slots(self, k: int, keep: Iterable[str]) -> list[int]:
        free = [i for i, n in enumerate(self._names) if n is None]
        keep = set(keep)
        evictable = [n for n in self._lru if n not in keep]
        if len(free) + len(evictable) < k:
            raise BankFull(f"{k} more adapters do not fit: the bank has {self.capacity} slots "
                           f"({len(free)} free, {len(self._pinned)} pinned incl. the base, "
                           f"{len(keep)} needed by this batch); raise capacity or split the batch")
        for n in evictable[:max(0, k - len(free))]:
            slot = self._slots.pop(n)
            self._lru.pop(n)
            self._names[slot] = None
            free.append(slot)
        return free[:k]

    def _assign(self, names: Sequence[str], slots: Sequence[int], rows: np.ndarray) -> None:
        self._write_rows(slots, rows)
        for n, s in zip(names, slots, strict=True):
            old = self._names[s]
            if old is not None and old != n:
                self._slots.pop(old, None)
            self._slots[n], self._names[s] = s, n

    def _write_rows(self, slots: Sequence[int], rows: np.ndarray) -> None:
        """One scatter of ``rows`` (k, row_size) into ``slots``; k is padded to a power of two
        (repeating the first row: the same value to the same slot) so only log2(N) programs
        are ever compiled."""
        k = len(slots)
        size = 1 << max(0, (k - 1).bit_length())
        idx = np.full(size, slots[0], np.int32)
        idx[:k] = slots
        data = np.empty((size, self.row_size), np.float32)
        data[:k] = rows
        data[k:] = rows[0]
        layout = tuple((p, s, str(d)) for p, s, d in self.layout)
        self.state = self._write(self.state, jnp.asarray(idx), jnp.asarray(data), layout)

    # ----------------------------------------------------------------------------- use
    def arrays(self) -> dict[str, Any]:
        """{'base', 'shared', 'state'}: everything a per-row forward needs, as one pytree to
        pass into a jitted program (an argument, never a baked-in constant). Valid until the
        next load or unload (the scatter donates the old state): take it after ``ensure``."""
        return {"base": self.base, "shared": self.shared, "state": self.state}

    def scatter_programs(self) -> int:
        """How many load programs are compiled (one per power-of-two batch of loads and row
        layout; shared by banks of the same layout)."""
        return self._write._cache_size()

    def bytes_per_adapter(self) -> int:
        """Device bytes one slot holds: r² × matrices × 4 (+ the extras)."""
        return sum(int(np.prod(s)) * d.itemsize for _, s, d in self.layout)

    def describe(self) -> dict[str, Any]:
        """What the bank holds, JSON-ready (the server's /v1/adapters)."""
        return {"capacity": self.capacity, "resident": len(self._slots),
                "fingerprint": self.fingerprint, "bytes_per_adapter": self.bytes_per_adapter(),
                "config": self.cfg.to_dict(),
                "adapters": [{"name": n, "slot": s, "pinned": n in self._pinned}
                             for n, s in sorted(self._slots.items(), key=lambda x: x[1])]}


def _scatter(state, slots, rows, layout):
    """state[leaf][slots] = the leaf's columns of rows (k, row_size), cast to the leaf's dtype."""
    out, off = {}, 0
    for p, shape, dtype in layout:
        n = int(np.prod(shape))
        out[p] = state[p].at[slots].set(rows[:, off:off + n].reshape((-1, *shape)).astype(dtype))
        off += n
    return out


def per_row_adapters(shared: Mapping[str, Mapping[str, jax.Array]],
                     state: Mapping[str, jax.Array], prefix: str = "params/"
                     ) -> dict[str, dict[str, jax.Array]]:
    """{prefix + kernel path: {'A', 'B', 'R' (N, *stack, r, r), 'scale' (N, *stack) of ones}}:
    a bank's arrays as ``intercept.replay(..., rows=ids)`` takes per-row adapters (the R's
    already carry α/r). ``prefix``: ``"params/"`` for a linen ``model.apply({"params": ...})``."""
    out = {}
    for name, ab in shared.items():
        r = state[adapter_key(name, "R")]
        out[prefix + name] = {**ab, "R": r, "scale": jnp.ones(r.shape[:-2], jnp.float32)}
    return out


# ----------------------------------------------------------------------------- sources
class AdapterDirectory:
    """A folder of adapter files, ``<name>.safetensors``; each is checked when it is loaded."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise BankError(f"adapter directory {self.root} does not exist")

    def path(self, name: str) -> Path:
        return self.root / f"{check_name(name)}.safetensors"

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.safetensors") if NAME.match(p.stem))

    def __contains__(self, name: str) -> bool:
        return bool(NAME.match(name)) and self.path(name).is_file()

    def rows(self, bank: AdapterBank, names: Sequence[str]) -> np.ndarray:
        for n in names:
            if n not in self:
                raise BankError(f"unknown adapter {n!r}: no {n}.safetensors in {self.root}")
        return np.stack([bank.pack(self.path(n)) for n in names])


class AdapterStore:
    """Many adapters packed as bank rows in one file on disk, for a host tier far larger than
    the device's slots (a million MiniLM adapters at r=8 are 6 GB): a cold row is one
    ``pread`` of its bytes, and the process holds none of the file.

    Folder layout: ``rows.npy`` ((M, row_size) float32, ``np.lib.format.open_memmap``),
    ``names.json`` (row → name) and ``store.json`` (the base fingerprint, the bank config and
    row layout it was packed for). Files enter through ``AdapterBank.pack`` (every check
    ``load_adapter`` makes), so serving from the store reads rows only; a bank refuses a store
    packed for another base or layout (``check_bank``).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta = self.folder / "store.json"
        if not meta.exists():
            raise BankError(f"{self.folder} is not an adapter store (no store.json); build one "
                            "with AdapterStore.create")
        self.meta = json.loads(meta.read_text())
        # The map gives the rows' shape, dtype and offset; rows are then read with pread, not
        # through the map: a cold row read through the map made the kernel map its whole
        # cached folio (~1.2 MiB a row measured, MADV_RANDOM or not), so a million-adapter
        # store served 3,500 cold rows with 4.2 GiB of mapped pages in the process.
        try:
            self.rows_file = np.load(self.folder / "rows.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            raise BankError(f"{self.folder}/rows.npy cannot be read as a store's rows ({e}); "
                            "rebuild it with AdapterStore.create") from None
        if self.rows_file.dtype != np.float32 or self.rows_file.ndim != 2:
            raise BankError(f"{self.folder}/rows.npy holds {self.rows_file.dtype} "
                            f"{self.rows_file.shape}, not (adapters, row) float32")
        self._offset = int(self.rows_file.offset)
        self._row_bytes = int(self.rows_file.shape[1]) * 4
        self._fd = os.open(self.folder / "rows.npy", os.O_RDONLY)
        self._finalizer = weakref.finalize(self, os.close, self._fd)
        names = json.loads((self.folder / "names.json").read_text())
        self.index = {n: i for i, n in enumerate(names)}

    @staticmethod
    def signature(bank: AdapterBank) -> dict[str, Any]:
        return {"fingerprint": bank.fingerprint, "row_size": bank.row_size,
                "layout": [[p, list(s), str(d)] for p, s, d in bank.layout],
                "config": {k: bank.cfg.to_dict()[k] for k in (*SHARED_FIELDS, "rank")}}

    @classmethod
    def create(cls, folder: str | os.PathLike, bank: AdapterBank, files: Iterable[tuple[str, Any]],
               size: int, *, progress=None) -> AdapterStore:
        """Pack ``files`` ((name, adapter file path) pairs, ``size`` of them) into a new store in
        ``folder``, each through ``bank.pack``. ``progress(i)`` is called every 10,000 files."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        rows = np.lib.format.open_memmap(folder / "rows.npy", mode="w+", dtype=np.float32,
                                         shape=(size, bank.row_size))
        names = []
        for i, (name, path) in enumerate(files):
            if i >= size:
                raise BankError(f"more than size={size} files given")
            rows[i] = bank.pack(path)
            names.append(check_name(name))
            if progress is not None and (i + 1) % 10_000 == 0:
                progress(i + 1)
        if len(names) != size or len(set(names)) != size:
            raise BankError(f"{len(names)} files ({len(set(names))} distinct names) for a store "
                            f"of {size}")
        rows.flush()
        del rows
        (folder / "names.json").write_text(json.dumps(names))
        (folder / "store.json").write_text(json.dumps(cls.signature(bank)))
        return cls(folder)

    def check_bank(self, bank: AdapterBank) -> None:
        mine = self.signature(bank)
        bad = [k for k in mine if mine[k] != self.meta.get(k)]
        if bad:
            raise BankError(f"adapter store {self.folder} was packed for another bank ({bad} "
                            f"differ: e.g. base fingerprint {self.meta.get('fingerprint')} vs "
                            f"{bank.fingerprint}); rebuild it with AdapterStore.create")

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def names(self) -> list[str]:
        return list(self.index)

    def rows(self, bank: AdapterBank, names: Sequence[str]) -> np.ndarray:
        try:
            at = [self.index[n] for n in names]
        except KeyError as e:
            raise BankError(f"unknown adapter {e.args[0]!r}: not in the store {self.folder}") \
                from None
        out = np.empty((len(at), self.rows_file.shape[1]), np.float32)
        for k, i in enumerate(at):
            data = os.pread(self._fd, self._row_bytes, self._offset + i * self._row_bytes)
            if len(data) != self._row_bytes:
                raise BankError(f"adapter store {self.folder}: row {i} is cut short "
                                f"({len(data)} of {self._row_bytes} bytes); rebuild the store")
            out[k] = np.frombuffer(data, np.float32)
        return out
