"""A constant mask of whole 0 / -inf tiles is a block layout: at a fixed length, dense attention under such a mask
becomes BlockSparseAttention, when the layout skips at least half of the tiles."""
from __future__ import annotations

import numpy as np

from ..ops import BLOCK_SPARSE_ATTENTION
from .framework import Match, constant, verify_numerically
from .probe import Probe

OP = BLOCK_SPARSE_ATTENTION


def as_block_sparse(probe: Probe, bias: np.ndarray, name: str, qkv: list[str], output: str, attrs: dict,
                    nodes: list) -> Match | None:
    """BlockSparseAttention with the layout the mask `bias` [1, H or 1, N, N] draws, verified; None when the mask is
    not such a layout (or the op does not reproduce the graph with it)."""
    if bias.shape[0] != 1 or not np.all((bias == 0) | np.isneginf(bias)):
        return None
    visible = bias[0] == 0  # [H or 1, Nq, Nk]
    n = visible.shape[-1]
    if visible.shape[-2] != n:
        return None
    for block in (b for b in (128, 64, 32, 16, 8) if n % b == 0 and n // b >= 2):
        nb = n // block
        tiles = visible.reshape(visible.shape[0], nb, block, nb, block)
        if not (np.all(tiles == tiles[:, :, :1, :, :1]) and tiles[:, :, 0, :, 0].mean() <= 0.5):
            continue
        table_mask = tiles[:, :, 0, :, 0]  # [H or 1, nb, nb]
        m = max(int(table_mask.sum(-1).max()), 1)
        table = np.full(table_mask.shape[:2] + (m,), -1, np.int32)
        for h, i in np.ndindex(*table_mask.shape[:2]):
            listed = np.flatnonzero(table_mask[h, i])
            table[h, i, :len(listed)] = listed
        sparse_attrs = {"num_heads": attrs["num_heads"], "block_size": block, "scale": attrs["scale"],
                        "global_blocks": 0}
        if verify_numerically(OP, probe, qkv + [lambda run, t=table: t], output, sparse_attrs):
            return None
        table_name = f"{name}/block_index"
        return Match(OP, name, qkv + [table_name], output, sparse_attrs, nodes, [constant(table_name, table)])
    return None
