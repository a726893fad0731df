"""Training only R: partition the tree, or mask a user's optax transformation.

The efficient way (used by our train step): ``trainable, frozen = split(params, cfg)`` and
differentiate a loss of ``combine(trainable, frozen)`` with respect to ``trainable`` alone. JAX
then never computes a gradient of a frozen weight (only the activation gradients the R's of
earlier layers need), and ``tx.init(trainable)`` holds optimizer state for R (and the chosen
extras) only.

For code that differentiates the whole tree, ``masked(tx, cfg)`` applies ``tx`` to the trainable
leaves and zeroes every other update; it too holds state for the trainable leaves only.

Which leaves train is decided in one place, :func:`is_trainable`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import optax

from loraxs_jax.config import LoraXSConfig
from loraxs_jax.tree import flatten, leaf_role, path_str, unflatten


def is_trainable(path: tuple, extra: tuple[str, ...] = (), train_r: bool = True) -> bool:
    """Whether the leaf at ``path`` trains: a ``*_loraxs_R`` leaf (when ``train_r``), or a leaf
    whose '/'-joined path a regex of ``extra`` searches (a task head; LoRA's A, B; everything)."""
    role = leaf_role(path[-1])
    if role and role[1] == "R" and train_r:
        return True
    name = path_str(path)
    return any(re.search(p, name) for p in extra)


def _extra(cfg: LoraXSConfig | None, trainable: tuple[str, ...] | None) -> tuple[str, ...]:
    return tuple(trainable) if trainable is not None else (cfg.trainable if cfg else ())


def split(params: Mapping, cfg: LoraXSConfig | None = None,
          trainable: tuple[str, ...] | None = None, train_r: bool = True) -> tuple[dict, dict]:
    """(trainable, frozen): two nested dicts that partition the leaves of ``params``.

    Trainable are the ``*_loraxs_R`` leaves (unless ``train_r=False``) plus leaves whose path
    matches ``cfg.trainable`` (or the ``trainable`` regexes given here), e.g. a classification
    head. Baselines use the regexes alone (LoRA: its A and B; full fine-tuning: ``(".*",)``).
    """
    extra = _extra(cfg, trainable)
    flat = flatten(params)
    t = {p: v for p, v in flat.items() if is_trainable(p, extra, train_r)}
    if not t:
        raise ValueError("nothing trainable: no *_loraxs_R leaves (call loraxs_jax.apply first) "
                         f"and no param matches {list(extra)}")
    f = {p: v for p, v in flat.items() if p not in t}
    return unflatten(t), unflatten(f)


def combine(*trees: Mapping) -> dict:
    """Merge disjoint nested dicts (e.g. the two halves of ``split``) back into one tree."""
    out: dict[tuple, Any] = {}
    for tree in trees:
        for p, v in flatten(tree).items():
            if p in out:
                raise ValueError(f"combine: {path_str(p)} is in more than one tree")
            out[p] = v
    return unflatten(out)


def trainable_mask(params: Mapping, cfg: LoraXSConfig | None = None,
                   trainable: tuple[str, ...] | None = None) -> dict:
    """A tree of bools like ``params``: True for R leaves and the chosen extras."""
    extra = _extra(cfg, trainable)
    return unflatten({p: is_trainable(p, extra) for p in flatten(params)})


def masked(tx: optax.GradientTransformation, cfg: LoraXSConfig | None = None,
           trainable: tuple[str, ...] | None = None) -> optax.GradientTransformation:
    """Wrap ``tx`` so it updates only R (and the chosen extras) of a full param tree.

    Frozen leaves get zero updates and no optimizer state (``optax.partition`` with
    ``set_to_zero``, which is stateless). Prefer ``split`` in a train step so frozen gradients are
    never computed; this wrapper is for code that already differentiates the whole tree.

    Args:
      tx: any optax transformation (e.g. ``optax.adamw(1e-3)``).
      cfg / trainable: which extra params stay trainable (see ``split``).
    Returns:
      An ``optax.GradientTransformation`` over the full tree.
    """
    extra = _extra(cfg, trainable)

    def labels(params):
        return unflatten({p: "train" if is_trainable(p, extra) else "freeze"
                          for p in flatten(params)}, params)

    return optax.partition({"train": tx, "freeze": optax.set_to_zero()}, labels)
