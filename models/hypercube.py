"""Hypercube Transformer (Wang et al., "What Dense Graph Do You Need for Self-Attention?", ICML 2022; the NIP code's
TesseractSparsityConfig): block-sparse attention on a hypercube graph of blocks.

Tokens are grouped in blocks of b = 16; nb = N / b blocks, k = ceil(log2 nb). Block p is the hypercube vertex
    g(p) = bitreverse_k(p XOR (p >> 1))        (reflected Gray code, bits reversed; nb = 8: [0, 4, 6, 2, 3, 7, 5, 1]).
Query block i attends to itself and to its k cube neighbours p_t = g^-1(g(i) XOR 2^t), t < k. When nb is not a power
of two some vertices are missing (p_t >= nb); the NIP code then uses i itself, which is listed already, so
the slot is marked empty (-1) and no block is counted twice. The graph is symmetric, the same for every head and
layer, has no global tokens, and Gray order makes i - 1 and i + 1 neighbours. Inside the allowed blocks: one
ordinary softmax(q k^T / sqrt(D)) v over the union of the listed key blocks.

The layout depends on nb only, so it is precomputed: for every cube dimension k <= k_max the table of the full
2^k-vertex cube, [k_max + 1, nb_max, k_max + 1]. A length picks the table of its k, keeps the first nb rows and
drops neighbours >= nb: the sequence axis stays dynamic, N a multiple of b.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import registry
from .common import Encoder, EncoderConfig, PreLNBlock, check_length, check_positive, merge_heads, split_heads


@dataclass
class HypercubeConfig(EncoderConfig):
    block_size: int = 16
    num_classes: int = 2
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "block_size", "num_classes")
        if self.max_seq_len % self.block_size:
            raise ValueError(f"max_seq_len ({self.max_seq_len}) must be a multiple of block_size ({self.block_size})")


def cube_dim(nb: int) -> int:
    """k = ceil(log2 nb): the smallest cube with a vertex for every block."""
    return (nb - 1).bit_length()


def gray_labels(k: int) -> torch.Tensor:
    """g(p) = bitreverse_k(p XOR (p >> 1)) for p < 2^k."""
    p = torch.arange(2**k)
    gray = p ^ (p >> 1)
    label = torch.zeros_like(gray)
    for bit in range(k):
        label |= ((gray >> bit) & 1) << (k - 1 - bit)
    return label


def cube_neighbours(k: int) -> torch.Tensor:
    """[2^k, k + 1]: block p itself, then g^-1(g(p) XOR 2^t) for t < k."""
    labels = gray_labels(k)
    position = torch.argsort(labels)  # g^-1: the block that carries each label
    flips = [position[labels ^ (1 << t)] for t in range(k)]
    return torch.stack([torch.arange(2**k), *flips], -1)


class HypercubeAttention(nn.Module):
    def __init__(self, config: HypercubeConfig):
        super().__init__()
        self.num_heads, self.block_size = config.num_heads, config.block_size
        self.query, self.key, self.value, self.out = (nn.Linear(config.hidden, config.hidden) for _ in range(4))
        nb_max = config.max_seq_len // config.block_size
        k_max = cube_dim(nb_max)
        tables = torch.full((k_max + 1, nb_max, k_max + 1), -1, dtype=torch.long)
        for k in range(k_max + 1):
            rows = min(2**k, nb_max)
            tables[k, :rows, : k + 1] = cube_neighbours(k)[:rows]
        # derived from the config alone, so not saved in checkpoints
        self.register_buffer("cube_tables", tables, persistent=False)
        self.register_buffer("cube_dims", torch.tensor([cube_dim(max(nb, 1)) for nb in range(nb_max + 1)]),
                             persistent=False)

    def block_table(self, nb: int) -> torch.Tensor:
        """[1, nb, k_max + 1] key blocks per query block (the same for every head); -1 marks an empty slot."""
        table = self.cube_tables.index_select(0, self.cube_dims[nb:nb + 1])[:, :nb]
        return torch.where(table < nb, table, -1)  # a missing vertex falls back to the block itself, listed already

    def forward(self, x):
        q, k, v = (split_heads(p(x), self.num_heads) for p in (self.query, self.key, self.value))
        batch, heads, n, d = q.shape
        b, nb = self.block_size, n // self.block_size
        table = self.block_table(nb)
        qb, kb, vb = (t.reshape(batch, heads, nb, b, d) for t in (q, k, v))

        # every query block gathers its listed key/value blocks: [B, H, nb, m*b, D]
        slots = table.clamp(min=0)[0]
        kg = kb[:, :, slots].reshape(batch, heads, nb, -1, d)
        vg = vb[:, :, slots].reshape(batch, heads, nb, -1, d)
        scores = qb @ kg.transpose(-1, -2) * (1.0 / math.sqrt(d))  # [B, H, nb, b, m*b]
        key_visible = (table >= 0)[:, :, None, :, None].expand(-1, -1, -1, -1, b).reshape(1, nb, 1, -1)
        scores = scores.masked_fill(~key_visible, float("-inf"))  # slot 0 (the block itself) is always visible
        out = (torch.softmax(scores, -1) @ vg).reshape(batch, heads, n, d)
        return self.out(merge_heads(out))


def check_seq_len(config: HypercubeConfig, seq_len: int) -> None:
    check_length(config, seq_len, "Hypercube", config.block_size, "block_size", minimum=config.block_size)


def parity_seq_lens(config: HypercubeConfig) -> list[int]:
    # nb = 8 (a full cube) and nb = 12 (missing vertices, a different k)
    b, nb_max = config.block_size, config.max_seq_len // config.block_size
    return sorted({b * min(nb, nb_max) for nb in (8, 12)})


ENTRY = registry.register(registry.ZooEntry(
    name="hypercube",
    paper="Wang et al., What Dense Graph Do You Need for Self-Attention?, ICML 2022",
    complexity="O(N * (k + 1) * b * d) with k = ceil(log2(N / b)): O(N log N)",
    constraints="batch and sequence dynamic; sequence a multiple of block_size (the graph is on blocks), from one "
                "block to max_seq_len (the precomputed cube tables cover max_seq_len / block_size blocks)",
    config_cls=HypercubeConfig,
    build=lambda c: Encoder(c, lambda i: PreLNBlock(c.hidden, c.mlp_ratio, HypercubeAttention(c)), head="pooled"),
    seq_len_rule=check_seq_len,
    parity_seq_lens=parity_seq_lens,
    small=dict(hidden=64, num_heads=4, num_layers=2, block_size=16, max_seq_len=512, vocab_size=100),
    default_seq_len=lambda c: min(max(1024 // c.block_size, 1) * c.block_size, c.max_seq_len),
))
