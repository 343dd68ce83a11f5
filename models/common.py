"""Pieces every zoo encoder shares: token + learned position embeddings, a pre-LN block, example inputs."""
from __future__ import annotations

import torch
from torch import nn


class PreLNBlock(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)) with an exact-GELU MLP."""

    def __init__(self, hidden: int, mlp_ratio: int, attention: nn.Module):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attention = attention
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_ratio * hidden), nn.GELU(), nn.Linear(mlp_ratio * hidden, hidden))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenEmbedding(nn.Module):
    def __init__(self, vocab_size: int, max_seq_len: int, hidden: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, hidden)
        self.positions = nn.Embedding(max_seq_len, hidden)

    def forward(self, input_ids):
        n = input_ids.shape[1]
        return self.tokens(input_ids) + self.positions(torch.arange(n, device=input_ids.device))[None]


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, N, H*D] -> [B, H, N, D]"""
    b, n, _ = x.shape
    return x.reshape(b, n, num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> [B, N, H*D]"""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def token_inputs(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab_size, (batch, seq_len), generator=g)}


def check_positive(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
