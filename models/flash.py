"""FLASH (Hua, Dai, Liu, Le; ICML 2022): gated attention units (GAU) with mixed chunk attention (MCA).

One FLASH layer is a single-head GAU (no softmax), with lucidrains/FLASH-pytorch's choices:
  X^ = Norm(X) (ScaleNorm or LayerNorm)
  U = SiLU(X^ W_u), V = SiLU(X^ W_v)  [N, e], e = expansion * d;   Z = SiLU(X^ W_z)  [N, s], s = query_key_dim
  Q_quad, Q_lin, K_quad, K_lin = Z * gamma_. + beta_.  (four per-dimension offset-scales of the same Z),
  then RoPE on their first rotary_dim features (adjacent pairs rotated, positions 0 .. N-1).
The tokens are cut into G chunks of C = group_size (zero-padded to G*C inside the graph).
  local, per chunk g:  O_quad,g = relu^2(Q_quad,g K_quad,g^T / C + b_rel) V_g   (lower-triangular if causal)
                       b_rel: a T5 relative bias (32 buckets, max distance 128) scaled by sqrt(s), C x C table.
  global, identity feature map and no denominator:
      non-causal  O_lin = Q_lin (sum_j K_lin,j^T V_j) / N          N the original, unpadded length (as lucidrains)
      causal      O_lin,g = Q_lin,g (sum_{h<g} K_lin,h^T V_h) / C  earlier chunks only: the own chunk is local
  O = (U * (O_quad + O_lin)) W_o + X
Padded tokens have V = 0, so they add nothing to any real token's output; their own rows are cut off.
Not taken from lucidrains: the half-channel token shift (not in the paper) and the scaled sinusoidal absolute
position embedding (common.Encoder's learned one is used instead).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import registry
from .common import Encoder, check_length, check_positive, t5_relative_buckets, token_inputs

T5_BUCKETS, T5_MAX_DISTANCE = 32, 128  # lucidrains' relative bias
NORMS = ("scalenorm", "layernorm")


@dataclass
class FlashConfig:
    vocab_size: int = 1000
    max_seq_len: int = 4096
    hidden: int = 128
    num_layers: int = 2
    expansion: int = 2
    query_key_dim: int = 128
    group_size: int = 256
    rotary_dim: int = 32
    norm: str = "scalenorm"
    causal: bool = False

    def __post_init__(self):
        check_positive(self, "vocab_size", "max_seq_len", "hidden", "num_layers", "expansion", "query_key_dim",
                       "group_size", "rotary_dim")
        if self.rotary_dim % 2 or self.rotary_dim > self.query_key_dim:
            raise ValueError(f"rotary_dim must be even and at most query_key_dim ({self.query_key_dim}), "
                             f"got {self.rotary_dim}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got '{self.norm}'")


class ScaleNorm(nn.Module):
    """x / max(|x| / sqrt(d), eps) * g, one learned gain (lucidrains' default norm)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.scale, self.eps = dim ** -0.5, eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x / (x.norm(dim=-1, keepdim=True) * self.scale).clamp(min=self.eps) * self.g


class Rotary(nn.Module):
    """RoPE on the first `dim` features, adjacent pairs (x_2i, x_2i+1) rotated by position * 10000^(-2i/dim)
    (rotary-embedding-torch's layout). cos/sin are tables up to max_seq_len, sliced to the current length."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
        angles = (torch.arange(max_seq_len).float()[:, None] * inv_freq).repeat_interleave(2, -1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x):
        n, dim = x.shape[-2], self.cos.shape[-1]
        rotated, rest = x[..., :dim], x[..., dim:]
        pairs = rotated.unflatten(-1, (-1, 2))
        turned = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)  # (x0, x1) -> (-x1, x0)
        rotated = rotated * self.cos[:n] + turned * self.sin[:n]
        return torch.cat([rotated, rest], -1)


def mixed_chunk_attention(quad_q, quad_k, lin_q, lin_k, v, bias, causal: bool):
    """[B, N, s] x 4 and V [B, N, e] -> [B, N, e]; bias [C, C] is the local relative bias, C the chunk."""
    b, n, e = v.shape
    c = bias.shape[0]
    pad = (-n) % c  # zero rows: V = 0 there, so padded keys add nothing to either part

    def chunks(t):  # [B, N, .] -> [B, G, C, .]
        return F.pad(t, (0, 0, 0, pad)).reshape(b, -1, c, t.shape[-1])

    v_chunks = chunks(v)
    scores = chunks(quad_q) @ chunks(quad_k).transpose(-1, -2) * (1.0 / c) + bias  # [B, G, C, C]
    a = torch.relu(scores).square()
    if causal:
        a = a.tril()
    quad = (a @ v_chunks).reshape(b, -1, e)[:, :n]
    if causal:
        states = chunks(lin_k).transpose(-1, -2) @ v_chunks * (1.0 / c)  # [B, G, s, e]
        lin = (chunks(lin_q) @ (states.cumsum(1) - states)).reshape(b, -1, e)[:, :n]  # exclusive prefix
    else:
        lin = lin_q @ (lin_k.transpose(-1, -2) @ v) / n
    return quad + lin


class FlashLayer(nn.Module):
    """One GAU with mixed chunk attention, residual included (two of these stand in for attention + MLP)."""

    def __init__(self, config: FlashConfig, rotary: Rotary):
        super().__init__()
        d, e, s = config.hidden, config.expansion * config.hidden, config.query_key_dim
        self.causal = config.causal
        self.norm = ScaleNorm(d) if config.norm == "scalenorm" else nn.LayerNorm(d)
        self.to_hidden = nn.Linear(d, 2 * e)  # W_v and W_u
        self.to_qk = nn.Linear(d, s)  # W_z
        # OffsetScale: gamma ~ N(0, 0.02), beta = 0, rows for Q_quad, Q_lin, K_quad, K_lin
        self.gamma = nn.Parameter(torch.randn(4, s) * 0.02)
        self.beta = nn.Parameter(torch.zeros(4, s))
        self.rotary = rotary  # shared by all layers, as in lucidrains
        self.relative_bias = nn.Embedding(T5_BUCKETS, 1)
        position = torch.arange(config.group_size)
        buckets = t5_relative_buckets(position[None] - position[:, None], bidirectional=not config.causal,
                                      num_buckets=T5_BUCKETS, max_distance=T5_MAX_DISTANCE)
        self.register_buffer("buckets", buckets, persistent=False)  # [C, C], key minus query within a chunk
        self.bias_scale = math.sqrt(s)
        self.to_out = nn.Linear(e, d)  # W_o

    def gau_inputs(self, x):
        """U, V [B, N, e] and the rotated Q_quad, K_quad, Q_lin, K_lin [B, N, s]."""
        x_hat = self.norm(x)
        v, u = F.silu(self.to_hidden(x_hat)).chunk(2, -1)
        z = F.silu(self.to_qk(x_hat))
        quad_q, lin_q, quad_k, lin_k = (self.rotary(z * g + b) for g, b in zip(self.gamma, self.beta))
        return u, v, quad_q, quad_k, lin_q, lin_k

    def local_bias(self):
        return self.relative_bias(self.buckets).squeeze(-1) * self.bias_scale

    def forward(self, x):
        u, v, quad_q, quad_k, lin_q, lin_k = self.gau_inputs(x)
        o = mixed_chunk_attention(quad_q, quad_k, lin_q, lin_k, v, self.local_bias(), self.causal)
        return self.to_out(u * o) + x


def build(config: FlashConfig) -> nn.Module:
    rotary = Rotary(config.rotary_dim, config.max_seq_len)
    return Encoder(config, lambda i: FlashLayer(config, rotary), head="tokens")


def parity_seq_lens(config: FlashConfig) -> list[int]:
    c, m = config.group_size, config.max_seq_len  # one length that needs padding, one that fills its chunks
    lengths = sorted({min(n, m) for n in (3 * c // 2 + 1, 3 * c)})
    return lengths if len(lengths) > 1 else sorted({max(m // 2, 1), m})


ENTRY = registry.register(registry.ZooEntry(
    name="flash",
    paper="Hua et al., Transformer Quality in Linear Time, ICML 2022",
    complexity="O(N * C * s + N * s * e): linear in N (chunk C = group_size)",
    constraints="batch and sequence dynamic, any length up to max_seq_len (position and RoPE tables); the "
                "sequence is zero-padded to a multiple of group_size inside the graph and the non-causal global "
                "term divides by the unpadded N (taken from the input's shape)",
    config_cls=FlashConfig,
    build=build,
    example_inputs=lambda c, batch, seq_len: token_inputs(c.vocab_size, batch, seq_len),
    dynamic_axes={"input_ids": {0: "batch", 1: "seq"}},
    seq_len_rule=lambda c, n: check_length(c, n, "FLASH"),
    parity_seq_lens=parity_seq_lens,
    small=dict(hidden=64, num_layers=2, query_key_dim=32, rotary_dim=16, group_size=32, max_seq_len=512,
               vocab_size=100),
))
