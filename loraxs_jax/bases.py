"""Which kernels LoRA-XS adapts, and their frozen bases A, B.

``find_targets`` selects the kernels a ``LoraXSConfig`` names and says how each is viewed as a
(batch of) matrices; ``compute_bases`` takes their truncated SVDs (or the init variant's bases)
in float32, batched over same-shaped matrices and, for kernels placed on a mesh, split over its
devices so that every device decomposes whole matrices of its own.

Shapes, for a kernel with stack axes ``stack`` (independent matrices, e.g. ``nn.scan`` layers),
input axes ``in_dims`` and output axes ``out_dims``::

    A  (*stack, *in_dims, r)    U_r Σ_r (or the init variant's basis)
    B  (*stack, r, *out_dims)   V_rᵀ
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import zlib
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from loraxs_jax import svd as svd_lib
from loraxs_jax.config import LoraXSConfig
from loraxs_jax.geometry import Geometry
from loraxs_jax.tree import flatten, leaf_role, path_str, shape_of, unbox


class Target(NamedTuple):
    """A kernel selected for LoRA-XS, its geometry (how it is viewed as a batch of matrices) and
    its rank."""

    path: tuple
    name: str                   # '/'-joined path
    geometry: Geometry
    rank: int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.geometry.shape

    @property
    def stack(self) -> tuple[int, ...]:
        """Sizes of the stack axes."""
        return self.geometry.sizes(self.geometry.stack)

    @property
    def in_dims(self) -> tuple[int, ...]:
        return self.geometry.sizes(self.geometry.inputs)

    @property
    def out_dims(self) -> tuple[int, ...]:
        return self.geometry.sizes(self.geometry.outputs)

    @property
    def m(self) -> int:
        return self.geometry.m

    @property
    def n(self) -> int:
        return self.geometry.n

    @property
    def count(self) -> int:
        return self.geometry.count


def matching_kernels(params: Mapping, cfg: LoraXSConfig) -> dict[tuple, tuple[int, ...]]:
    """{path: shape} of the leaves with ≥ 2 axes whose path a target regex searches, with clear
    errors for targets that match nothing."""
    flat = flatten(params)
    if any(leaf_role(p[-1]) for p in flat):
        raise ValueError("these params already carry LoRA-XS leaves (*_loraxs_*): merge them "
                         "(loraxs_jax.merge) or start from the base params")
    found, matched_low_rank = {}, []
    for path, leaf in flat.items():
        name = path_str(path)
        if not cfg.is_target(name):
            continue
        shape = shape_of(leaf)
        if len(shape) < 2:
            matched_low_rank.append(name)      # biases, norms: a regex like 'query' hits them too
            continue
        found[path] = shape
    if not found:
        kernels = [path_str(p) for p, v in flat.items() if len(shape_of(v)) >= 2]
        hint = f" (they matched only 1-D params: {matched_low_rank[:3]})" if matched_low_rank else ""
        raise ValueError(
            f"targets {list(cfg.targets)} matched no kernel{hint}. Some kernel paths in these "
            f"params: {kernels[:8]}{' ...' if len(kernels) > 8 else ''}")
    names = [path_str(p) for p in found]
    unused = [t for t in cfg.targets if not any(re.search(t, x) for x in names)]
    if unused:
        raise ValueError(f"target patterns {unused} matched no kernel (others matched "
                         f"{len(found)}); e.g. kernels: {names[:4]}")
    return found


def configured_geometry(name: str, shape: tuple[int, ...], cfg: LoraXSConfig) -> Geometry:
    """The geometry ``cfg`` gives a kernel without a trace: ``stacked_axes`` leading axes, then
    a 2-D (in, out) matrix, or ``in_axes`` input axes for more."""
    n_stack = cfg.stacked_axes_for(name)
    mat = shape[n_stack:]
    if len(mat) < 2:
        raise ValueError(f"{name} has shape {shape}; with stacked_axes={n_stack} no matrix is "
                         "left to adapt")
    n_in = 1 if len(mat) == 2 else cfg.in_axes_for(name)
    if n_in is None:
        raise ValueError(
            f"{name} has shape {shape}: {len(mat)} matrix axes (DenseGeneral/Einsum). LoRA-XS "
            "needs to know which axes the model contracts: pass forward= to loraxs_jax.apply "
            "(the geometry is then read from the model's own contraction), or set "
            "LoraXSConfig.in_axes (how many leading axes are inputs) and stacked_axes (leading "
            "axes of independent matrices, e.g. nn.scan layers)")
    if not 1 <= n_in < len(mat):
        raise ValueError(f"in_axes={n_in} for {name} of matrix shape {mat}: must be in "
                         f"[1, {len(mat) - 1}]")
    return Geometry.leading(shape, n_stack, n_in)


def find_targets(params: Mapping, cfg: LoraXSConfig,
                 geometries: Mapping[str, Geometry] | None = None) -> list[Target]:
    """The kernels ``cfg`` adapts, with clear errors for everything that cannot be adapted.

    ``geometries`` ({path: Geometry}, from ``intercept.discover`` via ``apply(forward=...)``)
    override the config's rule; a config that says otherwise for a kernel is an error."""
    targets = []
    for path, shape in matching_kernels(params, cfg).items():
        name = path_str(path)
        if geometries is not None and name in geometries:
            g = geometries[name]
            if cfg.in_axes_for(name) is not None:      # (stacked_axes were trace hints)
                want = configured_geometry(name, shape, cfg)
                if want != g:
                    raise ValueError(f"{name}: LoraXSConfig.in_axes/stacked_axes describe it as "
                                     f"{want}, but the model contracts it as {g}; drop those "
                                     "settings for it (the trace knows), or fix them")
        else:
            g = configured_geometry(name, shape, cfg)
        r = cfg.rank_for(name)
        t = Target(path, name, g, r)
        if r > min(t.m, t.n):
            raise ValueError(f"rank {r} exceeds min(in, out)={min(t.m, t.n)} for {name} "
                             f"(matrix {t.m}x{t.n}); lower the rank for this target")
        targets.append(t)
    return targets


# ----------------------------------------------------------------------------- bases
def path_key(key: jax.Array, name: str) -> jax.Array:
    """A key that depends on the kernel's path only, so a kernel's bases and R do not change
    when other targets are added or removed."""
    return jax.random.fold_in(key, _crc(name))


def as_key(rng) -> jax.Array:
    if isinstance(rng, int):
        return jax.random.key(rng)
    if hasattr(rng, "dtype") and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))


def _bases_for_matrices(w: jax.Array, keys: jax.Array, rank: int, cfg: LoraXSConfig,
                        one_at_a_time: bool = False):
    """w: (b, m, n) float32, keys: (b,) → A (b, m, r), B (b, r, n) per ``cfg.init``.

    ``one_at_a_time`` decomposes the matrices in a loop (``lax.map``) instead of as one batch:
    every LAPACK call (QR, eigh, SVD) then sees a single matrix. jaxlib's CPU LAPACK kernels
    split a *batch* over XLA's CPU thread pool and block a pool thread until the pieces finish;
    when several CPU devices run such a call at once and the pool has no thread left (2 devices
    on a 2-core host), every thread waits on work that none is free to run, and the program
    hangs for ever. A single matrix runs inline, so the loop is what CPU meshes use. It is also
    what ``_step_jit`` and ``spread_program`` run per matrix on CPU devices, which keeps the
    bases of a kernel bit-identical wherever it is placed."""
    b, m, n = w.shape
    if cfg.init == "random":
        ka, kb = jax.vmap(lambda k: jax.random.split(k))(keys).swapaxes(0, 1)
        lim_a, lim_b = 1.0 / math.sqrt(m), 1.0 / math.sqrt(rank)
        a = jax.vmap(lambda k: jax.random.uniform(k, (m, rank), jnp.float32, -lim_a, lim_a))(ka)
        bb = jax.vmap(lambda k: jax.random.uniform(k, (rank, n), jnp.float32, -lim_b, lim_b))(kb)
        return a, bb
    if cfg.init == "svd_random":
        std = jnp.std(w, axis=(-2, -1), keepdims=True)
        w = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), (m, n)))(keys) * std
    def one(x, k):
        return svd_lib.truncated_svd(
            x, rank, method=cfg.svd_method, key=k, oversample=cfg.oversample,
            power_iters=cfg.power_iters, krylov_iters=cfg.krylov_iters,
            bottom=cfg.init == "svd_bottom")

    if one_at_a_time:
        u, s, vt = jax.lax.map(lambda xk: one(*xk), (w, keys))
    elif cfg.svd_method == "block_krylov":
        # the batch as it is (a key per matrix): its fallback for steep spectra, a full SVD,
        # then runs only if some matrix needs it, where vmap would run it for every matrix
        u, s, vt = one(w, keys)
    else:
        u, s, vt = jax.vmap(one)(w, keys)
    a = u if cfg.init == "svd_no_sigma" else u * s[..., None, :]
    return a, vt


def compute_bases(params: Mapping, cfg: LoraXSConfig, targets: list[Target] | None = None
                  ) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{kernel path: (A, B)} in float32, canonical: (*stack, *in_dims, r) and
    (*stack, r, *out_dims) (``Geometry.store`` gives the layout a param tree keeps).

    Same-shaped matrices are SVD'd together (in equal chunks of at most ``svd_batch``, vmapped
    and jitted: one compiled program per shape). For kernels placed on a mesh of several
    devices each batch is split over all of them: every device decomposes whole matrices of its
    own, in parallel, and no device ever holds more than its share of one batch (a kernel's
    shards are never gathered whole on every device). The randomness of the randomized and
    block-Krylov SVDs and of the random inits comes from ``cfg.bases_seed`` and the kernel's
    path, so the config alone determines A and B for a given W.
    """
    if cfg.init == "given":
        raise ValueError("init='given': A and B came with the adapter (e.g. imported from the "
                         "official LoRA-XS code) and cannot be recomputed from W; pass them as "
                         "apply(..., bases=...) or load_adapter(..., bases_cache=<the folder the "
                         "importer wrote>)")
    targets = find_targets(params, cfg) if targets is None else targets
    flat = flatten(params)
    on_cpu = bool(targets) and _runs_on_cpu(unbox(flat[targets[0].path]))
    with lapack_one_thread(on_cpu):
        out = _compute_bases(flat, cfg, targets)
        if on_cpu:            # the calls must run while the limit holds (dispatch is async)
            jax.block_until_ready(out)
    return out


def _runs_on_cpu(w) -> bool:
    """A concrete kernel whose SVD programs run on CPU devices (a numpy array: on the default
    backend's)."""
    if isinstance(w, jax.core.Tracer):
        return False
    devices = w.sharding.device_set if isinstance(w, jax.Array) else jax.devices()[:1]
    return all(d.platform == "cpu" for d in devices)


@contextlib.contextmanager
def lapack_one_thread(active: bool = True):
    """While active, the BLAS/LAPACK library that jaxlib's CPU linear algebra calls into
    (scipy's OpenBLAS) runs each call on one thread. Its default, one thread per core, makes
    every small call (the (K, K) eigh, Cholesky and QR of each block-Krylov matrix) wake and
    synchronise threads that compete with XLA's own pool: on 2 cores SmolLM2's block-Krylov
    bases took 1.39 s with that default and 0.78 s on one thread, a batch of 8 exact 576×576
    SVDs 0.26 s and 0.14 s. (One lone large SVD loses ~20% of its time on one thread;
    ``compute_bases`` runs batches.)
    threadpoolctl only reaches libraries already loaded, so scipy's LAPACK, which jaxlib loads
    at its first call, is loaded first."""
    if not active:
        yield
        return
    import scipy.linalg.cython_lapack  # noqa: F401  (loads the library jaxlib's kernels call)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _compute_bases(flat: Mapping, cfg: LoraXSConfig, targets: list[Target]
                   ) -> dict[str, tuple[jax.Array, jax.Array]]:
    base_key = jax.random.key(cfg.bases_seed)
    groups: dict[tuple, list[Target]] = {}
    for t in targets:
        groups.setdefault((t.m, t.n, t.rank), []).append(t)
    out: dict[str, tuple[jax.Array, jax.Array]] = {}
    for (_, _, r), ts in groups.items():
        kernels = []
        split = None          # NamedSharding splitting a batch of whole matrices over the mesh
        for t in ts:
            w = jnp.asarray(unbox(flat[t.path]))
            split = split or matrix_batch_sharding(w)
            kernels.append(w if split else gathered(w))
        # one program for all the group's keys: fold_in(path_key(base, name), i), as one by one
        keys = _matrix_keys(base_key, np.asarray([_crc(t.name) for t in ts for _ in range(t.count)],
                                                 np.uint32),
                            np.asarray([i for t in ts for i in range(t.count)], np.uint32))
        if _in_cpu_steps(kernels, cfg):
            out.update(_bases_in_steps(ts, kernels, keys, r, cfg))
            continue
        pieces = [t.geometry.matrices(w) for t, w in zip(ts, kernels)]   # (count, m, n) each
        total = sum(t.count for t in ts)
        a_all, b_all = [], []
        ways = split.mesh.size if split else 1
        # equal chunks of at most svd_batch (a multiple of the devices), the last one padded
        # with copies: every chunk of a shape group runs the same compiled program
        chunk = -(-total // -(-total // cfg.svd_batch))
        chunk = -(-chunk // ways) * ways
        for lo in range(0, total, chunk):
            w, ks = _rows(pieces, lo, lo + chunk), keys[lo:lo + chunk]
            got = w.shape[0]
            if got < chunk:
                w = jnp.concatenate([w] + [w[-1:]] * (chunk - got))
                ks = jnp.concatenate([ks] + [ks[-1:]] * (chunk - got))
            if split:             # each device decomposes its own matrices
                w = to_matrix_batch(w, split.mesh)
                a, b = bases_program(r, cfg, w.sharding)(w, ks)
            else:
                a, b = _bases_jit(w.astype(jnp.float32), ks, r, cfg, _on_cpu_devices(w))
            a_all.append(a[:got] if got < chunk else a)
            b_all.append(b[:got] if got < chunk else b)
        a_all = jnp.concatenate(a_all) if len(a_all) > 1 else a_all[0]
        b_all = jnp.concatenate(b_all) if len(b_all) > 1 else b_all[0]
        sizes = [t.count for t in ts]
        a_parts = jnp.split(a_all, np.cumsum(sizes)[:-1]) if len(ts) > 1 else [a_all]
        b_parts = jnp.split(b_all, np.cumsum(sizes)[:-1]) if len(ts) > 1 else [b_all]
        for t, a, b in zip(ts, a_parts, b_parts):
            out[t.name] = (a.reshape(t.stack + t.in_dims + (r,)),
                           b.reshape(t.stack + (r,) + t.out_dims))
    return out


def _bases_in_steps(ts: list[Target], kernels: list[jax.Array], keys: jax.Array, rank: int,
                    cfg: LoraXSConfig) -> dict[str, tuple[jax.Array, jax.Array]]:
    """The CPU path of the SVDs that pass over W many times (randomized, block Krylov), for
    kernels on one CPU device or whole on every device of a CPU mesh (replicated): a few
    matrices per call of one compiled program, dispatched from a Python loop straight from the
    kernels. Each call's matrices stay in the CPU's cache across all their passes, where one
    batch of the whole group streams from memory on every pass, and no batch of the group is
    ever copied together. On SmolLM2 (210 matrices, r = 32) block Krylov took 1.3 s against 2.0 s
    as batches (both before ``lapack_one_thread``, with which it takes 0.78 s). A kernel that
    is one plain matrix goes in as it is.

    With one CPU device in the process, each call of ``_step_jit`` takes ``CPU_STEP`` matrices.
    With several (``runtime.host_devices``, or XLA's ``--xla_force_host_platform_device_count``)
    each call is one program over all of them (``spread_program``) that gives every device a
    matrix of its own: one device runs one program at a time, a program over several runs on all
    of them side by side, and it compiles once (a program per device compiled 32 times over 8
    devices: 26 s). On 2 cores SmolLM2's block-Krylov bases took 0.6 s over 2 devices against
    0.78 s on one; a replicated 2-device mesh 0.6 s against 1.4 s on the mesh path (a per-device
    loop in one program). A device without its own copy of the kernel gets the matrix copied,
    A and B come back to the first device, and every device runs the same per-matrix program,
    so the bits are the same wherever a matrix runs."""
    own = kernels[0].sharding.device_set
    if len(own) == 1:
        home = next(iter(own))
        devices = step_devices(home)
    else:
        devices = sorted(own, key=lambda d: d.id)
        home = devices[0]
    one = len(devices) == 1
    per = CPU_STEP if one else len(devices)
    copies = [{s.device: s.data for s in w.addressable_shards} for w in kernels]
    plain, index = [], []                 # each matrix: (kernel, index in its stack)
    for k, (t, w) in enumerate(zip(ts, kernels)):
        g = t.geometry
        plain.append(w.ndim == 2 and tuple(g.stack + g.inputs + g.outputs) == (0, 1))
        index.extend((k, i) for i in range(t.count))
    stacks: dict[tuple, jax.Array] = {}
    # one program's shards share a dtype: kernels of several in one group meet in float32
    mixed = jnp.float32 if len({w.dtype for w in kernels}) > 1 else None

    def matrix(k: int, i: int, device: jax.Device) -> jax.Array:
        """Matrix i of kernel k on ``device``: (m, n) on one device, (1, m, n) over several
        (the shards of one program's input)."""
        where = device if device in copies[k] else home
        if plain[k]:
            m = copies[k][where] if one else copies[k][where][None]
        else:
            if (k, where) not in stacks:
                stacks[(k, where)] = ts[k].geometry.matrices(copies[k][where])
            m = stacks[(k, where)][i] if one else stacks[(k, where)][i:i + 1]
        if one:
            return m
        m = m if mixed is None else m.astype(mixed)
        return m if where == device else jax.device_put(m, device)

    got = len(index)
    index += [index[-1]] * (-got % per)
    keys = jnp.concatenate([keys] + [keys[-1:]] * (len(index) - got)) if len(index) > got else keys
    if one:
        a_list, b_list = [], []
        for lo in range(0, len(index), per):
            chunk = tuple(matrix(k, i, home) for k, i in index[lo:lo + per])
            a, b = _step_jit(chunk, keys, np.int32(lo), rank, cfg)
            a_list.extend(a)
            b_list.extend(b)

        def rows(i, n):
            return jnp.stack(a_list[i:i + n]), jnp.stack(b_list[i:i + n])
    else:
        mesh = jax.sharding.Mesh(np.asarray(devices), ("matrices",))
        split = NamedSharding(mesh, PartitionSpec("matrices"))
        program = spread_program(rank, cfg, mesh)
        keys_everywhere = jax.device_put(keys, NamedSharding(mesh, PartitionSpec()))
        m, n = ts[0].m, ts[0].n
        a_parts, b_parts = [], []
        for lo in range(0, len(index), per):
            x = jax.make_array_from_single_device_arrays(
                (per, m, n), split, [matrix(k, i, d) for (k, i), d in zip(index[lo:lo + per],
                                                                          devices)])
            a, b = program(x, keys_everywhere, np.int32(lo))
            a_parts.append(a)
            b_parts.append(b)
        # only once every call is dispatched: a copy waits for its value
        a_parts, b_parts = jax.device_put((a_parts, b_parts), home)
        a_all, b_all = jnp.concatenate(a_parts), jnp.concatenate(b_parts)

        def rows(i, n):
            return a_all[i:i + n], b_all[i:i + n]
    out, i = {}, 0
    for t, is_plain in zip(ts, plain):
        a, b = rows(i, t.count)
        if is_plain:
            out[t.name] = (a[0], b[0])
        else:
            out[t.name] = (a.reshape(t.stack + t.in_dims + (rank,)),
                           b.reshape(t.stack + (rank,) + t.out_dims))
        i += t.count
    return out


@functools.lru_cache(maxsize=64)
def spread_program(rank: int, cfg: LoraXSConfig, mesh: jax.sharding.Mesh):
    """``(matrices, keys, lo) -> (A, B)``: one program over the devices of ``mesh``, each
    decomposing its own one matrix (of a (devices, m, n) batch split over them) with
    keys[lo + its index], as ``_step_jit`` decomposes each of its matrices."""
    def body(w, keys, lo):
        i = lo + jax.lax.axis_index("matrices")
        return _bases_for_matrices(w.astype(jnp.float32), jax.lax.dynamic_slice_in_dim(keys, i, 1),
                                   rank, cfg, one_at_a_time=True)

    split, everywhere = PartitionSpec("matrices"), PartitionSpec()
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(split, everywhere, everywhere),
                                 out_specs=(split, split)))


def step_devices(home: jax.Device) -> list[jax.Device]:
    """The CPU devices ``compute_bases`` spreads the multi-pass SVDs of kernels on ``home``
    over: ``home`` first, then every other CPU device of this process."""
    return [home] + [d for d in jax.local_devices(backend="cpu") if d != home]


@functools.partial(jax.jit, static_argnums=(3, 4))
def _step_jit(mats: tuple[jax.Array, ...], keys: jax.Array, lo: jax.Array, rank: int,
              cfg: LoraXSConfig):
    """A and B of a few matrices (a tuple) with keys[lo:lo + len(mats)], each matrix
    decomposed on its own as a CPU mesh does (``one_at_a_time``): the same bits either way."""
    ks = jax.lax.dynamic_slice_in_dim(keys, lo, len(mats))
    got = [_bases_for_matrices(m.astype(jnp.float32)[None], ks[i:i + 1], rank, cfg,
                               one_at_a_time=True) for i, m in enumerate(mats)]
    return tuple(a[0] for a, _ in got), tuple(b[0] for _, b in got)


def _crc(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


@jax.jit
def _matrix_keys(base_key: jax.Array, crcs: jax.Array, index: jax.Array) -> jax.Array:
    """fold_in(fold_in(base_key, crc), i) for every (crc, i): ``path_key`` and then the matrix
    index, as a per-matrix loop would fold them, in one program."""
    return jax.vmap(lambda c, i: jax.random.fold_in(jax.random.fold_in(base_key, c), i))(
        crcs, index)


def _rows(pieces: list[jax.Array], lo: int, hi: int) -> jax.Array:
    """Rows lo:hi of the concatenation of ``pieces`` (each (count, m, n)), slicing and copying
    only what the range needs (one piece that covers it whole is returned as it is)."""
    got, start = [], 0
    for p in pieces:
        n = p.shape[0]
        a, b = max(lo - start, 0), min(hi - start, n)
        if a < b:
            got.append(p if (a, b) == (0, n) else p[a:b])
        start += n
        if start >= hi:
            break
    return got[0] if len(got) == 1 else jnp.concatenate(got)


def matrix_batch_sharding(w) -> NamedSharding | None:
    """For a kernel on a mesh of several devices: a sharding that splits a batch of whole
    matrices along its first axis over every device, so the SVDs run in parallel and each device
    holds only its own ~svd_batch/devices matrices. None off a mesh, under tracing, or on a
    mesh with Explicit axes (``sharding.make_mesh`` makes Auto ones)."""
    sharding = getattr(w, "sharding", None)
    if (isinstance(w, jax.core.Tracer) or not isinstance(sharding, NamedSharding)
            or sharding.mesh.size == 1):
        return None
    if any(t != jax.sharding.AxisType.Auto for t in sharding.mesh.axis_types):
        return None           # Explicit axes type every slice's sharding: gather instead
    return NamedSharding(sharding.mesh, PartitionSpec(tuple(sharding.mesh.axis_names), None, None))


def to_matrix_batch(w: jax.Array, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
    """Reshard a stack of matrices (b, m, n) so that the batch axis is split over every mesh
    axis and each matrix is whole on its device. Done one mesh axis at a time: first the axes
    the matrices are replicated over (a local slice), then each axis splitting m or n moves to
    the batch axis (one all-to-all each). A single jump between such layouts makes XLA replicate
    the whole stack on every device first."""
    def axes(e) -> tuple[str, ...]:
        return () if e is None else (e,) if isinstance(e, str) else tuple(e)

    # a layout XLA did not express on the mesh counts as replicated: one put
    named = isinstance(w.sharding, NamedSharding)
    mesh = mesh or w.sharding.mesh
    now = tuple(w.sharding.spec) if named else ()
    spec = [axes(e) for e in now + (None,) * (3 - len(now))]
    used = {a for e in spec for a in e}
    lead = list(spec[0]) + [a for a in mesh.axis_names if a not in used]
    rest = [list(spec[1]), list(spec[2])]

    def put(x):
        sp = PartitionSpec(tuple(lead) or None, tuple(rest[0]) or None, tuple(rest[1]) or None)
        return jax.device_put(x, NamedSharding(mesh, sp))

    if len(lead) > len(spec[0]):
        w = put(w)
    for dim in (0, 1):
        while rest[dim]:
            lead.append(rest[dim].pop(0))
            w = put(w)
    return w


@functools.lru_cache(maxsize=64)
def bases_program(rank: int, cfg: LoraXSConfig, split: NamedSharding):
    """``(w, keys) -> (A, B)`` for matrices split over the mesh by ``split``, keys alike."""
    keys = NamedSharding(split.mesh, PartitionSpec(split.spec[0]))
    cpu = _on_cpu_devices(split)

    def body(w, kd):
        return _bases_for_matrices(w.astype(jnp.float32), jax.random.wrap_key_data(kd), rank,
                                   cfg, one_at_a_time=cpu)

    if cpu:                   # each device loops over its own matrices (see _bases_for_matrices)
        body = jax.shard_map(body, mesh=split.mesh, in_specs=(split.spec, keys.spec),
                             out_specs=(split.spec, split.spec))
    jitted = jax.jit(body, in_shardings=(split, keys), out_shardings=(split, split))

    def run(w, ks):
        # keys travel as host data: a one-device array cannot be put on a mesh that spans
        # other processes, a numpy array that every process holds can
        return jitted(w, jax.device_put(np.asarray(jax.random.key_data(ks)), keys))

    return run


def gathered(w: jax.Array) -> jax.Array:
    """One kernel, replicated: LAPACK-style SVDs need whole matrices. The bases are placed back
    on the kernel's sharding afterwards (by ``apply``)."""
    sharding = getattr(w, "sharding", None)
    if isinstance(w, jax.core.Tracer) or not isinstance(sharding, NamedSharding):
        return w
    return jax.device_put(w, NamedSharding(sharding.mesh, PartitionSpec()))


_bases_jit = jax.jit(_bases_for_matrices, static_argnums=(2, 3, 4))


# Matrices per call of ``_step_jit`` on one CPU device: two 576×1536 matrices (7 MB) stay in
# a 32 MB L3 across their passes; with LAPACK on one thread, one per call ran 14% slower on
# SmolLM2 and four the same (before it, four 10% and one 30% slower).
CPU_STEP = 2


def _in_cpu_steps(kernels: list[jax.Array], cfg: LoraXSConfig) -> bool:
    """Whether ``compute_bases`` takes ``_bases_in_steps`` for a group: an SVD that passes over
    W many times, and kernels all on the same one CPU device, or all whole on every device of
    the same CPU mesh of this process (replicated)."""
    multi_pass = (cfg.svd_method in ("randomized", "block_krylov")
                  and cfg.init in ("svd", "svd_no_sigma", "svd_random"))
    shardings = [getattr(w, "sharding", None) for w in kernels]
    if not multi_pass or any(isinstance(w, jax.core.Tracer) or s is None
                             for w, s in zip(kernels, shardings)):
        return False
    own = shardings[0].device_set
    return all(d.platform == "cpu" for d in own) and all(
        s.device_set == own and (len(own) == 1 or (s.is_fully_replicated
                                                   and s.is_fully_addressable))
        for s in shardings)


def _on_cpu_devices(x) -> bool:
    """An array (or sharding) that spans several CPU devices: its LAPACK calls must see one
    matrix at a time (``_bases_for_matrices``)."""
    sharding = x if isinstance(x, jax.sharding.Sharding) else getattr(x, "sharding", None)
    if isinstance(x, jax.core.Tracer) or sharding is None:
        return False
    devices = sharding.device_set
    return len(devices) > 1 and all(d.platform == "cpu" for d in devices)


def one_device_programs() -> int:
    """How many programs the one-device path of :func:`compute_bases` has compiled so far: one
    per (chunk shape, rank, config), never one per chunk."""
    return _bases_jit._cache_size() + _step_jit._cache_size()


