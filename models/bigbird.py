"""BigBird (Zaheer et al., NeurIPS 2020): block-sparse ITC attention.

Tokens are grouped in blocks of b. Query block i attends to
  - the global blocks 0 and nb-1 (as keys),
  - a sliding window of 3 blocks i-1, i, i+1,
  - r random blocks, chosen once from a frozen seeded table (never redrawn at inference),
and the global query blocks 0 and nb-1 attend to every key. One softmax runs over the union of those keys.
The layout is built for any nb = N / b from the frozen table, so the sequence axis can stay dynamic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import registry
from .common import Encoder, EncoderConfig, PreLNBlock, check_length, check_positive, merge_heads, split_heads

WINDOW = 3  # blocks i-1, i, i+1 (fixed in BigBird)


@dataclass
class BigBirdConfig(EncoderConfig):
    block_size: int = 64
    num_random_blocks: int = 3
    num_classes: int = 2
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "block_size", "num_classes")
        if self.num_random_blocks < 0:
            raise ValueError(f"num_random_blocks must be >= 0, got {self.num_random_blocks}")
        if self.max_seq_len % self.block_size:
            raise ValueError(f"max_seq_len ({self.max_seq_len}) must be a multiple of block_size ({self.block_size})")


class BigBirdAttention(nn.Module):
    def __init__(self, config: BigBirdConfig, layer_index: int):
        super().__init__()
        self.num_heads, self.block_size, self.r = config.num_heads, config.block_size, config.num_random_blocks
        self.query, self.key, self.value, self.out = (nn.Linear(config.hidden, config.hidden) for _ in range(4))
        max_blocks = config.max_seq_len // config.block_size
        g = torch.Generator().manual_seed(config.seed * 1000 + layer_index)
        # random priority of key block j for (head, query block i); the r best allowed candidates are taken
        self.register_buffer("random_priority", torch.rand(config.num_heads, max_blocks, max_blocks, generator=g))

    def block_table(self, nb: int) -> torch.Tensor:
        """[H, nb, 5 + r] key blocks per query block; -1 marks an empty slot (a duplicate or no candidate)."""
        i = torch.arange(nb)
        first, last = torch.zeros_like(i), torch.full_like(i, nb - 1)
        window = torch.stack([i - 1, i, i + 1], -1)
        # window blocks that are global columns (or off the ends) are already listed once
        window = torch.where((window <= 0) | (window >= nb - 1), -1, window)
        fixed = torch.cat([first[:, None], window, last[:, None]], -1)  # [nb, 5]
        j = torch.arange(nb)
        allowed = (j[None] > 0) & (j[None] < nb - 1) & ((j[None] - i[:, None]).abs() > 1)
        priority = torch.where(allowed, self.random_priority[:, :nb, :nb], -1.0)
        best, chosen = priority.topk(self.r, dim=-1)
        random = torch.where(best >= 0, chosen, -1)  # [H, nb, r]
        return torch.cat([fixed.expand(self.num_heads, nb, 5), random], -1)

    def forward(self, x):
        q, k, v = (split_heads(p(x), self.num_heads) for p in (self.query, self.key, self.value))
        batch, heads, n, d = q.shape
        b, nb = self.block_size, n // self.block_size
        scale = 1.0 / math.sqrt(d)
        table = self.block_table(nb)
        visible = table >= 0
        qb, kb, vb = (t.reshape(batch, heads, nb, b, d) for t in (q, k, v))

        # every query block gathers its listed key/value blocks: [B, H, nb, m*b, D]
        heads_index = torch.arange(heads)[:, None, None]
        slots = table.clamp(min=0)
        kg = kb[:, heads_index, slots].reshape(batch, heads, nb, -1, d)
        vg = vb[:, heads_index, slots].reshape(batch, heads, nb, -1, d)
        scores = qb @ kg.transpose(-1, -2) * scale  # [B, H, nb, b, m*b]
        key_visible = visible[:, :, None, :, None].expand(-1, -1, -1, -1, b).reshape(heads, nb, 1, -1)
        scores = scores.masked_fill(~key_visible, float("-inf"))
        sparse = torch.softmax(scores, -1) @ vg  # [B, H, nb, b, D]

        # the two global query blocks attend to every key
        q_global = torch.cat([qb[:, :, :1], qb[:, :, -1:]], 2).reshape(batch, heads, 2 * b, d)
        dense = (torch.softmax(q_global @ k.transpose(-1, -2) * scale, -1) @ v).reshape(batch, heads, 2, b, d)
        out = torch.cat([dense[:, :, :1], sparse[:, :, 1:-1], dense[:, :, 1:]], 2).reshape(batch, heads, n, d)
        return self.out(merge_heads(out))


def check_seq_len(config: BigBirdConfig, seq_len: int) -> None:
    # at least 2 blocks (first and last are global), and r blocks to draw the r random candidates from
    blocks = max(2, config.num_random_blocks)
    check_length(config, seq_len, "BigBird", config.block_size, "block_size", minimum=blocks * config.block_size,
                 why=f" (at least {blocks} blocks of {config.block_size})")


def parity_seq_lens(config: BigBirdConfig) -> list[int]:
    b, nb_max = config.block_size, config.max_seq_len // config.block_size
    return sorted({b * min(nb, nb_max) for nb in (8, 12)})


ENTRY = registry.register(registry.ZooEntry(
    name="bigbird",
    paper="Zaheer et al., Big Bird: Transformers for Longer Sequences, NeurIPS 2020",
    complexity="O(N * (5 + r) * b * d): linear in N",
    constraints="batch and sequence dynamic; sequence a multiple of block_size, from 2 blocks to max_seq_len "
                "(the frozen random table covers max_seq_len / block_size blocks)",
    config_cls=BigBirdConfig,
    build=lambda c: Encoder(c, lambda i: PreLNBlock(c.hidden, c.mlp_ratio, BigBirdAttention(c, i)), head="pooled"),
    seq_len_rule=check_seq_len,
    parity_seq_lens=parity_seq_lens,
    small=dict(hidden=64, num_heads=4, num_layers=2, block_size=16, num_random_blocks=2, max_seq_len=512,
               vocab_size=100),
))
