"""Performer (Choromanski et al., ICLR 2021): FAVOR+ linear attention with positive orthogonal random features.

phi(x) = M^-1/2 * (exp(W x' - |x'|^2/2 - c) + eps) with x' = x * D^-1/4, so E[phi(q).phi(k)] = exp(q.k / sqrt(D)).
W [M, D]: blocks of orthogonal rows (QR of Gaussian matrices), each row rescaled to the norm of a fresh Gaussian
vector (the official `scaling=0`). W is drawn once from a seeded generator and frozen: no redraw at inference.
Bidirectional: out = phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1). Causal: the same sums over j <= i, computed in
chunks (masked quadratic inside a chunk, exclusive prefix sums of chunk states across chunks).
Stabilisers c: queries use their own max over features; keys the max over features and positions when
bidirectional, and the data-independent bound max_r |w_r|^2 / 2 when causal (so no token reads the future).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import registry
from .common import Encoder, EncoderConfig, PreLNBlock, check_length, check_positive, merge_heads, split_heads

CHUNK = 64


@dataclass
class PerformerConfig(EncoderConfig):
    max_seq_len: int = 8192
    num_features: int = 64
    causal: bool = False
    eps: float = 1e-6
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "num_features")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")


def orthogonal_random_features(num_features: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """W [M, D]: stacked orthogonal blocks, rows rescaled by chi(D)-distributed norms."""
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        blocks.append(q.t())
    w = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator).norm(dim=1)
    return w * norms[:, None]


def favor_features(x: torch.Tensor, w: torch.Tensor, eps: float, shift: torch.Tensor | None) -> torch.Tensor:
    """phi(x) for [B, H, N, D]; shift None means per-token max (queries)."""
    x = x * x.shape[-1] ** -0.25
    logits = x @ w.t() - (x * x).sum(-1, keepdim=True) / 2
    if shift is None:
        shift = logits.amax(-1, keepdim=True)
    return (torch.exp(logits - shift) + eps) / math.sqrt(w.shape[0])


def causal_linear_attention(phi_q, phi_k, v):
    """sum_{j<=i} phi_q_i.phi_k_j v_j / sum_{j<=i} phi_q_i.phi_k_j, chunked so memory stays O(N)."""
    n = v.shape[2]
    pad = (-n) % CHUNK  # zero features appended after the last token reach no real query
    phi_q, phi_k, v = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, v))
    b, h, n_padded, _ = v.shape
    qc, kc, vc = (t.reshape(b, h, n_padded // CHUNK, CHUNK, -1) for t in (phi_q, phi_k, v))
    a = (qc @ kc.transpose(-1, -2)).tril()  # inside a chunk
    states = kc.transpose(-1, -2) @ vc  # [B, H, G, M, D]
    sums = kc.sum(-2).unsqueeze(-1)  # [B, H, G, M, 1]
    prefix_states = states.cumsum(2) - states  # exclusive: chunks strictly before
    prefix_sums = sums.cumsum(2) - sums
    num = a @ vc + qc @ prefix_states
    den = a.sum(-1, keepdim=True) + qc @ prefix_sums
    return (num / den).reshape(b, h, n_padded, -1)[:, :, :n]


class PerformerAttention(nn.Module):
    def __init__(self, config: PerformerConfig, layer_index: int):
        super().__init__()
        self.num_heads, self.causal, self.eps = config.num_heads, config.causal, config.eps
        self.query, self.key, self.value, self.out = (nn.Linear(config.hidden, config.hidden) for _ in range(4))
        g = torch.Generator().manual_seed(config.seed * 1000 + layer_index)
        head_dim = config.hidden // config.num_heads
        self.register_buffer("features", orthogonal_random_features(config.num_features, head_dim, g))

    def forward(self, x):
        q, k, v = (split_heads(p(x), self.num_heads) for p in (self.query, self.key, self.value))
        w = self.features
        phi_q = favor_features(q, w, self.eps, None)
        if self.causal:
            phi_k = favor_features(k, w, self.eps, (w * w).sum(-1).max() / 2)
            out = causal_linear_attention(phi_q, phi_k, v)
        else:
            k_scaled = k * k.shape[-1] ** -0.25
            k_logits = k_scaled @ w.t() - (k_scaled * k_scaled).sum(-1, keepdim=True) / 2
            phi_k = favor_features(k, w, self.eps, k_logits.amax((-2, -1), keepdim=True))
            kv = phi_k.transpose(-1, -2) @ v  # [B, H, M, D]
            out = (phi_q @ kv) / (phi_q @ phi_k.sum(-2).unsqueeze(-1))
        return self.out(merge_heads(out))


ENTRY = registry.register(registry.ZooEntry(
    name="performer",
    paper="Choromanski et al., Rethinking Attention with Performers, ICLR 2021",
    complexity="O(N * M * d): linear in N (M random features)",
    constraints="batch and sequence dynamic, any length up to max_seq_len (position table); random features "
                "frozen; causal form chunked in 64 tokens, any length",
    config_cls=PerformerConfig,
    build=lambda c: Encoder(c, lambda i: PreLNBlock(c.hidden, c.mlp_ratio, PerformerAttention(c, i)), head="tokens"),
    seq_len_rule=lambda c, n: check_length(c, n, "Performer"),
    small=dict(hidden=64, num_heads=4, num_layers=2, num_features=32, max_seq_len=512, vocab_size=100),
))
