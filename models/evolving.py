"""Evolving Attention (Wang et al., ICML 2021; pkuyym/EvolvingAttention): attention maps evolve across layers
through a residual convolution.

Layer i computes its logits L^i = Q K^T / sqrt(D) [B, H, N, N]. The first layer uses them as they are,
A^1 = L^1. Every later layer mixes in the previous layer's map and convolves the mixture, heads as channels and
the N x N map as the image:
    A_bar = (1 - beta) * L^i + beta * A^{i-1}
    A^i   = alpha * CNN(A_bar) + (1 - alpha) * A_bar,   CNN = Conv2d(H -> H, 3x3, pad 1, bias) + ReLU/LeakyReLU
then P = softmax(A^i), O = P V, and A^i (pre-softmax, after the evolution) is handed to layer i+1.
alpha and beta follow the official code's naming (EAAugmentedConv1d): beta weights the previous layer's map,
alpha the convolution branch. The encoder is bidirectional and takes no padding mask, so nothing masked reaches the
convolution (the code's causal and padded variants would have to mask after it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import registry
from .common import Encoder, EncoderConfig, PreLNBlock, check_length, check_positive, merge_heads, split_heads

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU}  # EA-ResNet uses ReLU, EA-DC-Transformer LeakyReLU


@dataclass
class EvolvingConfig(EncoderConfig):
    max_seq_len: int = 1024
    alpha: float = 0.3  # weight of the convolution branch (EA-DC-Transformer's default)
    beta: float = 0.7  # weight of the previous layer's map (EA-DC-Transformer's default)
    activation: str = "relu"
    num_classes: int = 2

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "num_classes")
        for name in ("alpha", "beta"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got '{self.activation}'")


class EvolvingAttention(nn.Module):
    """forward(x, previous map or None) -> (output, A^i)."""

    def __init__(self, config: EvolvingConfig, layer_index: int):
        super().__init__()
        self.num_heads, self.alpha, self.beta = config.num_heads, config.alpha, config.beta
        self.query, self.key, self.value, self.out = (nn.Linear(config.hidden, config.hidden) for _ in range(4))
        # the first layer has no map to evolve from, so no convolution (as in the official code)
        self.cnn = None if layer_index == 0 else nn.Sequential(
            nn.Conv2d(config.num_heads, config.num_heads, 3, padding=1), ACTIVATIONS[config.activation]())

    def evolve(self, logits: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        mixed = (1 - self.beta) * logits + self.beta * previous
        return self.alpha * self.cnn(mixed) + (1 - self.alpha) * mixed

    def forward(self, x, previous=None):
        q, k, v = (split_heads(p(x), self.num_heads) for p in (self.query, self.key, self.value))
        scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(q.shape[-1]))
        if self.cnn is not None:
            scores = self.evolve(scores, previous)
        out = torch.softmax(scores, -1) @ v
        return self.out(merge_heads(out)), scores


class EvolvingBlock(PreLNBlock):
    """The pre-LN block, carrying the attention map: (x, A^{i-1}) -> (x, A^i)."""

    def forward(self, x, previous=None):
        attended, scores = self.attention(self.norm1(x), previous)
        x = x + attended
        return x + self.mlp(self.norm2(x)), scores


class EvolvingEncoder(Encoder):
    """The shared token encoder, with a stack that threads each layer's map into the next."""

    def forward(self, input_ids):
        x, scores = self.embed(input_ids), None
        for layer in self.layers:
            x, scores = layer(x, scores)
        return self.head(self.norm(x).mean(1))


def build(config: EvolvingConfig) -> EvolvingEncoder:
    return EvolvingEncoder(config, lambda i: EvolvingBlock(config.hidden, config.mlp_ratio,
                                                           EvolvingAttention(config, i)), head="pooled")


ENTRY = registry.register(registry.ZooEntry(
    name="evolving",
    paper="Wang et al., Evolving Attention with Residual Convolutions, ICML 2021",
    complexity="O(N^2 * d + 9 * H^2 * N^2) per layer: quadratic, the N x N logits are materialised and convolved",
    constraints="batch and sequence dynamic, any length up to max_seq_len (position table); every layer carries "
                "a [B, H, N, N] pre-softmax map to the next, so attention cannot run as a flash kernel",
    config_cls=EvolvingConfig,
    build=build,
    seq_len_rule=lambda c, n: check_length(c, n, "Evolving Attention"),
    small=dict(hidden=64, num_heads=4, num_layers=3, max_seq_len=512, vocab_size=100),
    default_seq_len=lambda c: min(512, c.max_seq_len),
))
