"""apply: insert frozen A, B, a trainable R and the scale α/r beside every targeted kernel.

The transform is functional: it reads a param tree and returns a new tree in which each
targeted leaf ``.../<name>`` keeps its (unchanged, uncopied) array and gains four siblings

    <name>_loraxs_A      (*stack, *in_dims, r)   frozen, U_r Σ_r (or the init variant's basis)
    <name>_loraxs_B      (*stack, r, *out_dims)  frozen, V_rᵀ
    <name>_loraxs_R      (*stack, r, r)          trainable, N(0, r_std²)
    <name>_loraxs_scale  (*stack,)               frozen, α / r

``stack`` are leading axes that index independent matrices (``stacked_axes``, e.g. layers
stacked by ``nn.scan``); ``in_dims``/``out_dims`` split the remaining axes (a 2-D kernel is
(in, out); kernels with more axes need ``in_axes``). Models pick the leaves up through
``loraxs_jax.wrap`` (linen) or module surgery (NNX), see ``layers.py``.
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import FrozenDict, meta
from jax.sharding import NamedSharding, PartitionSpec

from loraxs_jax import svd as svd_lib
from loraxs_jax.config import LoraXSConfig

SUFFIX = "_loraxs_"
ROLES = ("A", "B", "R", "scale")
_LEAF_RE = re.compile(rf"^(?P<base>.+){SUFFIX}(?P<role>{'|'.join(ROLES)})$")


# ----------------------------------------------------------------------------- tree utilities
def path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path)


def flatten(tree: Mapping) -> dict[tuple, Any]:
    """Nested mappings (dict, FrozenDict) → {path tuple: leaf}; boxed leaves stay boxed."""
    if not isinstance(tree, Mapping):
        raise TypeError(f"expected a nested dict of params, got {type(tree).__name__}")
    return traverse_util.flatten_dict(tree, keep_empty_nodes=False)


def unflatten(flat: Mapping[tuple, Any], like: Mapping) -> Mapping:
    out = traverse_util.unflatten_dict(dict(flat))
    return FrozenDict(out) if isinstance(like, FrozenDict) else out


def leaf_role(key: Any) -> tuple[str, str] | None:
    """'kernel_loraxs_R' → ('kernel', 'R'); anything else → None."""
    m = _LEAF_RE.match(str(key))
    return (m["base"], m["role"]) if m else None


def adapter_key(base_key: str, role: str) -> str:
    return f"{base_key}{SUFFIX}{role}"


def _unbox(x):
    return x.unbox() if isinstance(x, meta.AxisMetadata) else x


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def is_adapted(tree: Mapping) -> bool:
    return any(leaf_role(p[-1]) for p in flatten(tree))


class Target(NamedTuple):
    """A kernel selected for LoRA-XS and how it is viewed as a (batch of) matrices."""

    path: tuple
    name: str                   # '/'-joined path
    shape: tuple[int, ...]      # the kernel's full shape
    stack: tuple[int, ...]      # leading axes of independent matrices
    in_dims: tuple[int, ...]
    out_dims: tuple[int, ...]
    rank: int

    @property
    def m(self) -> int:
        return math.prod(self.in_dims)

    @property
    def n(self) -> int:
        return math.prod(self.out_dims)

    @property
    def count(self) -> int:
        return math.prod(self.stack)


def find_targets(params: Mapping, cfg: LoraXSConfig) -> list[Target]:
    """The kernels ``cfg`` adapts, with clear errors for everything that cannot be adapted."""
    flat = flatten(params)
    if any(leaf_role(p[-1]) for p in flat):
        raise ValueError("these params already carry LoRA-XS leaves (*_loraxs_*): merge them "
                         "(loraxs_jax.merge) or start from the base params")
    targets, matched_low_rank = [], []
    for path, leaf in flat.items():
        name = path_str(path)
        if not cfg.is_target(name):
            continue
        shape = _shape(_unbox(leaf))
        if len(shape) < 2:
            matched_low_rank.append(name)      # biases, norms: a regex like 'query' hits them too
            continue
        n_stack = cfg.stacked_axes_for(name)
        mat = shape[n_stack:]
        if len(mat) < 2:
            raise ValueError(f"{name} has shape {shape}; with stacked_axes={n_stack} no matrix is "
                             "left to adapt")
        if len(mat) == 2:
            n_in = 1
        else:
            n_in = cfg.in_axes_for(name)
            if n_in is None:
                raise ValueError(
                    f"{name} has shape {shape}: {len(mat)} matrix axes (DenseGeneral/Einsum). "
                    "LoRA-XS needs a matrix: set LoraXSConfig.in_axes (how many of these axes are "
                    "inputs; the kernel is then viewed as (prod(inputs), prod(outputs))) or "
                    "stacked_axes (leading axes of independent matrices, e.g. nn.scan layers)")
            if not 1 <= n_in < len(mat):
                raise ValueError(f"in_axes={n_in} for {name} of matrix shape {mat}: must be in "
                                 f"[1, {len(mat) - 1}]")
        r = cfg.rank_for(name)
        t = Target(path, name, shape, shape[:n_stack], mat[:n_in], mat[n_in:], r)
        if r > min(t.m, t.n):
            raise ValueError(f"rank {r} exceeds min(in, out)={min(t.m, t.n)} for {name} "
                             f"(matrix {t.m}x{t.n}); lower the rank for this target")
        targets.append(t)
    if not targets:
        kernels = [path_str(p) for p, v in flat.items() if len(_shape(_unbox(v))) >= 2]
        hint = f" (they matched only 1-D params: {matched_low_rank[:3]})" if matched_low_rank else ""
        raise ValueError(
            f"targets {list(cfg.targets)} matched no kernel{hint}. Some kernel paths in these "
            f"params: {kernels[:8]}{' ...' if len(kernels) > 8 else ''}")
    unused = [t for t in cfg.targets if not any(re.search(t, x.name) for x in targets)]
    if unused:
        raise ValueError(f"target patterns {unused} matched no kernel (others matched "
                         f"{len(targets)}); e.g. kernels: {[x.name for x in targets[:4]]}")
    return targets


# ----------------------------------------------------------------------------- bases
def path_key(key: jax.Array, name: str) -> jax.Array:
    """A key that depends on the kernel's path only, so a kernel's bases and R do not change
    when other targets are added or removed."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _as_key(rng) -> jax.Array:
    if isinstance(rng, int):
        return jax.random.key(rng)
    if hasattr(rng, "dtype") and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))


def _bases_for_matrices(w: jax.Array, keys: jax.Array, rank: int, cfg: LoraXSConfig):
    """w: (b, m, n) float32, keys: (b,) → A (b, m, r), B (b, r, n) per ``cfg.init``."""
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
    bottom = cfg.init == "svd_bottom"
    if cfg.svd_method == "randomized" and not bottom:
        u, s, vt = jax.vmap(lambda x, k: svd_lib.randomized_svd(
            x, rank, k, oversample=cfg.oversample, power_iters=cfg.power_iters))(w, keys)
    else:
        u, s, vt = svd_lib.exact_svd(w, rank, bottom=bottom)
    a = u if cfg.init == "svd_no_sigma" else u * s[..., None, :]
    return a, vt


def compute_bases(params: Mapping, cfg: LoraXSConfig, targets: list[Target] | None = None
                  ) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{kernel path: (A, B)} in float32, shaped (*stack, *in_dims, r) and (*stack, r, *out_dims).

    Same-shaped matrices are SVD'd together (``svd_batch`` at a time, vmapped and jitted). For
    kernels placed on a mesh of several devices each batch is split over all of them: every
    device decomposes whole matrices of its own, in parallel, and no device ever holds more than
    its share of one batch (a kernel's shards are never gathered whole on every device). The
    randomness of the randomized SVD and of the random inits comes from ``cfg.bases_seed`` and the
    kernel's path, so the config alone determines A and B for a given W.
    """
    targets = find_targets(params, cfg) if targets is None else targets
    flat = flatten(params)
    base_key = jax.random.key(cfg.bases_seed)
    groups: dict[tuple, list[Target]] = {}
    for t in targets:
        groups.setdefault((t.m, t.n, t.rank), []).append(t)
    out: dict[str, tuple[jax.Array, jax.Array]] = {}
    for (m, n, r), ts in groups.items():
        mats, keys = [], []
        split = None          # NamedSharding splitting a batch of whole matrices over the mesh
        for t in ts:
            w = jnp.asarray(_unbox(flat[t.path]))
            split = split or _matrix_batch_sharding(w)
            w = (w if split else _gathered(w)).reshape((t.count, m, n))
            k = path_key(base_key, t.name)
            for i in range(t.count):
                mats.append(w[i])
                keys.append(jax.random.fold_in(k, i))
        a_all, b_all = [], []
        ways = split.mesh.size if split else 1
        chunk = -(-cfg.svd_batch // ways) * ways
        for lo in range(0, len(mats), chunk):
            w, ks = jnp.stack(mats[lo:lo + chunk]), jnp.stack(keys[lo:lo + chunk])
            if split:             # each device decomposes its own matrices
                got = w.shape[0]
                pad = -got % ways
                if pad:
                    w = jnp.concatenate([w] + [w[-1:]] * pad)
                    ks = jnp.concatenate([ks] + [ks[-1:]] * pad)
                w = _to_matrix_batch(w, split.mesh)
                a, b = _bases_program(r, cfg, w.sharding)(w, ks)
                a, b = a[:got], b[:got]
            else:
                a, b = _bases_jit(w.astype(jnp.float32), ks, r, cfg)
            a_all.append(a)
            b_all.append(b)
        a_all = jnp.concatenate(a_all) if len(a_all) > 1 else a_all[0]
        b_all = jnp.concatenate(b_all) if len(b_all) > 1 else b_all[0]
        i = 0
        for t in ts:
            a = a_all[i:i + t.count].reshape(t.stack + t.in_dims + (r,))
            b = b_all[i:i + t.count].reshape(t.stack + (r,) + t.out_dims)
            out[t.name] = (a, b)
            i += t.count
    return out


def _matrix_batch_sharding(w) -> NamedSharding | None:
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


def _to_matrix_batch(w: jax.Array, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
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
def _bases_program(rank: int, cfg: LoraXSConfig, split: NamedSharding):
    """``(w, keys) -> (A, B)`` for matrices split over the mesh by ``split``, keys alike."""
    keys = NamedSharding(split.mesh, PartitionSpec(split.spec[0]))
    jitted = jax.jit(lambda w, kd: _bases_for_matrices(w.astype(jnp.float32),
                                                       jax.random.wrap_key_data(kd), rank, cfg),
                     in_shardings=(split, keys), out_shardings=(split, split))

    def run(w, ks):
        # keys travel as host data: a one-device array cannot be put on a mesh that spans
        # other processes, a numpy array that every process holds can
        return jitted(w, jax.device_put(np.asarray(jax.random.key_data(ks)), keys))

    return run


def _gathered(w: jax.Array) -> jax.Array:
    """One kernel, replicated: LAPACK-style SVDs need whole matrices. The bases are placed back
    on the kernel's sharding afterwards (``_place_like``)."""
    sharding = getattr(w, "sharding", None)
    if isinstance(w, jax.core.Tracer) or not isinstance(sharding, NamedSharding):
        return w
    return jax.device_put(w, NamedSharding(sharding.mesh, PartitionSpec()))


_bases_jit = jax.jit(_bases_for_matrices, static_argnums=(2, 3))


# ----------------------------------------------------------------------------- apply
def _check_finite(targets: list[Target], flat: Mapping) -> None:
    concrete = [t for t in targets if not isinstance(_unbox(flat[t.path]), jax.core.Tracer)]
    if not concrete:
        return
    ok = jax.device_get([jnp.isfinite(jnp.asarray(_unbox(flat[t.path]))).all() for t in concrete])
    bad = [t.name for t, good in zip(concrete, ok) if not good]
    if bad:
        raise ValueError(f"base kernel(s) contain NaN or Inf, cannot take their SVD: {bad[:5]}"
                         f"{' ...' if len(bad) > 5 else ''}")


def derived_spec(kernel_spec: tuple, t: Target, role: str) -> tuple:
    """Partition spec (or logical names) of an adapter leaf from its kernel's: A keeps the
    kernel's input axes, B its output axes, the rank axis is never sharded, R is replicated
    apart from the stack axes, the scale follows the stack axes."""
    spec = tuple(kernel_spec) + (None,) * (len(t.shape) - len(kernel_spec))
    ns, ni = len(t.stack), len(t.in_dims)
    stack, ins, outs = spec[:ns], spec[ns:ns + ni], spec[ns + ni:]
    return {"A": stack + ins + (None,), "B": stack + (None,) + outs,
            "R": stack + (None, None), "scale": stack}[role]


def _place_like(kernel, value, t: Target, role: str):
    """Box with derived axis names, and/or put on the derived NamedSharding, like the kernel."""
    if isinstance(kernel, meta.Partitioned):
        return kernel.replace_boxed(value).replace(names=derived_spec(kernel.names, t, role))
    if isinstance(kernel, jax.core.Tracer) or isinstance(value, jax.core.Tracer):
        return value          # under jit/eval_shape: shardings come from the jit boundary
    sharding = getattr(kernel, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = jax.sharding.PartitionSpec(*derived_spec(tuple(sharding.spec), t, role))
        return jax.device_put(value, jax.sharding.NamedSharding(sharding.mesh, spec))
    return value


def apply(params: Mapping, cfg: LoraXSConfig, rng: Any = 0, *,
          bases: Mapping[str, tuple[jax.Array, jax.Array]] | None = None) -> Mapping:
    """Insert LoRA-XS leaves beside every kernel that ``cfg.targets`` selects.

    Args:
      params: a nested dict of params (linen ``params``, a FrozenDict, or boxed
        ``nn.Partitioned`` leaves, whose axis names the new leaves inherit). An NNX module goes
        through ``loraxs_jax.nnx_apply``.
      cfg: the LoraXSConfig.
      rng: a PRNG key (or int seed) for R ~ N(0, cfg.r_std²). The bases do not depend on it.
      bases: precomputed {kernel path: (A, B)} (from ``compute_bases`` or a bases cache).

    Returns:
      A new tree; base kernels are the very same arrays (never copied or mutated). Works under
      ``jax.eval_shape`` (count and plan a 7B model without weights) and ``jax.jit``.
    """
    targets = find_targets(params, cfg)
    flat = flatten(params)
    _check_finite(targets, flat)
    if bases is None:
        bases = compute_bases(params, cfg, targets)
    r_key = _as_key(rng)
    r_dtype = jnp.dtype(cfg.r_dtype)
    new = dict(flat)
    for t in targets:
        kernel = flat[t.path]
        if t.name not in bases:
            raise KeyError(f"no precomputed bases for {t.name}")
        a, b = bases[t.name]
        dtype = jnp.dtype(cfg.bases_dtype) if cfg.bases_dtype else _unbox(kernel).dtype
        r = t.rank
        r_mat = cfg.r_std * jax.random.normal(path_key(r_key, t.name), t.stack + (r, r), r_dtype)
        scale = jnp.full(t.stack, cfg.alpha / r, jnp.float32)
        *parent, leaf = t.path
        for role, value in (("A", a.astype(dtype)), ("B", b.astype(dtype)),
                            ("R", r_mat), ("scale", scale)):
            new[(*parent, adapter_key(str(leaf), role))] = _place_like(kernel, value, t, role)
    return unflatten(new, params)


# ----------------------------------------------------------------------------- inspection
def adapted_kernels(params: Mapping) -> dict[tuple, dict[str, Any]]:
    """{kernel path: {'kernel': W, 'A': .., 'B': .., 'R': .., 'scale': ..}} of an adapted tree."""
    flat = flatten(params)
    out: dict[tuple, dict[str, Any]] = {}
    for path, leaf in flat.items():
        role = leaf_role(path[-1])
        if role:
            base_path = (*path[:-1], role[0])
            out.setdefault(base_path, {})[role[1]] = leaf
    for base_path, d in out.items():
        missing = [r for r in ROLES if r not in d]
        if missing:
            raise ValueError(f"{path_str(base_path)} has LoRA-XS leaves but lacks {missing}")
        if base_path in flat:
            d["kernel"] = flat[base_path]
    return out


def count(params: Mapping, cfg: LoraXSConfig | None = None) -> dict[str, int]:
    """Parameter counts of an adapted tree (concrete or abstract, e.g. from jax.eval_shape).

    Returns: {'R': trainable LoRA-XS parameters (r² per adapted matrix, the paper's count),
    'extra': params trainable through ``cfg.trainable`` (the paper does not count the task head),
    'bases': frozen A and B entries, 'base': every other (frozen) param, 'adapted_matrices',
    'adapter_bytes': bytes of R on disk (r² × matrices × itemsize, without the file header)}.
    """
    res = {"R": 0, "extra": 0, "bases": 0, "base": 0, "adapted_matrices": 0, "adapter_bytes": 0}
    for path, leaf in flatten(params).items():
        leaf = _unbox(leaf)
        size = math.prod(_shape(leaf))
        role = leaf_role(path[-1])
        if role and role[1] == "R":
            res["R"] += size
            res["adapted_matrices"] += math.prod(_shape(leaf)[:-2])
            res["adapter_bytes"] += size * jnp.dtype(leaf.dtype).itemsize
        elif role and role[1] in ("A", "B"):
            res["bases"] += size
        elif role:
            continue
        elif cfg is not None and cfg.is_extra_trainable(path_str(path)):
            res["extra"] += size
        else:
            res["base"] += size
    return res
