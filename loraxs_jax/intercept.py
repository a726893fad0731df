r"""Op-level LoRA-XS for any JAX function: models we did not write, linen or NNX.

    y = x·W  →  y = x·W + (α/r)·((x·A)·R)·B

``wrap(fn)`` runs ``fn`` (e.g. ``model.apply``) on the base params with the LoRA-XS term added at
every contraction that consumes an adapted weight. It works at the jaxpr level: ``fn`` is traced
(``jax.make_jaxpr``) and the trace is replayed equation by equation on the caller's values, so it
sees the program that actually runs, whatever module, einsum spelling or operand order produced
it, and whatever flax cached (``nn.jit``). Each adapted weight is followed through layout-only
ops (casts, transposes, size-1 reshapes, sharding constraints) and through jit / remat / scan /
while / cond / custom_jvp / custom_vjp to the ``dot_general``\ s that consume it; the
contraction gives its geometry (``geometry.Geometry``: contracted axes are inputs, batch axes and
axes sliced by an enclosing scan are stack axes, the rest outputs), which must be the geometry
its bases were built for. At each such ``dot_general`` the term is added in factored form, never
W + ΔW: three thin einsums (x·A, ·(α/r)R, ·B), cast exactly as the weight was cast (bf16 compute
with f32 params gives a bf16 term), laid out like the dot's output. Control flow is rebuilt with
the public APIs (``lax.scan``, ``lax.while_loop``, ``lax.switch``, ``jax.checkpoint`` with its
policy), so structure is kept; ``jit`` and custom-derivative calls that carry an adapted weight
are inlined.

Never silent: after the trace every adapted weight must have been consumed by a contraction;
a weight that is unused, used elementwise (``x * w``), gathered, or contracted in two different
ways raises an ``AdaptError`` naming it, at trace time (nothing is added at run time).

``discover(fn, params, *args, targets=...)`` runs the same walk abstractly (``jax.eval_shape``,
no FLOPs) and returns each target's geometry, which ``apply(..., forward=...)`` uses to SVD the
right matricisation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Private, but what jax.core.eval_jaxpr itself uses to keep name stacks / eqn contexts.
from jax._src import source_info_util
from jax.extend import core as jcore
from jax.extend.core import primitives as prims

from loraxs_jax.geometry import Geometry
from loraxs_jax.tree import path_str

Array = Any


class AdaptError(ValueError):
    """A targeted weight cannot be adapted (or the adapters do not fit it)."""




# --------------------------------------------------------------------- provenance of a value
@dataclasses.dataclass(frozen=True, eq=False)
class _Tag:
    """Marks a traced value as (a layout-only view of) targeted weight ``path``.

    axes:    for each axis of the value, the W axis it is (None: an inserted size-1 axis)
    sliced:  W stack axes indexed away by enclosing scans (outermost first)
    adapter: A, B, R, scale with the ``sliced`` axes indexed away too; None while discovering
    per_row: R and scale carry a leading axis of the batch's rows (``replay(rows=...)``)
    """

    path: str
    axes: tuple[int | None, ...]
    sliced: tuple[int, ...] = ()
    adapter: Mapping[str, Array] | None = None
    per_row: bool = False

    def view(self, axes, **kw) -> _Tag:
        return dataclasses.replace(self, axes=tuple(axes), **kw)


class _Ctx:
    """Per-trace state: W shapes, declared stack axes, expected and found geometries."""

    def __init__(self, shapes, hints, expected):
        self.shapes: dict[str, tuple[int, ...]] = shapes
        self.hints: dict[str, frozenset[int]] = hints
        self.expected: Mapping[str, Geometry] | None = expected  # None: discovering
        self.found: dict[str, Geometry] = {}


# -------------------------------------------------------------------------------- interpreter
def _interpret(jaxpr: jcore.Jaxpr, consts: Sequence, args: Sequence, tags: Sequence,
               ctx: _Ctx) -> tuple[list, list]:
    """Evaluate ``jaxpr`` on ``args`` (binding on the current tracers), applying the rules to
    equations that read a tagged value. Returns (outputs, their tags)."""
    env: dict = {}
    tenv: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def tag(v):
        return None if isinstance(v, jcore.Literal) else tenv.get(v)

    env.update(zip(jaxpr.constvars, consts))
    for v, x, t in zip(jaxpr.invars, args, tags, strict=True):
        env[v], tenv[v] = x, t
    for eqn in jaxpr.eqns:
        invals, intags = [read(v) for v in eqn.invars], [tag(v) for v in eqn.invars]
        with _eqn_context(eqn):
            if any(intags):
                outs, otags = _RULES.get(eqn.primitive, _reject)(eqn, invals, intags, ctx)
            else:
                outs = _bind(eqn, invals)
                outs = outs if eqn.primitive.multiple_results else [outs]
                otags = [None] * len(outs)
        for v, x, t in zip(eqn.outvars, outs, otags, strict=True):
            env[v], tenv[v] = x, t
    return [read(v) for v in jaxpr.outvars], [tag(v) for v in jaxpr.outvars]


def _bind(eqn, invals):
    return eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))


@contextlib.contextmanager
def _eqn_context(eqn):
    """The name stack / eqn context eval_jaxpr uses, so the replay keeps scopes and metadata."""
    name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
    with source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack), \
            eqn.ctx.manager:
        yield


def _where(eqn) -> str:
    return source_info_util.summarize(eqn.source_info)


_TRANSPARENT_NAMES = ("convert_element_type, transpose, copy, reduce_precision, "
                      "sharding_constraint, checkpoint_name, size-1 reshape/squeeze/broadcast")


def _reject(eqn, invals, intags, ctx, why: str = ""):
    path = next(t.path for t in intags if t)
    raise AdaptError(
        f"targeted param '{path}' reaches `{eqn.primitive.name}` at {_where(eqn)}{why}. "
        f"LoRA-XS can only adapt a weight that is consumed by contractions (dot_general: "
        f"matmul/einsum/Dense), possibly through layout-only ops ({_TRANSPARENT_NAMES}) and "
        f"jit/remat/scan/while/cond. Remove '{path}' from the targets, or consume it with a "
        f"matmul.")


def _no_tagged_outputs(eqn, otags):
    for t in otags:
        if t:
            raise AdaptError(
                f"targeted param '{t.path}' leaves a `{eqn.primitive.name}` at {_where(eqn)} as "
                f"an output (e.g. returned from a loop/remat body); only weights consumed inside "
                f"are supported. Remove '{t.path}' from the targets.")


# ------------------------------------------------------------------- layout-only (transparent)
def _same_layout(eqn, invals, intags, ctx):
    return [_bind(eqn, invals)], [intags[0]]


def _transpose(eqn, invals, intags, ctx):
    t = intags[0]
    return [_bind(eqn, invals)], [t.view(t.axes[p] for p in eqn.params["permutation"])]


def _squeeze(eqn, invals, intags, ctx):
    t, dims = intags[0], set(eqn.params["dimensions"])
    return [_bind(eqn, invals)], [t.view(a for i, a in enumerate(t.axes) if i not in dims)]


def _reshape(eqn, invals, intags, ctx):
    """Reshape that only inserts/removes size-1 axes: non-1 axes keep their W axis, in order."""
    t, old, new = intags[0], invals[0].shape, eqn.params["new_sizes"]
    if (len(invals) != 1 or eqn.params.get("dimensions") is not None
            or [s for s in old if s != 1] != [s for s in new if s != 1]):
        _reject(eqn, invals, intags, ctx, f" (a reshape {old} -> {tuple(new)} that merges or "
                f"splits axes)")
    kept = iter(a for a, s in zip(t.axes, old) if s != 1)
    return [_bind(eqn, invals)], [t.view(next(kept) if s != 1 else None for s in new)]


def _broadcast(eqn, invals, intags, ctx):
    """broadcast_in_dim that only inserts size-1 axes (jnp.expand_dims, x[None])."""
    t, old = intags[0], invals[0].shape
    shape, bdims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    if (len(invals) != 1 or any(old[i] != shape[d] for i, d in enumerate(bdims))
            or any(s != 1 for j, s in enumerate(shape) if j not in bdims)):
        _reject(eqn, invals, intags, ctx, " (a broadcast that repeats the weight)")
    axes = [None] * len(shape)
    for i, d in enumerate(bdims):
        axes[d] = t.axes[i]
    return [_bind(eqn, invals)], [t.view(axes)]


# ------------------------------------------------------------------------------ contractions
def _geometry_at(t: _Tag, wc: Sequence[int], wb: Sequence[int], ctx: _Ctx, eqn) -> Geometry:
    """Geometry implied by one contraction: the weight operand's contracting dims ``wc`` and
    batch dims ``wb`` (operand axis indices, mapped back to W axes through ``t.axes``)."""
    shape, hint = ctx.shapes[t.path], ctx.hints.get(t.path, frozenset())
    ins = {t.axes[d] for d in wc} - {None}
    if ins & hint:
        raise AdaptError(f"param '{t.path}': stack axes {sorted(hint)} are contracted by the "
                         f"dot_general at {_where(eqn)} (W axes {sorted(ins)} are contracted)")
    stack = ({t.axes[d] for d in wb} - {None}) | set(t.sliced) | hint
    g = Geometry.make(shape, stack, ins)
    prev = ctx.found.get(t.path)
    if prev is not None and prev != g:
        raise AdaptError(f"param '{t.path}' is contracted in two different ways: {prev} and, at "
                         f"{_where(eqn)}, {g}. One LoRA-XS adapter cannot serve both; remove it "
                         f"from the targets.")
    if ctx.expected is not None and ctx.expected[t.path] != g:
        raise AdaptError(
            f"param '{t.path}': its LoRA-XS bases were built for the geometry "
            f"{ctx.expected[t.path]}, but this function contracts it as {g} (at {_where(eqn)}). "
            f"Adapt it for this use: loraxs_jax.apply(params, cfg, forward=...) reads the "
            f"geometry from the function itself (or set LoraXSConfig.in_axes/stacked_axes).")
    ctx.found[t.path] = g
    return g


def _dot_general(eqn, invals, intags, ctx):
    if intags[0] and intags[1]:
        _reject(eqn, invals, intags, ctx, " as both operands")
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    w_lhs = intags[0] is not None
    t = intags[0] or intags[1]
    (w, x), (wc, xc), (wb, xb) = ((invals[0], invals[1]), (lc, rc), (lb, rb)) if w_lhs else \
        ((invals[1], invals[0]), (rc, lc), (rb, lb))
    g = _geometry_at(t, wc, wb, ctx, eqn)
    out = _bind(eqn, invals)
    if t.adapter is None:
        return [out], [None]
    delta = _delta(x, w, t, g, (xc, wc), (xb, wb), w_lhs, out.shape, out.dtype, eqn.params)
    return [lax.add(out, delta)], [None]


def _delta(x, w, t: _Tag, g: Geometry, contract, batch, w_lhs: bool, out_shape, out_dtype,
           params) -> Array:
    """s·((x·A)·R)·B laid out like ``dot_general(x, w)`` (operands in their original order).

    Each W axis gets one einsum letter, shared by x's paired contracting/batch axes and by
    A/B/R; stack axes not sliced away appear in A, R and B (and the output when free).
    """
    letters = iter(string.ascii_letters)
    wl = [next(letters) for _ in g.shape]
    p, q = next(letters), next(letters)
    xs = [None] * x.ndim
    for xd, wd in [*zip(*contract), *zip(*batch)]:
        xs[xd] = wl[t.axes[wd]] if t.axes[wd] is not None else next(letters)
    xs = [c or next(letters) for c in xs]
    (xc, wc), (xb, wb) = contract, batch
    x_free = [xs[d] for d in range(x.ndim) if d not in xc and d not in xb]
    w_free = [wl[t.axes[d]] for d in range(w.ndim)
              if d not in wc and d not in wb and t.axes[d] is not None]
    out = "".join([xs[d] for d in xb] + (w_free + x_free if w_lhs else x_free + w_free))
    st = "".join(wl[a] for a in g.stack if a not in t.sliced)
    a_sub = st + "".join(wl[a] for a in g.inputs) + p
    b_sub = st + q + "".join(wl[a] for a in g.outputs)
    x_sub = "".join(xs)
    keep = "".join(c for c in out if c in x_sub or c in a_sub)

    cd = w.dtype  # the weight's dtype at the dot: cast the bases exactly as W was cast
    ad = t.adapter
    rs = ad["R"] * ad["scale"][..., None, None].astype(ad["R"].dtype)
    row = ""
    if t.per_row:                        # R (rows, *stack, r, r): row b of x takes R[b]
        row = xs[0]
        if row not in keep or x.shape[0] != rs.shape[0]:
            raise AdaptError(f"per-row adapters for '{t.path}': the activation's leading axis "
                             f"(size {x.shape[0]}) must be the batch of {rs.shape[0]} rows and "
                             f"survive the contraction (at a dot_general of x {x.shape})")
    kw = dict(precision=params.get("precision"),
              preferred_element_type=params.get("preferred_element_type"))
    h = jnp.einsum(f"{x_sub},{a_sub}->{keep}{p}", x, ad["A"].astype(cd), **kw)
    h = jnp.einsum(f"{keep}{p},{row}{st}{p}{q}->{keep}{q}", h, rs.astype(cd), **kw)
    h = jnp.einsum(f"{keep}{q},{b_sub}->{out}", h, ad["B"].astype(cd), **kw)
    return h.astype(out_dtype).reshape(out_shape)  # reshape only re-inserts size-1 axes


# ---------------------------------------------------------------------- calls and control flow
def _inline(key: str):
    """jit / closed_call / custom_jvp_call / custom_vjp_call: evaluate the callee in place.
    (For custom_* calls this drops the custom derivative of that call.)"""
    def rule(eqn, invals, intags, ctx):
        closed = eqn.params[key]
        return _interpret(closed.jaxpr, closed.consts, invals, intags, ctx)
    return rule


def _check_params(eqn, known: set[str]):
    extra = set(eqn.params) - known
    if extra:
        raise AdaptError(f"`{eqn.primitive.name}` has parameters {sorted(extra)} this prototype "
                         f"does not know (JAX version change?); cannot rebuild it around a "
                         f"targeted weight")


def _reject_carry(eqn, invals, intags, ctx, tags):
    if any(tags):
        _reject(eqn, invals, intags, ctx, " as a loop carry (only loop constants or scanned xs "
                "are supported)")


def _scan_slice(t: _Tag | None, ctx: _Ctx, eqn):
    """For a tagged scan x: the W axis k being scanned and the adapter with k moved to front."""
    if t is None or t.axes[0] is None:
        return None, None
    k = t.axes[0]
    if t.adapter is None:
        return k, None
    live = [a for a in ctx.expected[t.path].stack if a not in t.sliced]
    if k not in live:
        raise AdaptError(
            f"param '{t.path}' is scanned over its axis {k} at {_where(eqn)} (e.g. nn.scan "
            f"layers), but its LoRA-XS bases were built for the geometry "
            f"{ctx.expected[t.path]}, where axis {k} is not a stack axis. Re-apply with "
            f"LoraXSConfig.stacked_axes (1 for nn.scan layers), or with forward= so the geometry "
            f"is read from the model.")
    i = live.index(k)
    # per-row R and scale lead with the rows axis: their stack axes start one later
    return k, {n: jnp.moveaxis(v, i + (t.per_row and n in ("R", "scale")), 0)
               for n, v in t.adapter.items()}


def _scan(eqn, invals, intags, ctx):
    _check_params(eqn, {"jaxpr", "num_consts", "num_carry", "length", "reverse", "unroll",
                        "linear", "_split_transpose"})
    p = eqn.params
    nc, nk, body = p["num_consts"], p["num_carry"], p["jaxpr"]
    _reject_carry(eqn, invals, intags, ctx, intags[nc:nc + nk])
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
    xtags = intags[nc + nk:]
    sliced = [_scan_slice(t, ctx, eqn) for t in xtags]
    ks, ads = [k for k, _ in sliced], [a for _, a in sliced]

    def step(carry, x):
        xv, xa = x
        tags = [t and t.view(t.axes[1:], sliced=t.sliced + ((k,) if k is not None else ()),
                             adapter=a if k is not None else t.adapter)
                for t, k, a in zip(xtags, ks, xa)]
        outs, otags = _interpret(body.jaxpr, body.consts, [*consts, *carry, *xv],
                                 [*intags[:nc], *[None] * nk, *tags], ctx)
        _no_tagged_outputs(eqn, otags)
        return outs[:nk], outs[nk:]

    carry, ys = lax.scan(step, list(init), (list(xs), ads), length=p["length"],
                         reverse=p["reverse"], unroll=p["unroll"])
    return [*carry, *ys], [None] * len(eqn.outvars)


def _while(eqn, invals, intags, ctx):
    _check_params(eqn, {"cond_jaxpr", "body_jaxpr", "cond_nconsts", "body_nconsts"})
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cc, bc, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
    ctags, btags = intags[:cn], intags[cn:cn + bn]
    _reject_carry(eqn, invals, intags, ctx, intags[cn + bn:])
    none = [None] * len(init)

    def cond(c):
        cj = p["cond_jaxpr"]
        return _interpret(cj.jaxpr, cj.consts, [*cc, *c], [*ctags, *none], ctx)[0][0]

    def body(c):
        bj = p["body_jaxpr"]
        outs, otags = _interpret(bj.jaxpr, bj.consts, [*bc, *c], [*btags, *none], ctx)
        _no_tagged_outputs(eqn, otags)
        return outs

    return lax.while_loop(cond, body, list(init)), none


def _cond(eqn, invals, intags, ctx):
    _check_params(eqn, {"branches"})
    if intags[0]:
        _reject(eqn, invals, intags, ctx, " as a branch index")

    def branch(closed, *ops):
        outs, otags = _interpret(closed.jaxpr, closed.consts, ops, intags[1:], ctx)
        _no_tagged_outputs(eqn, otags)
        return outs

    outs = lax.switch(invals[0], [functools.partial(branch, b) for b in eqn.params["branches"]],
                      *invals[1:])
    return list(outs), [None] * len(eqn.outvars)


def _remat(eqn, invals, intags, ctx):
    """Rebuild as jax.checkpoint with the same policy; adapters enter as explicit inputs."""
    _check_params(eqn, {"jaxpr", "prevent_cse", "differentiated", "policy"})
    p = eqn.params

    def body(args, adapters):
        tags = [t and t.view(t.axes, adapter=a) for t, a in zip(intags, adapters)]
        outs, otags = _interpret(p["jaxpr"], (), args, tags, ctx)
        _no_tagged_outputs(eqn, otags)
        return outs

    fn = jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])
    return fn(list(invals), [t and t.adapter for t in intags]), [None] * len(eqn.outvars)


def _rules() -> dict:
    from jax._src.ad_checkpoint import name_p  # checkpoint_name (not in jax.extend)
    r = {prims.convert_element_type_p: _same_layout, prims.copy_p: _same_layout,
         prims.reduce_precision_p: _same_layout, prims.sharding_constraint_p: _same_layout,
         name_p: _same_layout, prims.transpose_p: _transpose, prims.squeeze_p: _squeeze,
         prims.reshape_p: _reshape, prims.broadcast_in_dim_p: _broadcast,
         prims.dot_general_p: _dot_general, prims.jit_p: _inline("jaxpr"),
         prims.closed_call_p: _inline("call_jaxpr"), prims.custom_jvp_call_p: _inline("call_jaxpr"),
         prims.custom_vjp_call_p: _inline("call_jaxpr"), prims.scan_p: _scan,
         prims.while_p: _while, prims.cond_p: _cond, prims.remat_p: _remat}
    return r


_RULES = _rules()


# ------------------------------------------------------------------------------- entry points
def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _split_args(args) -> tuple[list, Callable]:
    """Array leaves of ``args`` (traced) and a function rebuilding ``args`` from them; other
    leaves (Python flags, strings, functions) stay static."""
    leaves, tree = jax.tree.flatten(args)
    dyn = [i for i, a in enumerate(leaves) if _is_array(a)]

    def rebuild(dvals):
        full = list(leaves)
        for i, v in zip(dyn, dvals, strict=True):
            full[i] = v
        return jax.tree.unflatten(tree, full)

    return [leaves[i] for i in dyn], rebuild


def _run(fn, params, dvals, rebuild, tag_for: Callable[[str, Any], _Tag | None], ctx: _Ctx):
    """Trace ``fn(params, *args, **kwargs)`` (``rebuild(dvals)`` gives (args, kwargs)) to a
    jaxpr, then replay it on the given values with each param leaf tagged by ``tag_for``."""
    pflat, ptree = jax.tree_util.tree_flatten_with_path(params)
    paths, pleaves = [path_str(k) for k, _ in pflat], [v for _, v in pflat]
    out_tree = []

    def flat_fn(pl, dl):
        args, kwargs = rebuild(dl)
        outs, tree = jax.tree.flatten(fn(jax.tree.unflatten(ptree, pl), *args, **kwargs))
        out_tree.append(tree)
        return outs

    closed = jax.make_jaxpr(flat_fn)(pleaves, list(dvals))
    tags = [tag_for(p, v) for p, v in zip(paths, pleaves)] + [None] * len(dvals)
    outs, otags = _interpret(closed.jaxpr, closed.consts, [*pleaves, *dvals], tags, ctx)
    for t in otags:
        if t:
            raise AdaptError(f"adapted param '{t.path}' is returned by the function itself "
                             f"rather than consumed by a contraction; remove it from the targets")
    return jax.tree.unflatten(out_tree[0], outs)


def _leaf_shapes(params) -> dict[str, tuple[int, ...]]:
    return {path_str(k): tuple(np.shape(v)) for k, v in
            jax.tree_util.tree_flatten_with_path(params)[0]}


def _check_targets(targets: Iterable[str], shapes: Mapping[str, tuple]):
    for t in targets:
        if t not in shapes:
            near = difflib.get_close_matches(t, list(shapes), n=3)
            raise AdaptError(f"target '{t}' is not a leaf path of params"
                             + (f"; did you mean {near}?" if near else ""))


def _require_used(targets, ctx: _Ctx):
    unused = sorted(set(targets) - set(ctx.found))
    if unused:
        raise AdaptError(
            f"adapted params {unused} are never consumed by a contraction in this function "
            f"(unused here, or used only by an op LoRA-XS cannot adapt): the adaptation would do "
            f"nothing. Remove them from the targets, or call the function that uses them.")


def discover(fn: Callable, params: Any, *args: Any, targets: Iterable[str],
             stack_hints: Mapping[str, Iterable[int]] | None = None,
             **kwargs: Any) -> dict[str, Geometry]:
    """The geometry of each targeted leaf of ``params`` in ``fn(params, *args, **kwargs)``,
    from one abstract trace (``jax.eval_shape``: no FLOPs; params may be shape structs).

    Args:
      fn: e.g. ``model.apply`` (params are then the variables dict, paths start with
        ``params/``) or any function of a param tree.
      targets: '/'-joined leaf paths.
      stack_hints: {path: W axes that index independent matrices although the contraction
        treats them as free, e.g. axis 0 of gemma's kv_einsum weight (k and v)}.
    Raises:
      AdaptError, naming the param, for a target that is unused, reaches an op other than a
      contraction (``x * w``, a gather), or is contracted in two different ways.
    """
    targets = set(targets)
    shapes = _leaf_shapes(params)
    _check_targets(targets, shapes)
    hints = {p: frozenset(a % len(shapes[p]) for a in ax) for p, ax in (stack_hints or {}).items()}
    for p in set(hints) - targets:
        raise AdaptError(f"stack_hints names '{p}', which is not one of the targets")
    ctx = _Ctx(shapes, hints, expected=None)

    def tag_for(path, v):
        return _Tag(path, tuple(range(np.ndim(v)))) if path in targets else None

    dvals, rebuild = _split_args((args, kwargs))
    jax.eval_shape(lambda p, d: _run(fn, p, d, rebuild, tag_for, ctx), params, dvals)
    _require_used(targets, ctx)
    return {p: ctx.found[p] for p in sorted(targets)}


def replay(fn: Callable, params: Any, adapters: Mapping[str, Mapping[str, Array]],
           args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
           rows: Array | None = None) -> Any:
    """``fn(params, *args, **kwargs)`` with the LoRA-XS term at every contraction of each weight
    named in ``adapters``: {'/'-joined path: {'A', 'B', 'R', 'scale'}} as stored in a param tree
    (``geometry`` module: their shapes carry the geometry). Jittable and differentiable (e.g.
    with respect to the R's alone); raises AdaptError when a weight is not consumed by
    contractions of the geometry its bases were built for.

    ``rows`` (B,) int: per-row adapters sharing A and B. Each R (and scale) then carries a
    leading bank axis, (N, *stack, r, r), and the batch row b (the leading axis of every
    activation that meets an adapted weight) is adapted with R[rows[b]]: x·A stays one shared
    matmul, the r×r step is per row, ·B is shared again."""
    shapes = _leaf_shapes(params)
    _check_targets(adapters, shapes)
    geometries, canonical = {}, {}
    for path, ad in adapters.items():
        bank = () if rows is None else np.shape(ad["R"])[:1]
        r_shape = np.shape(ad["R"])[len(bank):]
        g = Geometry.from_leaves(shapes[path], np.shape(ad["A"]), np.shape(ad["B"]), r_shape)
        rank = r_shape[-1]
        want = g.stored_shapes(rank)
        want["R"], want["scale"] = bank + want["R"], bank + want["scale"]
        got = {k: tuple(np.shape(ad[k])) for k in want}
        if got != want:
            raise AdaptError(f"the LoRA-XS leaves of '{path}' have shapes {got}, which do not "
                             f"fit its kernel {shapes[path]} ({g}) at rank {rank}: {want}")
        a, b = g.canonical(ad["A"], ad["B"])
        geometries[path], canonical[path] = g, {"A": a, "B": b, "R": ad["R"],
                                                "scale": ad["scale"]}
        if rows is not None:
            canonical[path].update(R=ad["R"][rows], scale=ad["scale"][rows])
    ctx = _Ctx(shapes, {p: frozenset(g.stack) for p, g in geometries.items()}, geometries)

    def tag_for(path, v):
        if path not in geometries:
            return None
        return _Tag(path, tuple(range(np.ndim(v))), adapter=canonical[path],
                    per_row=rows is not None)

    dvals, rebuild = _split_args((tuple(args), dict(kwargs or {})))
    out = _run(fn, params, dvals, rebuild, tag_for, ctx)
    _require_used(geometries, ctx)
    return out


def adapters_of(tree: Any) -> tuple[Any, dict[str, dict[str, Array]]]:
    """(the tree without its LoRA-XS leaves, {kernel path: {'A','B','R','scale'}}), unboxed."""
    from flax.core import meta

    from loraxs_jax.tree import adapted_kernels, flatten, leaf_role, unflatten

    tree = meta.unbox(tree)
    found = adapted_kernels(tree)
    missing = [path_str(p) for p, d in found.items() if "kernel" not in d]
    if missing:
        raise AdaptError(f"LoRA-XS leaves without their kernel: {missing[:5]}")
    base = {p: v for p, v in flatten(tree).items() if not leaf_role(p[-1])}
    adapters = {path_str(p): {r: d[r] for r in ("A", "B", "R", "scale")} for p, d in found.items()}
    return unflatten(base, tree), adapters


def wrap(fn: Callable) -> Callable:
    """``fn`` (e.g. ``model.apply``) running adapted: same signature and outputs, with the
    LoRA-XS term added at every contraction of each adapted weight in its first argument.

    The first argument is the adapted tree (``{"params": adapted}`` for linen's apply, or the
    params themselves for a function of params), or an adapted NNX module. ``fn`` receives it
    without the LoRA-XS leaves, i.e. exactly the tree it was written for. Jit it as usual; the
    interception happens at trace time.

    Example::

        params = loraxs_jax.apply(params, cfg, rng)
        logits = jax.jit(loraxs_jax.wrap(model.apply))({"params": params}, tokens)
    """

    @functools.wraps(fn)
    def wrapped(tree: Any, *args: Any, **kwargs: Any) -> Any:
        from flax import nnx as flax_nnx

        if isinstance(tree, flax_nnx.Module):
            from loraxs_jax import nnx

            return nnx.call(tree, fn, *args, **kwargs)
        base, adapters = adapters_of(tree)
        if not adapters:
            raise AdaptError(
                "wrap: these params hold no LoRA-XS leaves (*_loraxs_R), so the adapted function "
                "would run the base model unchanged. Pass the tree loraxs_jax.apply or "
                "loraxs_jax.load_adapter returned; call the function directly for a base or "
                "merged model.")
        return replay(fn, base, adapters, args, kwargs)

    return wrapped
