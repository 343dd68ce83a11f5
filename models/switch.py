"""Switch Transformer (Fedus, Zoph, Shazeer, JMLR 2022; HF transformers models/switch_transformers): top-1
mixture-of-experts feed-forward layers.

A token encoder with standard attention whose FFNs are T5's (W_i: d -> d_ff, ReLU, W_o: d_ff -> d, no bias); every
`moe_every`-th one is a Switch layer with E experts. One group is one batch row of T = N tokens. Per token x:
    router (float32)  h = x W_r (no bias),  p = softmax(h),  e* = argmax p,  gate g = p_{e*}
    capacity          C = ceil(T / E * capacity_factor) slots per expert and group
    admission         in sequence order: rank_t = cumsum_{s<=t} onehot(e*_s)_{e*_t}; kept iff rank_t <= C
    output            y = g * E_{e*}(x) if kept, else 0 (a dropped token passes through the residual unchanged;
                      HF's port returns g * x for it instead, a quirk not followed here)
It is written as a static dispatch/combine (GShard style) so that a trace keeps every expert and no shape depends
on the data: D[t, e, c] = onehot(e*_t)_e * onehot(rank_t - 1)_c (a token with rank_t > C matches no slot),
X = D^T x -> [E, C, d], one batched matmul over the stacked expert weights [E, d, d_ff] and [E, d_ff, d], then
y = (g * D) Y. Memory per group is T * E * C, and the same capacity rule holds at inference (no dropless mode).
Deviations for a compact zoo model: learned absolute positions and LayerNorm (the shared encoder) instead of T5's
relative position bias and RMSNorm; no jitter and no auxiliary losses (training only).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from . import registry
from .common import Encoder, EncoderConfig, PreLNBlock, SelfAttention, check_length, check_positive


@dataclass
class SwitchConfig(EncoderConfig):
    max_seq_len: int = 1024
    num_experts: int = 8
    capacity_factor: float = 1.25
    moe_every: int = 2

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "num_experts", "capacity_factor", "moe_every")


def t5_ffn(hidden: int, d_ff: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, d_ff, bias=False), nn.ReLU(), nn.Linear(d_ff, hidden, bias=False))


class SwitchFFN(nn.Module):
    def __init__(self, config: SwitchConfig):
        super().__init__()
        d, d_ff, e = config.hidden, config.mlp_ratio * config.hidden, config.num_experts
        self.num_experts = e
        # capacity_factor as the exact fraction written in the config, so that C is integer arithmetic on T: the
        # TorchScript exporter would freeze a float ceil of the traced length into a constant
        self.capacity_ratio = Fraction(str(config.capacity_factor)) / e
        self.router = nn.Linear(d, e, bias=False)
        nn.init.normal_(self.router.weight, std=1.0)  # HF's router init (factor 1.0)
        self.wi = nn.Parameter(torch.randn(e, d, d_ff) * d ** -0.5)
        self.wo = nn.Parameter(torch.randn(e, d_ff, d) * d_ff ** -0.5)

    def capacity(self, tokens):
        """C = ceil(T * capacity_factor / E), exactly."""
        num, den = self.capacity_ratio.numerator, self.capacity_ratio.denominator
        return (tokens * num + den - 1) // den

    def route(self, x):
        """In float32 whatever the model's dtype: probabilities p [B, T, E], expert e* [B, T], gate g [B, T]."""
        probs = torch.softmax(F.linear(x.float(), self.router.weight.float()), -1)
        gate, expert = probs.max(-1)
        return probs, expert, gate

    def forward(self, x):
        b, t, d = x.shape
        e, c = self.num_experts, self.capacity(t)
        _, expert, gate = self.route(x)
        # routing bookkeeping stays in float32: the ranks are exact integers there in any model dtype
        expert_mask = (expert[..., None] == torch.arange(e, device=x.device)).float()  # [B, T, E]
        rank = (expert_mask.cumsum(1) * expert_mask).sum(-1)  # place of each token in its expert's queue, from 1
        slot = (rank[..., None] - 1 == torch.arange(c, device=x.device, dtype=rank.dtype)).float()  # [B, T, C]
        dispatch = (expert_mask[..., None] * slot[..., None, :]).reshape(b, t, e * c)  # D [B, T, E*C]
        expert_in = (dispatch.to(x.dtype).transpose(1, 2) @ x).reshape(b, e, c, d)
        expert_out = torch.relu(expert_in @ self.wi) @ self.wo  # every expert at once: [B, E, C, d]
        combine = (dispatch * gate[..., None]).to(x.dtype)
        return combine @ expert_out.reshape(b, e * c, d)


class SwitchBlock(PreLNBlock):
    def __init__(self, config: SwitchConfig, layer_index: int):
        super().__init__(config.hidden, config.mlp_ratio, SelfAttention(config.hidden, config.num_heads))
        # as HF: layers 1, 1 + k, 1 + 2k, ... are sparse for moe_every = k > 1, and every layer for k = 1
        sparse = layer_index % config.moe_every == 1 % config.moe_every
        self.mlp = SwitchFFN(config) if sparse else t5_ffn(config.hidden, config.mlp_ratio * config.hidden)


ENTRY = registry.register(registry.ZooEntry(
    name="switch",
    paper="Fedus, Zoph, Shazeer, Switch Transformers: Scaling to Trillion Parameter Models with Simple and "
          "Efficient Sparsity, JMLR 2022",
    complexity="attention O(N^2 * d); MoE FFN O(N * d * d_ff) compute (top-1) plus an O(N * E * C) = "
               "O(capacity_factor * N^2) dispatch/combine",
    constraints="batch and sequence dynamic, any length up to max_seq_len (position table); expert capacity "
                "C = ceil(N / E * capacity_factor) per batch row follows the sequence length, and tokens over "
                "capacity are dropped (at inference too)",
    config_cls=SwitchConfig,
    build=lambda c: Encoder(c, lambda i: SwitchBlock(c, i), head="tokens"),
    seq_len_rule=lambda c, n: check_length(c, n, "Switch"),
    small=dict(hidden=64, num_heads=4, num_layers=2, num_experts=4, max_seq_len=512, vocab_size=100),
    default_seq_len=lambda c: min(512, c.max_seq_len),
))
