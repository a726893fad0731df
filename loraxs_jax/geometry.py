"""How a kernel W of any shape is viewed as LoRA-XS matrices, and how its A and B are stored.

A weight's GEOMETRY splits W's axes into three groups (each kept in W's own order):

    stack    axes that index independent matrices (``nn.scan`` layers, k and v stacked in one
             einsum weight, dot_general batch axes); each matrix gets its own SVD and its own R
    inputs   axes contracted with the activation x
    outputs  the rest

so W is ``prod(stack)`` matrices of shape (prod(inputs), prod(outputs)). The geometry comes from
the contraction that consumes W (``intercept.discover`` reads it off ``dot_general``), or, without
a trace, from ``LoraXSConfig``: a 2-D kernel is (in, out); more axes need ``in_axes``;
``stacked_axes`` are leading.

Storage is self-describing, so ``merge``, ``wrap`` and the adapter files need nothing but the
tree. In the STANDARD geometry (stack axes first, then inputs, then outputs: every nn.Dense,
nn.DenseGeneral and nn.scan kernel) the bases are compact::

    A (*stack, *inputs, r)    B (*stack, r, *outputs)    R (*stack, r, r)    scale (*stack,)

Any other geometry (a torch-layout (out, in) kernel used as x·Wᵀ; gemma's q_einsum (N, D, H)
contracting D) keeps W's axes in place: A has W's shape with the output axes set to 1, then r; B
has r, then W's shape with the input axes set to 1; R and scale stay compact. A size-1 axis of W
carries no information, so its role is fixed by one rule (:meth:`Geometry.make`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

ROLE_NAMES = {"s": "stack", "i": "input", "o": "output"}


@dataclasses.dataclass(frozen=True)
class Geometry:
    """``shape`` of W and its sorted ``stack``, ``inputs`` and ``outputs`` axis indices (a
    partition of ``range(len(shape))``). Build it with :meth:`make` (or :meth:`leading`,
    :meth:`from_roles`), which normalises the roles of size-1 axes."""

    shape: tuple[int, ...]
    stack: tuple[int, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    # ------------------------------------------------------------------ construction
    @classmethod
    def make(cls, shape: Sequence[int], stack: Sequence[int], inputs: Sequence[int]) -> Geometry:
        """The geometry whose stack and input axes are given (the rest are outputs).

        Size-1 axes carry no information, so their roles are normalised: the size-1 stack axes
        stay stack axes (R has an axis for each); any other size-1 axis is an output, unless the
        inputs would otherwise be empty (then the first one is an input)."""
        shape = tuple(int(s) for s in shape)
        nd = len(shape)
        stack = {a % nd for a in stack}
        inputs = {a % nd for a in inputs} - stack
        ones = [a for a in range(nd) if shape[a] == 1 and a not in stack]
        inputs -= set(ones)
        if not inputs and ones:
            inputs = {ones[0]}
        outputs = set(range(nd)) - stack - inputs
        return cls(shape, tuple(sorted(stack)), tuple(sorted(inputs)), tuple(sorted(outputs)))

    @classmethod
    def leading(cls, shape: Sequence[int], n_stack: int, n_in: int) -> Geometry:
        """The standard geometry: ``n_stack`` leading stack axes, then ``n_in`` input axes."""
        return cls.make(shape, range(n_stack), range(n_stack, n_stack + n_in))

    @classmethod
    def from_roles(cls, shape: Sequence[int], roles: str) -> Geometry:
        """From a role per axis, e.g. ``"oio"`` for gemma's q_einsum (N, D, H)."""
        if len(roles) != len(shape) or set(roles) - set(ROLE_NAMES):
            raise ValueError(f"geometry roles {roles!r} do not describe a kernel of shape "
                             f"{tuple(shape)}: give one of s (stack), i (input), o (output) per "
                             "axis")
        return cls.make(shape, [a for a, c in enumerate(roles) if c == "s"],
                        [a for a, c in enumerate(roles) if c == "i"])

    @classmethod
    def from_leaves(cls, w_shape: Sequence[int], a_shape: Sequence[int],
                    b_shape: Sequence[int], r_shape: Sequence[int]) -> Geometry:
        """The geometry stored in a kernel's A, B, R shapes (the inverse of :meth:`stored`)."""
        w, a, b = tuple(w_shape), tuple(a_shape), tuple(b_shape)
        n_stack = len(r_shape) - 2
        if len(a) == len(w) + 1 and len(b) == len(w) + 1:          # W's own axes kept
            full_a = [a[i] == w[i] != 1 for i in range(len(w))]
            full_b = [b[1 + i] == w[i] != 1 for i in range(len(w))]
            stack = [i for i in range(len(w)) if full_a[i] and full_b[i]]
            ones = [i for i in range(len(w)) if w[i] == 1]
            stack += ones[:n_stack - len(stack)]
            inputs = [i for i in range(len(w)) if full_a[i] and not full_b[i]]
            return cls.make(w, stack, inputs)
        n_in = len(a) - 1 - n_stack
        return cls.leading(w, n_stack, n_in)

    # ------------------------------------------------------------------ views
    @property
    def roles(self) -> str:
        """One letter per W axis: s(tack), i(nput), o(utput)."""
        return "".join("s" if a in self.stack else "i" if a in self.inputs else "o"
                       for a in range(len(self.shape)))

    @property
    def standard(self) -> bool:
        """Stack axes first, then inputs, then outputs (the compact storage applies)."""
        return self.roles == "".join(sorted(self.roles, key="sio".index)) and bool(
            self.inputs) and bool(self.outputs)

    def sizes(self, axes: Sequence[int]) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in axes)

    @property
    def m(self) -> int:
        return math.prod(self.sizes(self.inputs))

    @property
    def n(self) -> int:
        return math.prod(self.sizes(self.outputs))

    @property
    def count(self) -> int:
        """How many independent matrices W holds."""
        return math.prod(self.sizes(self.stack))

    def canonical_shapes(self, rank: int) -> dict[str, tuple[int, ...]]:
        """A (*stack, *inputs, r), B (*stack, r, *outputs), R (*stack, r, r), scale (*stack,)."""
        s = self.sizes(self.stack)
        return {"A": (*s, *self.sizes(self.inputs), rank), "B": (*s, rank, *self.sizes(self.outputs)),
                "R": (*s, rank, rank), "scale": s}

    def stored_shapes(self, rank: int) -> dict[str, tuple[int, ...]]:
        """The shapes the leaves have in a param tree (compact when standard)."""
        shapes = self.canonical_shapes(rank)
        if not self.standard:
            shapes["A"] = tuple(1 if a in self.outputs else d
                                for a, d in enumerate(self.shape)) + (rank,)
            shapes["B"] = (rank,) + tuple(1 if a in self.inputs else d
                                          for a, d in enumerate(self.shape))
        return shapes

    # ------------------------------------------------------------------ conversions
    def matrices(self, w: jax.Array) -> jax.Array:
        """W as its (count, m, n) matrices."""
        order = self.stack + self.inputs + self.outputs
        if list(order) != sorted(order):      # a transpose copies even when it has no work
            w = jnp.transpose(w, order)
        return w.reshape(self.count, self.m, self.n)

    def store(self, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Canonical A (*stack, *inputs, r), B (*stack, r, *outputs) → the stored leaves."""
        if self.standard:
            return a, b
        rank = a.shape[-1]
        shapes = self.stored_shapes(rank)
        ns = len(self.stack)
        a = jnp.transpose(a, _order(self.stack + self.inputs) + [a.ndim - 1])
        b_src = self.stack + self.outputs
        b = jnp.transpose(b, [ns] + [i if i < ns else i + 1 for i in _order(b_src)])
        return a.reshape(shapes["A"]), b.reshape(shapes["B"])

    def canonical(self, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Stored A, B → canonical A (*stack, *inputs, r), B (*stack, r, *outputs)."""
        if self.standard:
            return a, b
        rank = a.shape[-1]
        a_axes = sorted(self.stack + self.inputs)                  # A's axes after the squeeze
        a = a.reshape(self.sizes(a_axes) + (rank,))
        a = jnp.transpose(a, [a_axes.index(x) for x in self.stack + self.inputs] + [len(a_axes)])
        b_axes = sorted(self.stack + self.outputs)
        b = b.reshape((rank,) + self.sizes(b_axes))
        perm = [1 + b_axes.index(x) for x in self.stack] + [0] + [
            1 + b_axes.index(x) for x in self.outputs]
        return a, jnp.transpose(b, perm)

    def delta(self, a: jax.Array, r: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
        """ΔW = (α/r)·A·R·B in float32, in W's shape and axis order, from the stored leaves."""
        a, b = self.canonical(a, b)
        stack, rank = self.sizes(self.stack), r.shape[-1]
        a2 = a.astype(jnp.float32).reshape(stack + (self.m, rank))
        b2 = b.astype(jnp.float32).reshape(stack + (rank, self.n))
        rs = r.astype(jnp.float32) * scale.astype(jnp.float32)[..., None, None]
        d = (a2 @ rs @ b2).reshape(stack + self.sizes(self.inputs) + self.sizes(self.outputs))
        order = self.stack + self.inputs + self.outputs
        return d if self.standard else jnp.transpose(d, np.argsort(order).tolist())

    def __str__(self) -> str:
        return f"{self.shape} as {self.roles} (s: stack, i: input, o: output)"


def _order(axes: Sequence[int]) -> list[int]:
    """The permutation that sorts ``axes`` (positions into ``axes``)."""
    return sorted(range(len(axes)), key=lambda i: axes[i])
