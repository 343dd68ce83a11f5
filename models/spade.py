"""SPADE (Zuo et al., 2022): a state-space layer for global context beside local attention.

Layers with index % s4_every == 0 (run_lm.sh: layer 0 only) mix a global and a local view of x̂ = LN(x):
  g = S4(x̂),  ℓ = LocalAttn(x̂),
  concat: z = W_agg [LN_g(g); LN_ℓ(ℓ)] + b      add: z = w LN_g(g) + (1 - w) LN_ℓ(ℓ)
then x + z and a pre-LN FFN. The other layers are pre-LN local attention only.

LocalAttn (LongT5 style): block_len = r + 1; the sequence is zero-padded to a multiple of block_len and each query
block attends to its previous, own and next blocks (3 block_len keys, gathered with a block table), masked to
|i - j| <= r and to real keys, with scores q.k / sqrt(D) + T5 relative bias (one table for all layers, as in
T5 and the official code, which computes it in layer 0 and passes it on).

S4, the diagonal S4D kernel: per channel h, N/2 complex modes A_n = -exp(a_n) + i theta_n, step Delta_h,
B_n, C_n; bilinear discretisation (the default of the official SSKernelDiag)
  Ā = (1 + Delta A / 2) / (1 - Delta A / 2),  B̄ = Delta B / (1 - Delta A / 2)
(or ZOH: Ā = exp(Delta A), B̄ = (exp(Delta A) - 1) / A B), and kernel K[h, l] = 2 Re sum_n C_n B̄_n Ā_n^l.
The official default is full S4 (LegS, normal plus low rank): its kernel needs a Cauchy kernel and an FFT, and
its low-rank term leaves no exact diagonal state. S4D (the official diag mode) is the spec's simplest exact path:
its kernel is a Vandermonde product, computed once here in float64 (complex in __init__ only) and frozen as a
buffer, and it has an exact diagonal recurrence to check against. At inference S4 is the long convolution
  y_t = sum_{s<=t} K_fwd[t - s] u_s + sum_{s>t} K_bwd[s - t - 1] u_s + D u_t,
the encoder's bidirectional form: two kernels (two C's), the second run over the flipped sequence one step
delayed, as the official F.pad(k0, (0, L)) + F.pad(k1.flip(-1), (L, 0)) does, so u_t is not counted twice.
It exports as one depthwise Conv whose weight is the whole two-sided kernel, a constant (no FFT, no complex
dtype in the graph). One deviation comes from the zoo's shared Encoder: it adds learned token positions, which
run_lm.sh leaves out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import registry
from .common import (Encoder, EncoderConfig, PreLNBlock, check_length, check_positive, merge_heads, split_heads,
                     t5_relative_buckets)

NUM_BUCKETS, MAX_DISTANCE = 32, 128  # T5 relative attention


@dataclass
class SpadeConfig(EncoderConfig):
    radius: int = 127  # local attention sees |i - j| <= radius
    s4_every: int = 100  # S4 in the layers with index % s4_every == 0
    combine: str = "concat"  # or "add"
    s4_weight: float = 0.5  # w of the "add" merge
    n_state: int = 64  # N: N/2 complex conjugate pairs per channel
    s4d_init: str = "legs"  # S4D-LegS or S4D-Lin imaginary parts
    discretization: str = "bilinear"  # or "zoh"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "s4_every", "n_state", "dt_min")
        if self.radius < 0:
            raise ValueError(f"radius must be >= 0, got {self.radius}")
        if self.n_state % 2:
            raise ValueError(f"n_state must be even (conjugate pairs), got {self.n_state}")
        if self.dt_max < self.dt_min:
            raise ValueError(f"dt_max ({self.dt_max}) must be >= dt_min ({self.dt_min})")
        if not 0.0 <= self.s4_weight <= 1.0:
            raise ValueError(f"s4_weight must be in [0, 1], got {self.s4_weight}")
        for name, allowed in (("combine", ("concat", "add")), ("s4d_init", ("legs", "lin")),
                              ("discretization", ("bilinear", "zoh"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got '{getattr(self, name)}'")


def s4d_imag_parts(init: str, n_state: int) -> torch.Tensor:
    """theta_n, n < N/2. lin: pi n. legs: the imaginary parts of the normal HiPPO-LegS matrix (-1/2 + skew part),
    the half of each conjugate pair the official code keeps (ascending, first N/2)."""
    if init == "lin":
        return math.pi * torch.arange(n_state // 2, dtype=torch.float64)
    q = torch.arange(n_state, dtype=torch.float64)
    root = torch.sqrt((2 * q[:, None] + 1) * (2 * q[None] + 1)) / 2
    skew = torch.where(q[:, None] > q[None], -root, torch.where(q[:, None] < q[None], root, 0.0))
    return torch.linalg.eigvalsh(-1j * skew.to(torch.complex128))[: n_state // 2]


class S4D(nn.Module):
    """Bidirectional diagonal state-space layer on [B, N, H], run as a precomputed two-sided long convolution."""

    def __init__(self, config: SpadeConfig, layer_index: int):
        super().__init__()
        h, half = config.hidden, config.n_state // 2
        self.channels, self.max_len = h, config.max_seq_len
        g = torch.Generator().manual_seed(config.seed * 1000 + layer_index)
        log_dt = torch.rand(h, generator=g) * math.log(config.dt_max / config.dt_min) + math.log(config.dt_min)
        c = torch.randn(2, h, half, 2, generator=g) / math.sqrt(2)  # complex normal; [fwd, bwd] output maps
        self.D = nn.Parameter(torch.randn(h, generator=g))
        # the SSM itself, kept for inspection: a = log(-Re A), B and C as (real, imag) pairs
        self.register_buffer("log_dt", log_dt)
        self.register_buffer("a", torch.full((h, half), math.log(0.5)))
        self.register_buffer("theta", s4d_imag_parts(config.s4d_init, config.n_state).float().expand(h, -1).clone())
        self.register_buffer("B", torch.stack([torch.ones(h, half), torch.zeros(h, half)], -1))
        self.register_buffer("C", c)
        self.discretization = config.discretization
        k_fwd, k_bwd = self.kernels(self.max_len)
        # taps[h, L-1+m] weighs u_{t+m}: K_fwd[-m] for m <= 0, K_bwd[m-1] for m >= 1
        self.register_buffer("taps", torch.cat([k_fwd.flip(-1), k_bwd[:, :-1]], -1).float())

    def kernels(self, length: int) -> torch.Tensor:
        """[2, H, length] float64: K[l] = 2 Re sum_n C_n B̄_n Ā_n^l for the forward and the backward C."""
        dt = self.log_dt.double().exp()[:, None]
        A = torch.complex(-self.a.double().exp(), self.theta.double())
        B = torch.view_as_complex(self.B.double())
        C = torch.view_as_complex(self.C.double())
        if self.discretization == "bilinear":
            A_bar = (1 + dt * A / 2) / (1 - dt * A / 2)
            B_bar = dt * B / (1 - dt * A / 2)
        else:
            A_bar = torch.exp(dt * A)
            B_bar = (A_bar - 1) / A * B
        # Ā^(step c + f) = Ā^(step c) Ā^f: two short tables of powers instead of H * N/2 * L of them
        step = math.isqrt(length - 1) + 1
        i = torch.arange(step, dtype=torch.float64)
        coarse, fine = (torch.exp(A_bar.log()[..., None] * e) for e in (step * i, i))  # [H, N/2, step]
        K = ((C * B_bar)[..., None] * coarse).transpose(-1, -2) @ fine  # [2, H, c, f]
        return 2 * K.real.flatten(-2)[..., :length]

    def forward(self, u):
        x = u.transpose(1, 2)  # [B, H, N]
        # out[t] = sum_m taps[L-1+m] x[t+m], exact for any N <= L. The whole kernel with fixed pads L-1 costs
        # O(N L) per channel, not O(N^2), but a kernel sliced to N has a dynamic shape, which the TorchScript
        # exporter refuses ("convolution for kernel of unknown shape").
        y = F.conv1d(x, self.taps.unsqueeze(1), padding=self.max_len - 1, groups=self.channels)
        return (y + self.D[:, None] * x).transpose(1, 2)


def window_offsets(block_len: int) -> torch.Tensor:
    """[block_len, 3 block_len]: key - query position for a query of the middle block and the keys of the window."""
    return torch.arange(3 * block_len)[None] - torch.arange(block_len, 2 * block_len)[:, None]


class RelativePositionBias(nn.Module):
    """T5 bias over the 3-block window: [H, 1, block_len, 3 block_len], key offset j - (i + block_len)."""

    def __init__(self, config: SpadeConfig):
        super().__init__()
        relative = window_offsets(config.radius + 1)
        self.register_buffer("buckets", t5_relative_buckets(relative, True, NUM_BUCKETS, MAX_DISTANCE))
        self.bias = nn.Embedding(NUM_BUCKETS, config.num_heads)

    def forward(self):
        return self.bias(self.buckets).permute(2, 0, 1).unsqueeze(1)


class LocalAttention(nn.Module):
    def __init__(self, config: SpadeConfig, relative_bias: RelativePositionBias):
        super().__init__()
        self.num_heads, self.block_len = config.num_heads, config.radius + 1
        self.query, self.key, self.value, self.out = (nn.Linear(config.hidden, config.hidden, bias=False)
                                                      for _ in range(4))
        self.relative_bias = relative_bias
        bl = self.block_len
        self.register_buffer("local", window_offsets(bl).abs() <= config.radius)  # [bl, 3 bl]
        # blocks of the sequence padded with one zero block each side: query block i sees i, i+1, i+2 there
        max_blocks = -(-config.max_seq_len // bl)
        self.register_buffer("window", torch.arange(max_blocks)[:, None] + torch.arange(3))

    def forward(self, x):
        q, k, v = (split_heads(p(x), self.num_heads) for p in (self.query, self.key, self.value))
        batch, heads, n, d = q.shape
        bl = self.block_len
        pad = (-n) % bl
        nb = (n + pad) // bl
        qb = F.pad(q, (0, 0, 0, pad)).reshape(batch, heads, nb, bl, d)
        kb, vb = (F.pad(t, (0, 0, bl, pad + bl)).reshape(batch, heads, nb + 2, bl, d) for t in (k, v))
        window = self.window[:nb]
        kw, vw = (t[:, :, window].reshape(batch, heads, nb, 3 * bl, d) for t in (kb, vb))

        scores = qb @ kw.transpose(-1, -2) * (1.0 / math.sqrt(d)) + self.relative_bias()  # [B, H, nb, bl, 3 bl]
        key_position = ((window - 1)[:, :, None] * bl + torch.arange(bl)).reshape(nb, 1, 3 * bl)
        # every query (padded ones too) sees its own block's first key, so no row is fully masked
        visible = self.local & (key_position >= 0) & (key_position < n)
        scores = scores.masked_fill(~visible, float("-inf"))
        out = (torch.softmax(scores, -1) @ vw).reshape(batch, heads, nb * bl, d)[:, :, :n]
        return self.out(merge_heads(out))


class GlobalLocal(nn.Module):
    """z from x̂: S4 (global) and local attention, each layer-normed, merged by concat + Linear or a weighted add."""

    def __init__(self, config: SpadeConfig, s4: S4D, local: LocalAttention):
        super().__init__()
        self.s4, self.local = s4, local
        self.norm_global, self.norm_local = nn.LayerNorm(config.hidden), nn.LayerNorm(config.hidden)
        self.aggregate = nn.Linear(2 * config.hidden, config.hidden) if config.combine == "concat" else None
        self.weight = config.s4_weight

    def forward(self, x):
        g, local = self.norm_global(self.s4(x)), self.norm_local(self.local(x))
        if self.aggregate is not None:
            return self.aggregate(torch.cat([g, local], -1))
        return self.weight * g + (1.0 - self.weight) * local


def build(config: SpadeConfig) -> Encoder:
    relative_bias = RelativePositionBias(config)  # shared by every layer

    def block(i: int) -> PreLNBlock:
        mixer = LocalAttention(config, relative_bias)
        if i % config.s4_every == 0:
            mixer = GlobalLocal(config, S4D(config, i), mixer)
        return PreLNBlock(config.hidden, config.mlp_ratio, mixer)

    return Encoder(config, block, head="tokens")


def parity_seq_lens(config: SpadeConfig) -> list[int]:
    bl = config.radius + 1  # several blocks, neither length a multiple of block_len when bl > 2
    return sorted({min(n, config.max_seq_len) for n in (2 * bl + 3, 5 * bl - 1)})


ENTRY = registry.register(registry.ZooEntry(
    name="spade",
    paper="Zuo et al., Efficient Long Sequence Modeling via State Space Augmented Transformer, 2022",
    complexity="O(N * 3(r+1) * d) local attention; O(N * max_seq_len * d) for the S4 layer as a direct long "
               "convolution (the official FFT path is O(d N log N), but ONNX/TensorRT have no usable FFT)",
    constraints="batch and sequence dynamic, any length up to max_seq_len (the precomputed S4 kernel and the "
                "position table); the sequence is zero-padded to a multiple of radius+1 inside the graph and "
                "padded keys are masked",
    config_cls=SpadeConfig,
    build=build,
    seq_len_rule=lambda c, n: check_length(c, n, "SPADE", why=" (the S4 kernel and position table length)"),
    parity_seq_lens=parity_seq_lens,
    small=dict(hidden=64, num_heads=4, num_layers=2, radius=15, n_state=16, max_seq_len=512, vocab_size=100),
))
