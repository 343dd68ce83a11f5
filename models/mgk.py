"""Transformer-MGK (Nguyen et al., ICML 2022): attention with a mixture of M = 2 Gaussian keys per token and head.

Each token j has two keys k_j1, k_j2 per head (V is shared), built one of two ways (config `keys`):
  two_projections   k_jr = x_j W_Kr                          (LRA `--key2`, LM `rbf2keys`)
  shifted_means     k_jr = x_j W_K - mu_r, mu [2, H, D] learned, mu_0 initialised to 0  (LRA `--multi_gauss`, LM `rbf`)
With a_r = 1 / (2 sigma_r^2) and mixture weights pi_r = clamp(learnable, 0, 1) per head:

softmax form   A_ij = sum_r pi_r exp(-a_r |q_i - k_jr|^2) / sum_j' sum_r pi_r exp(-a_r |q_i - k_j'r|^2),   O = A V.
  Computed in log space as ONE ordinary softmax over the 2N keys (j, r) with logits
  log pi_r - a_r (|q_i|^2 - 2 q_i.k_jr + |k_jr|^2) and values [V; V]: the same ratio, but a row never underflows to
  0/0 as the official code's exp of raw distances can. Causal (config `causal`): keys j > i are masked.
  sigma_r^2 = sigma_sq_scale_r * sqrt(D): (1, 1) is the LRA code's sqrt(D) for both components (the default),
  (1, 1/3) the LM code's sqrt(D) and sqrt(D)/3.

linear form (MGK-linear, LM code)   phi(x) = elu(x) + 1 normalised to sum 1 over features,
  phi_K(j) = pi_0 phi(k_j1) + pi_1 phi(k_j2),   O_i = phi(q_i) (sum_j phi_K(j) v_j^T) / (phi(q_i) . sum_j phi_K(j)),
  causal: both sums over j <= i, as chunked prefix sums (performer.causal_linear_attention).

pi_r = 0 switches a component off (its logits are -inf); a head whose two weights are both 0 attends to nothing and
outputs zeros, not NaN. Deviations from the official code: pi is one pair per head (LRA: one pair shared by all
heads; LM: per head and key position, which caps N at 256); the LM linear code's extra 1/sqrt(D) output factor (it
folds into the output projection) and its denominator epsilon are left out; the EM variants (pi updated inside the
training forward) are not modelled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import registry
from .common import Encoder, EncoderConfig, PreLNBlock, check_length, check_positive, merge_heads, split_heads
from .performer import causal_linear_attention

KEYS = ("two_projections", "shifted_means")
ATTENTIONS = ("softmax", "linear")


@dataclass
class MGKConfig(EncoderConfig):
    num_classes: int = 2
    keys: str = "two_projections"
    attention: str = "softmax"
    causal: bool = False
    sigma_sq_scale_0: float = 1.0  # sigma_0^2 = sigma_sq_scale_0 * sqrt(D)
    sigma_sq_scale_1: float = 1.0  # LM variant: 1/3
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "num_classes", "sigma_sq_scale_0", "sigma_sq_scale_1")
        if self.keys not in KEYS:
            raise ValueError(f"keys must be one of {', '.join(KEYS)}, got '{self.keys}'")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got '{self.attention}'")


def mixture_softmax_attention(q, keys, v, pi, a, causal: bool):
    """One softmax over the 2N keys (j, r) of log pi_r - a_r |q_i - k_jr|^2; q, k_r, v [B, H, N, D], pi [2, H].
    The cross term -2 a_r q.k is one matmul against the concatenated keys scaled by 2 a_r; the rest is a bias."""
    q_sq = (q * q).sum(-1, keepdim=True)  # [B, H, N, 1]
    bias = torch.cat([pi[r].log()[:, None, None] - a[r] * (q_sq + (k * k).sum(-1)[:, :, None])
                      for r, k in enumerate(keys)], -1)  # [B, H, N, 2N]
    k = torch.cat([2 * a_r * k_r for a_r, k_r in zip(a, keys)], 2)  # [B, H, 2N, D]
    scores = q @ k.transpose(-1, -2) + bias  # scale 1: the 2 a_r factors live in the keys
    if causal:
        i = torch.arange(q.shape[2], device=q.device)
        scores = scores.masked_fill((i[None] > i[:, None]).repeat(1, 2), float("-inf"))
    return torch.softmax(scores, -1) @ torch.cat([v, v], 2)


def feature_map(x):
    """phi(x) = elu(x) + 1, normalised to sum 1 over features."""
    x = F.elu(x) + 1
    return x / x.sum(-1, keepdim=True)


def mixture_linear_attention(q, keys, v, pi, causal: bool):
    """MGK-linear: phi(q) against the mixed key features phi_K = pi_0 phi(k_1) + pi_1 phi(k_2)."""
    phi_q = feature_map(q)
    phi_k = sum(pi[r][:, None, None] * feature_map(k) for r, k in enumerate(keys))
    if causal:
        return causal_linear_attention(phi_q, phi_k, v)
    kv = phi_k.transpose(-1, -2) @ v  # [B, H, D, D]
    return (phi_q @ kv) / (phi_q @ phi_k.sum(-2).unsqueeze(-1))


class MGKAttention(nn.Module):
    def __init__(self, config: MGKConfig, layer_index: int):
        super().__init__()
        self.num_heads, self.attention, self.causal = config.num_heads, config.attention, config.causal
        self.shifted = config.keys == "shifted_means"
        head_dim = config.hidden // config.num_heads
        self.query, self.key, self.value, self.out = (nn.Linear(config.hidden, config.hidden) for _ in range(4))
        if self.shifted:
            g = torch.Generator().manual_seed(config.seed * 1000 + layer_index)
            mu = torch.randn(2, config.num_heads, head_dim, generator=g) * 0.5  # the official init: N(0, 0.5^2)
            mu[0] = 0.0
            self.mu = nn.Parameter(mu)
        else:
            self.key_2 = nn.Linear(config.hidden, config.hidden)
        self.pi = nn.Parameter(torch.full((2, config.num_heads), 0.5))  # clamped to [0, 1] when used
        sqrt_d = math.sqrt(head_dim)
        self.a = tuple(1.0 / (2 * s * sqrt_d) for s in (config.sigma_sq_scale_0, config.sigma_sq_scale_1))

    def heads(self, x):
        """q, (k_1, k_2), v, each [B, H, N, D]."""
        q, k, v = (split_heads(p(x), self.num_heads) for p in (self.query, self.key, self.value))
        if self.shifted:
            keys = (k - self.mu[0][:, None], k - self.mu[1][:, None])
        else:
            keys = (k, split_heads(self.key_2(x), self.num_heads))
        return q, keys, v

    def forward(self, x):
        q, keys, v = self.heads(x)
        pi = self.pi.clamp(0, 1)
        if self.attention == "softmax":
            out = mixture_softmax_attention(q, keys, v, pi, self.a, self.causal)
        else:
            out = mixture_linear_attention(q, keys, v, pi, self.causal)
        # a head with pi = (0, 0) gives every key weight 0 (0/0 above): defined as zero output
        out = torch.where(pi.amax(0)[:, None, None] > 0, out, 0.0)
        return self.out(merge_heads(out))


ENTRY = registry.register(registry.ZooEntry(
    name="mgk",
    paper="Nguyen et al., Improving Transformers with Probabilistic Attention Keys, ICML 2022",
    complexity="softmax: O(N^2 * d) over 2N keys (twice a softmax head); linear: O(N * D * d)",
    constraints="batch and sequence dynamic, any length up to max_seq_len (learned position table); the causal "
                "linear form is chunked in 64 tokens, any length",
    config_cls=MGKConfig,
    build=lambda c: Encoder(c, lambda i: PreLNBlock(c.hidden, c.mlp_ratio, MGKAttention(c, i)),
                            head="tokens" if c.causal else "pooled"),
    seq_len_rule=lambda c, n: check_length(c, n, "MGK"),
    small=dict(hidden=64, num_heads=2, num_layers=2, max_seq_len=512, vocab_size=100),
))
