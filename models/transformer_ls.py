"""Transformer-LS (Zhu et al., NeurIPS 2021): bidirectional long-short attention
(NVIDIA/transformer-ls, Transformer-LS-LRA/attention_transformer_ls.py::AttentionLS).

Per head (D = d / H), with w the segment length, e = max(w // 2, 1) the halo (the official get_tiles_v2) and
r the rank:
  Q = X W_q;   K = LN_S(X W_k), V = LN_S(X W_v)            (DualLN, short half: LN over the merged d)
  P = softmax over the N axis of (X W_p + b_p), as [H, r, N] (dynamic projection: r distributions over tokens)
  K_bar = LN_L(P K), V_bar = LN_L(P V)   [H, r, D]           (DualLN, long half: LN over the merged d)
  As in the official code, P projects the LN_S'ed K and V, so the landmarks pass through both LNs.
  Segment g holds queries gw .. gw+w-1 and sees the window keys gw-e .. gw+w+e-1 (positions outside [0, N)
  are zero padding, masked out) plus the r landmarks, all in ONE softmax:
      out = softmax([Q K_bar^T | Q K_win^T] / sqrt(D)) [V_bar ; V_win],  then W_o.
The window tiles are a Gather with a constant index table from the zero-padded K and V (no as_strided), so the
sequence axis stays dynamic; N must be a multiple of w (the official code's requirement too), which keeps the
projection softmax free of padded tokens. Every query sees its own key, so no softmax row is fully masked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import registry
from .common import Encoder, EncoderConfig, PreLNBlock, check_length, check_positive, merge_heads, split_heads


@dataclass
class TransformerLSConfig(EncoderConfig):
    window_size: int = 8
    rank: int = 32
    num_classes: int = 2

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "window_size", "rank", "num_classes")
        if self.max_seq_len % self.window_size:
            raise ValueError(f"max_seq_len ({self.max_seq_len}) must be a multiple of window_size "
                             f"({self.window_size})")


class LongShortAttention(nn.Module):
    def __init__(self, config: TransformerLSConfig):
        super().__init__()
        d = config.hidden
        self.num_heads, self.rank, self.window = config.num_heads, config.rank, config.window_size
        self.halo = max(config.window_size // 2, 1)
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.projection = nn.Linear(d, config.num_heads * config.rank)  # W_p, b_p (the official dconv_fc)
        self.ln_short, self.ln_long = nn.LayerNorm(d), nn.LayerNorm(d)
        # tile_index[g, t]: row of the zero-padded sequence holding window key t of segment g
        segments = config.max_seq_len // config.window_size
        start = torch.arange(segments)[:, None] * config.window_size
        self.register_buffer("tile_index", start + torch.arange(config.window_size + 2 * self.halo),
                             persistent=False)

    def dynamic_projection(self, x):
        """P [B, H, r, N]: for each head and landmark, a softmax over the N tokens."""
        b, n, _ = x.shape
        p = torch.softmax(self.projection(x), dim=1)
        return p.reshape(b, n, self.num_heads, self.rank).permute(0, 2, 3, 1)

    def segments(self, x):
        """Per-head Q in segments [B, H, G, w, D]; landmarks K_bar, V_bar [B, H, 1, r, D]; window tiles
        K_win, V_win [B, H, G, w + 2e, D]; and the window keys that are real tokens [G, 1, w + 2e]."""
        b, n, _ = x.shape
        h, w = self.num_heads, self.window
        q = split_heads(self.query(x), h)
        k, v = (split_heads(self.ln_short(linear(x)), h) for linear in (self.key, self.value))
        p = self.dynamic_projection(x)
        k_bar, v_bar = (split_heads(self.ln_long(merge_heads(p @ t)), h).unsqueeze(2) for t in (k, v))
        index = self.tile_index[: n // w]
        k_win, v_win = (F.pad(t, (0, 0, self.halo, self.halo)).index_select(2, index.flatten())
                        .reshape(b, h, n // w, index.shape[1], -1) for t in (k, v))
        position = index - self.halo
        real = ((position >= 0) & (position < n)).unsqueeze(1)
        return q.reshape(b, h, n // w, w, -1), k_bar, v_bar, k_win, v_win, real

    def attend(self, q, k_bar, v_bar, k_win, v_win, real):
        """One softmax per query over [r landmarks | w + 2e window keys]; padded window keys are masked."""
        scale = 1.0 / math.sqrt(q.shape[-1])
        long_scores = q @ k_bar.transpose(-1, -2) * scale  # [B, H, G, w, r]
        short_scores = (q @ k_win.transpose(-1, -2) * scale).masked_fill(~real, float("-inf"))  # [.., w + 2e]
        attn = torch.softmax(torch.cat([long_scores, short_scores], -1), -1)
        return attn[..., : self.rank] @ v_bar + attn[..., self.rank:] @ v_win  # [B, H, G, w, D]

    def forward(self, x):
        b, n, _ = x.shape
        out = self.attend(*self.segments(x))
        return self.out(merge_heads(out.reshape(b, self.num_heads, n, -1)))


def check_seq_len(config: TransformerLSConfig, seq_len: int) -> None:
    check_length(config, seq_len, "Transformer-LS", config.window_size, "window_size", minimum=config.window_size)


def parity_seq_lens(config: TransformerLSConfig) -> list[int]:
    w, segments = config.window_size, config.max_seq_len // config.window_size
    lengths = sorted({w * min(g, segments) for g in (5, 12)})
    return lengths if len(lengths) > 1 else sorted({w * max(segments // 2, 1), w * segments})


ENTRY = registry.register(registry.ZooEntry(
    name="transformer-ls",
    paper="Zhu et al., Long-Short Transformer: Efficient Transformers for Language and Vision, NeurIPS 2021",
    complexity="O(N * (r + 2w) * d): linear in N (rank r, segment w)",
    constraints="batch and sequence dynamic; sequence a multiple of window_size (segments of w queries; no padding "
                "inside the graph, so the projection softmax over N sees only real tokens), up to max_seq_len "
                "(position table, constant window index table)",
    config_cls=TransformerLSConfig,
    build=lambda c: Encoder(c, lambda i: PreLNBlock(c.hidden, c.mlp_ratio, LongShortAttention(c)), head="pooled"),
    seq_len_rule=check_seq_len,
    parity_seq_lens=parity_seq_lens,
    small=dict(hidden=64, num_heads=4, num_layers=2, window_size=8, rank=4, max_seq_len=512, vocab_size=100),
))
