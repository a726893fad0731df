"""Meshes, partition rules and the shardings of params, adapters and optimizer state.

A run lays its devices out as a 3-axis ``jax.sharding.Mesh`` ``(data, fsdp, tensor)``:

* ``data``   pure data parallelism: params replicated, the batch split;
* ``fsdp``   the batch split *and* the params' 'embed' axis split (ZeRO-3 / FSDP: XLA gathers a
  weight just before its matmul and reduce-scatters gradients);
* ``tensor`` Megatron-style model parallelism over heads, kv, mlp and vocab.

Params name their axes logically (``nn.with_logical_partitioning`` in our models); ``rules`` map
logical names to mesh axes (flax's ``logical_axis_rules`` format). LoRA-XS leaves take their
spec from their kernel (:func:`derived_spec`): A keeps the kernel's input axes, B its output
axes, the rank axis is never split, R (r×r, tiny) is replicated. Programs are plain ``jax.jit``
with explicit ``in_shardings``/``out_shardings`` (``parallel.jit``); XLA's SPMD partitioner
inserts every collective.

Mesh axis types are ``AxisType.Auto``: shardings are given explicitly at the jit boundary and by
the models' ``with_logical_constraint`` on activations, and the partitioner propagates the rest.
``Explicit`` axes would make sharding part of every array's type, so each op of the (unmodified,
linen) models and of optax would have to be sharding-correct by construction; Auto is what
flax/MaxText-style code is written for and gives identical programs here.

A dimension that a rule would shard but whose size the mesh axis does not divide (RoBERTa's
vocabulary 50265 over tensor=2, a 2-label head) is *replicated* along that axis with a logged
warning by default (``on_indivisible="replicate"``), since the alternative is that such a model
cannot use that mesh at all; ``on_indivisible="raise"`` turns it into an error. The batch is never
silently replicated: a global batch the data axes do not divide raises.

Multi-host: call ``parallel.hosts.maybe_initialize_distributed`` first thing, build the mesh
over ``jax.devices()`` (all hosts), let each process load its own slice of every batch
(``parallel.batch.process_batch_slice``) and assemble global arrays with
``parallel.batch.global_batch`` (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from loraxs_jax.geometry import Geometry
from loraxs_jax.tree import adapter_key, flatten, leaf_role, path_str, shape_of, unflatten

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or axes); flax ``logical_axis_rules`` format. A mesh axis is
# used at most once per array: in an activation (batch, length, embed), 'batch' takes fsdp first,
# so 'embed' stays unsharded there while kernels (embed, heads) split embed over fsdp.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),   # activations: examples over data and fsdp
    ("length", None),        # sequence axis: not split (no sequence parallelism)
    ("embed", "fsdp"),       # model width: FSDP shards every kernel along it
    ("vocab", "tensor"),     # embedding rows / LM-head columns
    ("heads", "tensor"),     # query heads (flattened heads*head_dim in kernels)
    ("kv", "tensor"),        # key/value heads (decoder kernels), head_dim (encoder activations)
    ("mlp", "tensor"),       # FFN width
    ("classes", None),       # classification head outputs (few)
    ("layers", None),        # nn.scan stacked-layer axis
)


# ----------------------------------------------------------------------------- meshes
def _get(cfg: Any, name: str, default: int) -> int:
    v = cfg.get(name, default) if isinstance(cfg, Mapping) or hasattr(cfg, "get") else getattr(
        cfg, name, default)
    return int(v)


def mesh_shape(mesh_cfg: Any, n_devices: int) -> dict[str, int]:
    """{'data', 'fsdp', 'tensor': size} with the one -1 resolved to fill ``n_devices``.

    ``mesh_cfg`` is a ConfigDict/mapping (or object) with ``data``, ``fsdp``, ``tensor``; missing
    fields are 1.
    """
    sizes = {a: _get(mesh_cfg, a, 1) for a in MESH_AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive or -1 (fill), got {bad}")
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1 (fill the remaining devices), got {fill}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if n_devices % fixed:
            raise ValueError(
                f"mesh axis '{fill[0]}'=-1 cannot fill {n_devices} devices: the other axes "
                f"{ {a: s for a, s in sizes.items() if s != -1} } multiply to {fixed}, which does "
                f"not divide {n_devices}")
        sizes[fill[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ValueError(
            f"mesh {sizes} needs data*fsdp*tensor = {fixed} devices but {n_devices} are "
            f"available; set one axis to -1 to fill, or sizes whose product is {n_devices}")
    return sizes


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes ('data', 'fsdp', 'tensor') of Auto type (see module docstring).

    Args:
      mesh_cfg: the config's ``mesh`` section: ``data``, ``fsdp``, ``tensor`` sizes, one of them
        may be -1 (fill the remaining devices).
      devices: defaults to ``jax.devices()`` (every device of every process). ``jax.make_mesh``
        orders them so that ``tensor`` (the chattiest axis) stays within fast links.
    Returns:
      The mesh; ``mesh.shape`` is {'data': d, 'fsdp': f, 'tensor': t}.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


# ----------------------------------------------------------------------------- specs
def _axes_tuple(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Sequence = DEFAULT_RULES, *, path: str = "array",
             on_indivisible: str = "replicate") -> PartitionSpec:
    """The mesh ``PartitionSpec`` of one array from its logical axis names.

    flax's ``logical_to_mesh_axes`` applies the rules (a name missing from them raises here
    rather than silently replicating); then each dimension keeps the longest prefix of its mesh
    axes whose product divides it. What is dropped is replicated with a warning, or raises with
    ``on_indivisible="raise"``.
    """
    if on_indivisible not in ("replicate", "raise"):
        raise ValueError(f"on_indivisible must be 'replicate' or 'raise', got {on_indivisible!r}")
    names = tuple(names) + (None,) * (len(shape) - len(tuple(names)))
    if len(names) != len(shape):
        raise ValueError(f"{path}: {len(names)} logical axis names {names} for shape "
                         f"{tuple(shape)}")
    unknown = [n for n in names if n is not None and n not in {k for k, _ in rules}]
    if unknown:
        raise ValueError(f"{path}: logical axis names {unknown} have no rule; add them to the "
                         f"rules (known: {[k for k, _ in rules]})")
    spec = nn.logical_to_mesh_axes(names, rules)
    out = []
    for dim, (name, entry, size) in enumerate(zip(names, spec, shape)):
        axes = _axes_tuple(entry)
        keep: list[str] = []
        for ax in axes:
            if size % (math.prod(mesh.shape[a] for a in keep) * mesh.shape[ax]):
                msg = (f"mesh axis '{ax}' of size {mesh.shape[ax]} does not divide dimension "
                       f"{dim} ('{name}', size {size}) of {path} {tuple(shape)}"
                       + (f" (already split {math.prod(mesh.shape[a] for a in keep)}-way over "
                          f"{keep})" if keep else ""))
                if on_indivisible == "raise":
                    raise ValueError(msg + "; choose a mesh size that divides it or map "
                                     f"'{name}' to another mesh axis in the rules")
                logger.warning("%s: replicating it along '%s'", msg, ax)
                break
            keep.append(ax)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return PartitionSpec(*out)


def _is_spec_leaf(x) -> bool:
    return x is None or isinstance(x, (tuple, PartitionSpec))


def param_shardings(params_or_shapes: Mapping, logical_axes: Mapping | None, mesh: Mesh,
                    rules: Sequence = DEFAULT_RULES, *, on_indivisible: str = "replicate"
                    ) -> dict:
    """A tree of ``NamedSharding`` like a base (unadapted) param tree.

    Args:
      params_or_shapes: params, ``jax.ShapeDtypeStruct``s (``param_shapes``/``eval_shape``) or
        boxed ``nn.Partitioned`` leaves.
      logical_axes: a tree like it of logical names per leaf (tuples or PartitionSpecs, e.g.
        ``models.decoder.param_logical_axes(config)``); None reads the names from the boxes.
      mesh: from :func:`make_mesh`.
      rules: logical name -> mesh axes (``DEFAULT_RULES``).
      on_indivisible: "replicate" (warn) or "raise" when a mesh axis does not divide a dimension.
    Returns:
      A nested dict of ``NamedSharding`` with the structure of ``params_or_shapes``.
    """
    if logical_axes is None:
        logical_axes = nn.get_partition_spec(params_or_shapes)
    flat = flatten(params_or_shapes)
    names = flatten(logical_axes) if isinstance(logical_axes, Mapping) else {}
    out = {}
    for path, leaf in flat.items():
        if path not in names:
            role = leaf_role(path[-1])
            hint = (" (a LoRA-XS leaf: use adapted_shardings(adapted_params, base_shardings))"
                    if role else "")
            raise KeyError(f"no logical axis names for param {path_str(path)}{hint}")
        spec = names[path]
        shape = tuple(shape_of(leaf))
        spec = spec_for(tuple(spec) if spec is not None else (), shape, mesh, rules,
                        path=path_str(path), on_indivisible=on_indivisible)
        out[path] = NamedSharding(mesh, spec)
    return unflatten(out, {})


def derived_spec(kernel_spec: Sequence, geometry: Geometry, role: str) -> tuple:
    """Partition spec (or logical names) of an adapter leaf from its kernel's, as the leaf is
    stored (``Geometry.stored_shapes``): A keeps the kernel's stack and input axes, B its stack
    and output axes, the rank axis is never sharded, R and the scale follow the stack axes."""
    spec = tuple(kernel_spec) + (None,) * (len(geometry.shape) - len(tuple(kernel_spec)))
    stack = tuple(spec[a] for a in geometry.stack)
    if role == "R":
        return stack + (None, None)
    if role == "scale":
        return stack
    keep = set(geometry.stack) | set(geometry.inputs if role == "A" else geometry.outputs)
    if geometry.standard:
        kept = tuple(spec[a] for a in sorted(keep))
        ns = len(geometry.stack)
        return kept + (None,) if role == "A" else kept[:ns] + (None,) + kept[ns:]
    kept = tuple(spec[a] if a in keep else None for a in range(len(spec)))
    return kept + (None,) if role == "A" else (None,) + kept


def adapted_shardings(adapted_params: Mapping, base_shardings: Mapping) -> dict:
    """Shardings for a tree from ``loraxs_jax.apply``: base leaves keep ``base_shardings``; each
    ``<kernel>_loraxs_{A,B,R,scale}`` gets :func:`derived_spec` of its kernel's spec (A: input
    axes, B: output axes, rank axis unsharded, R and scale: stack axes only)."""
    flat = flatten(adapted_params)
    base = flatten(base_shardings)
    out = {}
    for path in flat:
        role = leaf_role(path[-1])
        if role is None:
            if path not in base:
                raise KeyError(f"base_shardings has no entry for {path_str(path)}")
            out[path] = base[path]
            continue
        kpath = (*path[:-1], role[0])
        if kpath not in base:
            raise KeyError(f"base_shardings has no entry for {path_str(kpath)}, the kernel of "
                           f"{path_str(path)}")
        ks = base[kpath]
        if kpath not in flat:
            raise KeyError(f"{path_str(path)} without its kernel {path_str(kpath)}: pass the "
                           "whole adapted tree (then subtree_shardings for a half of split)")
        leaves = {r: shape_of(flat[(*path[:-1], adapter_key(role[0], r))]) for r in ("A", "B", "R")}
        g = Geometry.from_leaves(shape_of(flat[kpath]), leaves["A"], leaves["B"], leaves["R"])
        out[path] = NamedSharding(ks.mesh, PartitionSpec(*derived_spec(tuple(ks.spec), g, role[1])))
    return unflatten(out)


def subtree_shardings(shardings: Mapping, like: Mapping) -> dict:
    """The entries of ``shardings`` at the leaves of ``like`` (e.g. the trainable or frozen half
    of ``split``)."""
    flat = flatten(shardings)
    return unflatten({p: flat[p] for p in flatten(like)}, {})


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis over data and fsdp; a pytree prefix for a whole batch dict."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def shard_params(params: Any, shardings: Any, donate: bool = False) -> Any:
    """``jax.device_put`` of a tree onto matching shardings (host arrays are split on the way;
    with ``donate`` the source device buffers may be reused)."""
    return jax.device_put(params, shardings, donate=donate)


def opt_state_shardings(abstract_opt_state: Any, param_shardings_: Any, mesh: Mesh) -> Any:
    """Shardings of an optimizer state: every per-param leaf (AdamW's mu and nu, MultiSteps'
    accumulated gradients, ...) like its param, everything else (step counts, schedule state)
    replicated.

    A leaf belongs to a param when the trailing dict keys of its path are exactly that param's
    path, which is how optax lays out per-param state. Unlike ``optax.tree_map_params`` this
    also reads ``multi_transform`` states, whose groups hold ``MaskedNode``s in place of the
    other groups' params (our R/head learning-rate split).

    Args:
      abstract_opt_state: ``tx.init(params)`` or its ``jax.eval_shape``.
      param_shardings_: a nested dict of ``NamedSharding`` like the params ``tx`` was built for.
      mesh: the mesh (for the replicated leaves).
    """
    by_path = {tuple(map(str, p)): s for p, s in flatten(param_shardings_).items()}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_opt_state)
    out = []
    for path, leaf in leaves:
        keys: list[str] = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.insert(0, str(k.key))
        s = by_path.get(tuple(keys))
        shape = tuple(getattr(leaf, "shape", ()))
        if s is not None and len(s.spec) > len(shape):
            raise ValueError(f"optimizer state leaf {jax.tree_util.keystr(path)} of shape "
                             f"{shape} cannot take its param's sharding {s.spec}")
        out.append(s if s is not None else replicated(mesh))
    return jax.tree_util.tree_unflatten(treedef, out)
