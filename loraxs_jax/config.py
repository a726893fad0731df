"""LoraXSConfig: which kernels get LoRA-XS, at what rank, and how their bases are made."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

from loraxs_jax.svd import METHODS as SVD_METHODS

INITS = ("svd", "svd_no_sigma", "svd_bottom", "random", "svd_random")


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
        "svd_random"   SVD ("svd" rule) of a Gaussian matrix of W's shape and std (Table 4).
      r_std: R ~ N(0, r_std²); the paper uses 1e-5. 0 gives R = 0 (adapted model = base model).
      svd_method: "exact" (jnp.linalg.svd), "randomized" (Halko et al. 2011 subspace
        iteration, as the paper) or "block_krylov" (Musco & Musco 2015 block Lanczos: on the
        real SmolLM2 weights at r=32 a rank-r error within 1.0001x of the exact truncation's,
        where "randomized" with the official n_iter=10 reaches 1.0008x, at about a third of
        its products with W; see benchmarks/results/svd_init.md). Matrices whose Krylov space
        would span their shorter side get the exact SVD.
      oversample: extra columns of the randomized range finder.
      power_iters: power iterations of the randomized range finder. 10 and 10 match the official
        code's scikit-learn TruncatedSVD(n_iter=10): real weights have nearly equal singular
        values around r, and 4 iterations left the top-16 subspace of a MiniLM FFN matrix 58°
        from the exact one (10: 16°, with a rank-r error 1.00005x the exact one's).
      krylov_iters: q, the products with WᵀW of "block_krylov"; its Krylov space has (q + 1)·r
        dimensions and costs (2q + 2)·r products of W with a vector ("randomized" costs
        (2·power_iters + 2)·(r + oversample)). 6 kept the rank-r error within 1.0003x of the
        exact one on every SmolLM2 matrix sampled at r = 8, 16, 32 and 64 (5: up to 1.0007x).
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
    krylov_iters: int = 6
    bases_dtype: str | None = None
    r_dtype: str = "float32"
    trainable: tuple[str, ...] = ()
    in_axes: int | Mapping[str, int] | None = None
    stacked_axes: int | Mapping[str, int] = 0
    bases_seed: int = 0
    svd_batch: int = 32

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "trainable", tuple(
            (self.trainable,) if isinstance(self.trainable, str) else self.trainable))
        for field in ("rank", "in_axes", "stacked_axes"):
            v = getattr(self, field)
            if isinstance(v, Mapping):
                object.__setattr__(self, field, tuple((str(k), int(x)) for k, x in v.items()))
        if not self.targets:
            raise ValueError("LoraXSConfig.targets is empty: give regexes of the kernels to adapt, "
                             "e.g. targets=(r'(q|v)_proj/kernel$',)")
        for pattern in self.targets + self.trainable + tuple(
                k for f in ("rank", "in_axes", "stacked_axes")
                if isinstance(getattr(self, f), tuple) for k, _ in getattr(self, f)):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"bad regex {pattern!r} in LoraXSConfig: {e}") from None
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.svd_method not in SVD_METHODS:
            raise ValueError(f"unknown svd_method {self.svd_method!r}; choose one of "
                             f"{', '.join(SVD_METHODS)}")
        for field, least in (("oversample", 0), ("power_iters", 0), ("krylov_iters", 1)):
            v = getattr(self, field)
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise ValueError(f"{field} must be an int >= {least}, got {v!r}")
        ranks = [r for _, r in self.rank] if isinstance(self.rank, tuple) else [self.rank]
        for r in ranks:
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                raise ValueError(f"rank must be a positive int, got {r!r}")
        if self.r_std < 0:
            raise ValueError(f"r_std must be >= 0, got {self.r_std}")

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
