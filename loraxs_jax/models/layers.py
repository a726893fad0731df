"""Layers our model families share."""

from __future__ import annotations

import flax.linen as nn
import jax


def embedding_lookup(embed: nn.Embed, ids: jax.Array, rows: str | None = "vocab") -> jax.Array:
    """``embed(ids)``, with the table's 'embed' axis gathered before the lookup (what FSDP does
    to every weight before use). Looking rows up in a table split along 'embed' yields
    activations split along embed, and XLA can only reshard those to the batch split by
    replicating the whole activation; gathered first, the lookup is split along the batch
    directly. ``rows`` is the logical name of the table's rows (None for position and
    token-type tables). Outside a mesh it is exactly ``embed(ids)``."""
    table = nn.with_logical_constraint(embed.embedding, (rows, None))
    return jax.numpy.take(table.astype(embed.dtype), ids, axis=0)
