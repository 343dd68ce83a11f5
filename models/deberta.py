"""DeBERTa v2/v3 (He et al., ICLR 2021): disentangled attention over log-bucketed relative positions.

Per head, query i and key j (c2c + c2p + p2c, scaled by 1/sqrt(3D): one content and two position terms):
  A_ij = (Q_c,i . K_c,j  +  Q_c,i . K_r,delta(i,j)  +  K_c,j . Q_r,delta(i,j)) / sqrt(3D),   O = softmax_j(A) V
The relative table P [2k, d] (k = position_buckets m) is LayerNorm'ed and shared by all layers; with share_att_key
the position keys and queries come from the content projections, biases included: K_r = key_proj(P),
Q_r = query_proj(P). The row each pair reads:
  delta(i, j) = clamp(bucket(i - j) + k, 0, 2k - 1)
  bucket(r) = r                                                          if |r| <= mid = m / 2
            = sign(r) (mid + ceil(log(|r| / mid) / log((L - 1) / mid) (mid - 1)))   otherwise
with L = max_relative_positions, exactly as transformers' DeBERTa-v2 make_log_bucket_position computes it: r is not
clamped first (a distance past L - 1 gets a bucket past m - 1, and the clamp of delta reads the last row), and the
arithmetic is float32 as there (the log correctly rounded). p2c follows the official code's index convention: key j
meets Q_r at delta(i, j), the same row as c2p (the paper writes delta(j, i)), which keeps weights compatible.
c2p and p2c are products against all 2k rows, gathered along the last axis. delta depends only on N, so it is a
[max_seq_len, max_seq_len] buffer computed once and sliced to N: the sequence axis stays dynamic.
Encoder: word embedding + LayerNorm with no absolute position embedding (position_biased_input = false), post-LN
BERT blocks as DeBERTa has them (x = LN(x + attn(x)), x = LN(x + MLP(x)), LayerNorm eps 1e-7), and a classifier on
the mean over tokens (in place of DeBERTa's first-token pooler).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import registry
from .common import EncoderConfig, check_length, check_positive, merge_heads, split_heads


@dataclass
class DebertaConfig(EncoderConfig):
    max_seq_len: int = 512
    num_classes: int = 2
    position_buckets: int = 256  # m, also the span k: P has 2m rows
    max_relative_positions: int = 512  # L
    layer_norm_eps: float = 1e-7

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "num_classes", "max_relative_positions", "layer_norm_eps")
        if self.position_buckets < 2:
            raise ValueError(f"position_buckets must be >= 2 (mid = m/2 must be >= 1), got {self.position_buckets}")
        if self.max_relative_positions <= self.position_buckets // 2 + 1:
            raise ValueError(f"max_relative_positions ({self.max_relative_positions}) must exceed position_buckets/2 "
                             f"+ 1 ({self.position_buckets // 2 + 1}): the log buckets cover mid..L-1")


def log_bucket(relative: torch.Tensor, buckets: int, max_position: int) -> torch.Tensor:
    """DeBERTa's bucket of each integer relative position: exact up to mid = m/2, logarithmic beyond."""
    mid = buckets // 2
    distance = relative.abs().clamp(min=mid).float()  # the log branch is only taken where |r| > mid
    # float32 as transformers computes it; the log taken in double and rounded, so it is the correctly rounded one
    ratio = torch.log((distance / mid).double()).float()
    denominator = torch.tensor(math.log(torch.tensor((max_position - 1) / mid).item()), dtype=torch.float32)
    log_position = mid + torch.ceil(ratio / denominator * (mid - 1))
    return torch.where(relative.abs() <= mid, relative, relative.sign() * log_position.long())


def relative_index(n: int, buckets: int, max_position: int) -> torch.Tensor:
    """delta [n, n]: delta(i, j) = clamp(bucket(i - j) + k, 0, 2k - 1), the row of P that query i uses for key j."""
    i = torch.arange(n)
    return (log_bucket(i[:, None] - i[None], buckets, max_position) + buckets).clamp(0, 2 * buckets - 1)


class DisentangledAttention(nn.Module):
    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.query, self.key, self.value, self.out = (nn.Linear(config.hidden, config.hidden) for _ in range(4))

    def forward(self, x, rel_embeddings, delta):
        """x [B, N, d]; rel_embeddings LN(P) [2k, d]; delta [N, N] row indices into it."""
        q, k, v = (split_heads(p(x), self.num_heads) for p in (self.query, self.key, self.value))
        batch, heads, n, d = q.shape
        scale = 1.0 / math.sqrt(3 * d)
        k_r = split_heads(self.key(rel_embeddings[None]), heads)  # [1, H, 2k, D] (share_att_key)
        q_r = split_heads(self.query(rel_embeddings[None]), heads)
        c2p = torch.gather(q @ k_r.transpose(-1, -2) * scale, -1, delta.expand(batch, heads, n, n))
        # p2c: rows are keys j, gathered at delta(i, j) for each query i, then transposed to [i, j]
        p2c = torch.gather(k @ q_r.transpose(-1, -2) * scale, -1, delta.t().expand(batch, heads, n, n))
        scores = q @ k.transpose(-1, -2) * scale + c2p + p2c.transpose(-1, -2)
        return self.out(merge_heads(torch.softmax(scores, -1) @ v))


class DebertaLayer(nn.Module):
    """Post-LN BERT block: x = LN(x + attn(x)), then x = LN(x + MLP(x)) with an exact-GELU MLP."""

    def __init__(self, config: DebertaConfig):
        super().__init__()
        hidden = config.hidden
        self.attention = DisentangledAttention(config)
        self.norm1, self.norm2 = (nn.LayerNorm(hidden, eps=config.layer_norm_eps) for _ in range(2))
        self.mlp = nn.Sequential(nn.Linear(hidden, config.mlp_ratio * hidden), nn.GELU(),
                                 nn.Linear(config.mlp_ratio * hidden, hidden))

    def forward(self, x, rel_embeddings, delta):
        x = self.norm1(x + self.attention(x, rel_embeddings, delta))
        return self.norm2(x + self.mlp(x))


class Deberta(nn.Module):
    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.config = config
        self.tokens = nn.Embedding(config.vocab_size, config.hidden)
        self.embed_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.rel_embeddings = nn.Embedding(2 * config.position_buckets, config.hidden)  # P
        self.rel_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(DebertaLayer(config) for _ in range(config.num_layers))
        self.head = nn.Linear(config.hidden, config.num_classes)
        self.register_buffer("delta", relative_index(config.max_seq_len, config.position_buckets,
                                                     config.max_relative_positions))

    def forward(self, input_ids):
        n = input_ids.shape[1]
        x = self.embed_norm(self.tokens(input_ids))
        rel_embeddings = self.rel_norm(self.rel_embeddings.weight)  # LN(P), shared by all layers
        delta = self.delta[:n, :n]
        for layer in self.layers:
            x = layer(x, rel_embeddings, delta)
        return self.head(x.mean(1))


ENTRY = registry.register(registry.ZooEntry(
    name="deberta",
    paper="He et al., DeBERTa: Decoding-enhanced BERT with Disentangled Attention, ICLR 2021",
    complexity="O(N^2 * d + N * 2k * d): the c2p/p2c products run against all 2k relative rows, then 2 gathers",
    constraints="batch and sequence dynamic, any length up to max_seq_len (the precomputed [max_seq_len, "
                "max_seq_len] relative index table is sliced to N)",
    config_cls=DebertaConfig,
    build=Deberta,
    seq_len_rule=lambda c, n: check_length(c, n, "DeBERTa", why=" (the relative index table covers max_seq_len)"),
    small=dict(hidden=64, num_heads=4, num_layers=2, max_seq_len=256, vocab_size=100, position_buckets=32,
               max_relative_positions=256),
    default_seq_len=lambda c: min(512, c.max_seq_len),
))
