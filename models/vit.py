"""ViT (Dosovitskiy et al., ICLR 2021; google-research/vision_transformer vit_jax/models_vit.py).

An image [B, 3, S, S] is cut into Np = (S / P)^2 patches by a Conv with kernel = stride = P (each patch times one
linear map), a learned `cls` token (zero init) is prepended, and a learned position embedding of Np + 1 rows is
added. Then L pre-LN blocks x += MHSA(LN(x)), x += MLP(LN(x)) with standard softmax attention
softmax(Q K^T / sqrt(D)) V (projections with bias) and an exact-GELU MLP, a final LN, and the head reads token 0.
LayerNorms use eps 1e-6 (flax's default). The paper initialises the head to zero; here it is small and nonzero so
that outputs depend on the weights and parity checks mean something.

The position embedding fixes the resolution, so the token count (the toolchain's sequence length) is Np + 1 for
the configured image size only; another resolution needs the embedding resized (2D interpolation) offline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import registry
from .common import PreLNBlock, SelfAttention, check_positive

LN_EPS = 1e-6
CHANNELS = 3


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    hidden: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    num_classes: int = 10

    def __post_init__(self):
        check_positive(self, "image_size", "patch_size", "hidden", "num_layers", "num_heads", "mlp_ratio",
                       "num_classes")
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of num_heads ({self.num_heads})")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")

    @property
    def num_tokens(self) -> int:
        """Np + 1: the patches and the cls token."""
        return (self.image_size // self.patch_size) ** 2 + 1


class ViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        d = config.hidden
        self.patch_embed = nn.Conv2d(CHANNELS, d, config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.position = nn.Parameter(torch.randn(1, config.num_tokens, d) * 0.02)
        self.layers = nn.ModuleList(PreLNBlock(d, config.mlp_ratio, SelfAttention(d, config.num_heads))
                                    for _ in range(config.num_layers))
        for layer in self.layers:
            layer.norm1.eps = layer.norm2.eps = LN_EPS
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.head = nn.Linear(d, config.num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, pixel_values):
        patches = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # [B, Np, d]
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        x = torch.cat([cls, patches], 1) + self.position
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x)[:, 0])


def check_seq_len(config: ViTConfig, seq_len: int) -> None:
    if seq_len != config.num_tokens:
        grid = config.image_size // config.patch_size
        raise ValueError(f"ViT takes exactly {config.num_tokens} tokens ({grid}x{grid} patches of "
                         f"{config.image_size}px images + cls), got {seq_len}: the position embedding fixes the "
                         f"resolution (resize it offline and set image_size for another one)")


def example_inputs(config: ViTConfig, batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Images whose token count is seq_len: (S / P)^2 + 1 = seq_len."""
    grid = math.isqrt(max(seq_len - 1, 0))
    if seq_len < 2 or grid * grid != seq_len - 1:
        raise ValueError(f"ViT needs a token count of the form g^2 + 1 (g x g patches + cls), got {seq_len}")
    size = grid * config.patch_size
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(batch, CHANNELS, size, size, generator=g)}


ENTRY = registry.register(registry.ZooEntry(
    name="vit",
    paper="Dosovitskiy et al., An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale, "
          "ICLR 2021",
    complexity="O(N^2 * d) per layer with N = (S / P)^2 + 1 tokens: dense softmax attention",
    constraints="batch dynamic; the token count is fixed to (image_size / patch_size)^2 + 1, because the learned "
                "position embedding fixes the resolution (resize it offline for another one)",
    config_cls=ViTConfig,
    build=ViT,
    example_inputs=example_inputs,
    dynamic_axes={"pixel_values": {0: "batch"}},
    seq_len_rule=check_seq_len,
    parity_seq_lens=lambda c: [c.num_tokens],
    small=dict(image_size=64, patch_size=8, hidden=64, num_heads=4, num_layers=2),
    default_seq_len=lambda c: c.num_tokens,
))
