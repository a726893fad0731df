"""LoraXSConfig: which kernels get LoRA-XS, at what rank, and how their bases are made."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from loraxs_jax.svd import METHODS as SVD_METHODS

INITS = ("svd", "svd_no_sigma", "svd_bottom", "random", "svd_random", "given")


@dataclasses.dataclass(frozen=True)
class LoraXSConfig:
    """What LoRA-XS adds to a param tree.

    A kernel W (in, out) whose '/'-joined path is matched by one of ``targets`` (``re.search``)
    gets frozen bases A (in, r), B (r, out), a trainable R (r, r) and a frozen scale α/r, stored
    beside it as ``<name>_loraxs_{A,B,R,scale}``. The layer then computes
    y = x·W + (α/r)·((x·A)·R)·B  (Bałazy et al., LoRA-XS, eq. 2).

    Attributes:
      rank: r, an int for every target, or a mapping {regex: r}; a kernel takes the rank of the
        first regex (in order) that searches its path, so FFN output layers can get more rank
        than attention (paper, App. E).
      alpha: α; the update is scaled by α/r (the paper uses α=16 on GLUE, α=r for math).
      targets: regexes searched in each kernel's '/'-joined path, e.g.
        r"attention/self/(query|value)/kernel$".
      init: how A and B are made (paper §3 and ablations):
        "svd"          A = U_r Σ_r, B = V_rᵀ from the truncated SVD of W (default);
        "svd_no_sigma" A = U_r, B = V_rᵀ (App. H);
        "svd_bottom"   the last r singular triplets instead of the first (App. G);
        "random"       Kaiming-uniform A (bound 1/√in) and B (bound 1/√r), PyTorch nn.Linear's
                       default, as in the official code's random-init ablation (Table 4);
        "svd_random"   SVD ("svd" rule) of a Gaussian matrix of W's shape and std (Table 4);
        "given"        A and B come with the adapter and cannot be recomputed from W (an
                       imported official LoRA-XS checkpoint: its randomized SVD is not
                       reproducible); pass them as ``apply(..., bases=)`` or a bases cache.
      r_std: R ~ N(0, r_std²); the paper uses 1e-5. 0 gives R = 0 (adapted model = base model).
      svd_method: "exact" (jnp.linalg.svd), "randomized" (Halko et al. 2011 subspace
        iteration, as the paper) or "block_krylov" (Musco & Musco 2015 block Lanczos: on all
        210 real SmolLM2 matrices at r=32 a rank-r error within 1.0003x of the exact
        truncation's, where "randomized" with the official n_iter=10 reaches 1.0011x, with
        under half its products with W; see benchmarks/results/svd_init.md). Matrices whose
        shorter side is below 1.25x the Krylov space get the eigendecomposition of their
        Gram matrix instead, and matrices with σ_r/σ_1 < 0.03 (a spectrum too steep for
        float32 products with WᵀW; real weights sit at 0.1-0.5) the full SVD.
      oversample: extra columns of the randomized range finder.
      power_iters: power iterations of the randomized range finder. 10 and 10 match the official
        code's scikit-learn TruncatedSVD(n_iter=10): real weights have nearly equal singular
        values around r, and 4 iterations left the top-16 subspace of a MiniLM FFN matrix 58°
        from the exact one (10: 16°, with a rank-r error 1.00005x the exact one's).
      krylov_iters: q, the products with WᵀW of "block_krylov"; its Krylov space has (q + 1)·b
        dimensions (b = max(⌈r/2⌉, 16)) and costs (2q + 2)·b products of W with a vector
        ("randomized" costs (2·power_iters + 2)·(r + oversample)). 10 kept the rank-r error
        within 1.0003x of the exact one on every SmolLM2 matrix at r = 32 and every
        Mistral-7B-shaped test matrix at r = 64 (benchmarks/results/svd_init.md).
      bases_dtype: dtype of A and B (e.g. "bfloat16"); None keeps the kernel's dtype.
        SVDs always run in float32.
      r_dtype: dtype of R (the trained master copy); float32 by default.
      trainable: regexes of extra params that stay trainable besides R (e.g. a task head,
        r"^classifier/"); used by ``split`` and the optax helpers.
      in_axes: for kernels with more than two axes (DenseGeneral, Einsum): the number of leading
        (after ``stacked_axes``) axes that are input axes; the kernel is treated as the matrix
        (prod(input axes), prod(output axes)). An int or a {regex: int} mapping. None (default)
        refuses such kernels with an error rather than guessing.
      stacked_axes: leading axes that index independent matrices, e.g. 1 for layers stacked by
        ``nn.scan``; an int or a {regex: int} mapping. Each matrix gets its own SVD and R.
      bases_seed: seed of the randomness in the bases (randomized SVD's test matrices, the
        random inits); with it the config alone determines A, B for a given W, so an adapter
        file needs only R.
      svd_batch: how many same-shaped matrices one vmapped SVD call takes (memory vs speed).
    """

    rank: int | Mapping[str, int] = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = ()
    init: str = "svd"
    r_std: float = 1e-5
    svd_method: str = "exact"
    oversample: int = 10
    power_iters: int = 10
    krylov_iters: int = 10
    bases_dtype: str | None = None
    r_dtype: str = "float32"
    trainable: tuple[str, ...] = ()
    in_axes: int | Mapping[str, int] | None = None
    stacked_axes: int | Mapping[str, int] = 0
    bases_seed: int = 0
    svd_batch: int = 32

    def __post_init__(self):
        """Refuse any field we could not honour, naming it, its value and what is allowed
        (a NaN α or a rank of 4.5 would otherwise train a silently wrong or truncated model)."""
        def set_(name, value):   # the dataclass is frozen
            object.__setattr__(self, name, value)

        set_("targets", _regexes("targets", self.targets))
        set_("trainable", _regexes("trainable", self.trainable))
        if not self.targets:
            raise ValueError("LoraXSConfig.targets is empty: give regexes of the kernels to adapt, "
                             "e.g. targets=(r'(q|v)_proj/kernel$',)")
        set_("rank", _per_kernel("rank", self.rank, 1))
        set_("in_axes", None if self.in_axes is None else _per_kernel("in_axes", self.in_axes, 1))
        set_("stacked_axes", _per_kernel("stacked_axes", self.stacked_axes, 0))
        set_("alpha", _real("alpha", self.alpha, positive=True))
        set_("r_std", _real("r_std", self.r_std, positive=False))
        for name, minimum in (("oversample", 0), ("power_iters", 0), ("krylov_iters", 1),
                              ("bases_seed", 0), ("svd_batch", 1)):
            set_(name, _integer(name, getattr(self, name), minimum))
        _choice("init", self.init, INITS)
        _choice("svd_method", self.svd_method, SVD_METHODS)
        set_("r_dtype", _float_dtype("r_dtype", self.r_dtype))
        if self.bases_dtype is not None:
            set_("bases_dtype", _float_dtype("bases_dtype", self.bases_dtype))

    # -- per-kernel lookups ------------------------------------------------------------------
    def is_target(self, path: str) -> bool:
        return any(re.search(t, path) for t in self.targets)

    def is_extra_trainable(self, path: str) -> bool:
        return any(re.search(t, path) for t in self.trainable)

    def _lookup(self, field: str, path: str, default: Any) -> Any:
        v = getattr(self, field)
        if not isinstance(v, tuple):
            return v
        for pattern, value in v:
            if re.search(pattern, path):
                return value
        return default

    def rank_for(self, path: str) -> int:
        r = self._lookup("rank", path, None)
        if r is None:
            raise ValueError(f"no rank pattern matches target {path}; rank patterns: "
                             f"{[k for k, _ in self.rank]}")
        return r

    def in_axes_for(self, path: str) -> int | None:
        return self._lookup("in_axes", path, None)

    def stacked_axes_for(self, path: str) -> int:
        return self._lookup("stacked_axes", path, 0)

    # -- serialisation (adapter files) ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for field in ("rank", "in_axes", "stacked_axes"):
            if isinstance(d[field], tuple):
                d[field] = {k: v for k, v in d[field]}
        d["targets"] = list(d["targets"])
        d["trainable"] = list(d["trainable"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraXSConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LoraXSConfig fields {sorted(unknown)}")
        return cls(**dict(d))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def bases_dict(self) -> dict[str, Any]:
        """The fields that determine A and B (for the bases cache key); R and α do not."""
        d = self.to_dict()
        return {k: d[k] for k in ("rank", "targets", "init", "svd_method", "oversample",
                                  "power_iters", "krylov_iters", "bases_dtype", "in_axes",
                                  "stacked_axes", "bases_seed")}


# ----------------------------------------------------------------------------- field checks
def _bad(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"LoraXSConfig.{field}={value!r}: {allowed}")


def _integer(field: str, value: Any, minimum: int) -> int:
    """An int >= ``minimum`` (numpy ints too); bools, floats such as 4.5 and strings refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise _bad(field, value, f"expected an int >= {minimum}")
    return int(value)


def _real(field: str, value: Any, positive: bool) -> float:
    """A finite real number, > 0 (``positive``) or >= 0; bools and strings refused."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and math.isfinite(value) and (value > 0 if positive else value >= 0))
    if not ok:
        raise _bad(field, value, f"expected a finite number {'>' if positive else '>='} 0")
    return float(value)


def _choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _bad(field, value, f"unknown; choose one of {', '.join(choices)}")


def _regex(field: str, pattern: Any) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"LoraXSConfig.{field} {pattern!r}: expected a non-empty regex string")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"bad regex {pattern!r} in LoraXSConfig.{field}: {e}") from None
    return pattern


def _regexes(field: str, value: Any) -> tuple[str, ...]:
    """A regex or a sequence of them, as a tuple."""
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list)):
        raise _bad(field, value, "expected a regex string or a sequence of them")
    return tuple(_regex(field, p) for p in value)


def _per_kernel(field: str, value: Any, minimum: int) -> int | tuple[tuple[str, int], ...]:
    """An int >= ``minimum``, or a non-empty {regex: int} mapping stored as a tuple of pairs."""
    if isinstance(value, Mapping) or (isinstance(value, tuple) and value
                                      and all(isinstance(x, tuple) for x in value)):
        pairs = tuple(value.items()) if isinstance(value, Mapping) else value
        if not pairs:
            raise _bad(field, value, "an empty mapping gives no kernel a value")
        return tuple((_regex(f"{field} key", k), _integer(f"{field}[{k!r}]", v, minimum))
                     for k, v in pairs)
    return _integer(field, value, minimum)


def _float_dtype(field: str, value: Any) -> str:
    """The name of a real floating dtype ("float32", "bfloat16", ...; a dtype object is
    accepted and stored by name, so the config stays JSON)."""
    dtype = None
    if value is not None and not isinstance(value, bool) and not (isinstance(value, str)
                                                                  and not value):
        try:
            dtype = jnp.dtype(value)
        except (TypeError, ValueError):
            pass
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise _bad(field, value, "expected the name of a floating dtype, e.g. 'float32' or "
                                 "'bfloat16'")
    return dtype.name
