"""Performer FAVOR+: orthogonal features, convergence to softmax attention, and the causal form."""
import math

import torch

from conftest import small_config
from models.performer import (PerformerAttention, causal_linear_attention, favor_features,
                              orthogonal_random_features)


def test_feature_blocks_are_orthogonal():
    w = orthogonal_random_features(16, 8, torch.Generator().manual_seed(0))
    for block in (w[:8], w[8:]):
        unit = block / block.norm(dim=1, keepdim=True)
        torch.testing.assert_close(unit @ unit.t(), torch.eye(8), atol=1e-5, rtol=0)


def _favor_error(num_features: int, seeds=range(8)) -> float:
    g = torch.Generator().manual_seed(123)
    d, n = 16, 64
    q, k, v = (torch.randn(1, 1, n, d, generator=g) * 0.5 for _ in range(3))
    exact = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
    errors = []
    for seed in seeds:
        w = orthogonal_random_features(num_features, d, torch.Generator().manual_seed(seed))
        phi_q = favor_features(q, w, 0.0, None)
        phi_k = favor_features(k, w, 0.0, (w * w).sum(-1).max() / 2)
        approx = (phi_q @ (phi_k.transpose(-1, -2) @ v)) / (phi_q @ phi_k.sum(-2).unsqueeze(-1))
        errors.append((approx - exact).abs().mean().item())
    return sum(errors) / len(errors)


def test_error_against_softmax_attention_falls_as_features_grow():
    errors = [_favor_error(m) for m in (8, 32, 128, 512)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 4


def test_causal_chunked_form_equals_masked_quadratic_form():
    g = torch.Generator().manual_seed(0)
    for n in (1, 63, 64, 150):
        phi_q, phi_k = (torch.rand(2, 3, n, 16, generator=g) for _ in range(2))
        v = torch.randn(2, 3, n, 8, generator=g)
        a = (phi_q @ phi_k.transpose(-1, -2)).tril()
        expected = (a @ v) / a.sum(-1, keepdim=True)
        torch.testing.assert_close(causal_linear_attention(phi_q, phi_k, v), expected, atol=1e-5, rtol=1e-4)


def test_causal_layer_does_not_read_the_future():
    _, config = small_config("performer")
    config.causal = True
    attention = PerformerAttention(config, 0).eval()
    x = torch.randn(1, 100, config.hidden)
    y = x.clone()
    y[:, 70:] = torch.randn(1, 30, config.hidden)
    torch.testing.assert_close(attention(x)[:, :70], attention(y)[:, :70])


def test_features_are_frozen_buffers():
    _, config = small_config("performer")
    attention = PerformerAttention(config, 0)
    assert "features" in dict(attention.named_buffers())
    x = torch.randn(1, 10, config.hidden)
    torch.testing.assert_close(attention(x), attention(x))
