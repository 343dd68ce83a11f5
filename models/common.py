"""Pieces the zoo models share: the encoder config fields, token + learned position embeddings, a pre-LN block, an
encoder stack with a pooled or per-token head, T5 relative-position buckets, length rules, example inputs."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class EncoderConfig:
    """Fields every token encoder of the zoo has; each architecture's config adds its own (num_classes for a pooled
    head) and may change defaults."""
    vocab_size: int = 1000
    max_seq_len: int = 4096
    hidden: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4

    def __post_init__(self):
        check_positive(self, "vocab_size", "max_seq_len", "hidden", "num_layers", "num_heads", "mlp_ratio")
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of num_heads ({self.num_heads})")


def check_length(config, seq_len: int, model: str, multiple_of: int = 1, unit: str = "", minimum: int = 1,
                 why: str = "") -> None:
    """The usual length rule: a multiple of `multiple_of` (named `unit`) within [minimum, max_seq_len]."""
    if seq_len % multiple_of:
        raise ValueError(f"{model} needs a sequence length that is a multiple of {unit} {multiple_of}, got {seq_len}")
    if not minimum <= seq_len <= config.max_seq_len:
        raise ValueError(f"{model} sequence length must be in [{minimum}, {config.max_seq_len}]{why}, got {seq_len}")


class PreLNBlock(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)) with an exact-GELU MLP."""

    def __init__(self, hidden: int, mlp_ratio: int, attention: nn.Module):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attention = attention
        width = mlp_ratio * hidden
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, hidden))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SelfAttention(nn.Module):
    """Standard multi-head self-attention with biased projections (ViT, Switch)."""

    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query, self.key, self.value, self.out = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, x):
        q, k, v = (split_heads(p(x), self.num_heads) for p in (self.query, self.key, self.value))
        scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(q.shape[-1]))
        return self.out(merge_heads(torch.softmax(scores, -1) @ v))


class TokenEmbedding(nn.Module):
    def __init__(self, vocab_size: int, max_seq_len: int, hidden: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, hidden)
        self.positions = nn.Embedding(max_seq_len, hidden)

    def forward(self, input_ids):
        n = input_ids.shape[1]
        return self.tokens(input_ids) + self.positions(torch.arange(n, device=input_ids.device))[None]


class Encoder(nn.Module):
    """Token + position embedding, blocks (each maps x -> x), a final LayerNorm and a head: `pooled` gives
    [B, num_classes] logits from the mean over tokens, `tokens` gives [B, N, vocab_size] logits per token."""

    def __init__(self, config, make_block: Callable[[int], nn.Module], head: str = "pooled"):
        super().__init__()
        self.config = config
        self.embed = TokenEmbedding(config.vocab_size, config.max_seq_len, config.hidden)
        self.layers = nn.ModuleList(make_block(i) for i in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden)
        self.pooled = head == "pooled"
        self.head = nn.Linear(config.hidden, config.num_classes if self.pooled else config.vocab_size)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return self.head(x.mean(1) if self.pooled else x)


def t5_relative_buckets(relative: torch.Tensor, bidirectional: bool, num_buckets: int = 32,
                        max_distance: int = 128) -> torch.Tensor:
    """T5's bucket of each relative position (key - query): exact below num_buckets/2 (per direction), then
    logarithmic up to max_distance. Computed once on constant offsets, so no Log/Cast reaches the graph."""
    n = -relative
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (n < 0).long() * num_buckets
        n = n.abs()
    else:
        n = n.clamp(min=0)
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(n.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(n < max_exact, n, large)


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
