"""Transformer-MGK: the softmax form against the Gaussian-mixture formula and against its rewrite as ordinary softmax
attention over 2N augmented keys, the linear form against its direct formula, the causal forms, switched-off
mixture components, and the config."""
import math

import pytest
import torch

from attn_export.errors import UserError
from conftest import small_config
from models.common import merge_heads
from models.mgk import MGKAttention

PI = [[0.3, 0.9], [0.6, 0.2]]  # [component r, head h]: distinct per head and component


def _attention(pi=PI, **overrides):
    entry, _ = small_config("mgk")
    config = entry.make_config({**entry.small, **overrides})
    attention = MGKAttention(config, layer_index=0).double().eval()
    with torch.no_grad():
        attention.pi.copy_(torch.tensor(pi, dtype=torch.float64))
    return attention, config


def _coefficients(config):
    """a_r = 1 / (2 sigma_r^2) with sigma_r^2 = sigma_sq_scale_r * sqrt(D), from the config."""
    sqrt_d = math.sqrt(config.hidden // config.num_heads)
    return [1 / (2 * s * sqrt_d) for s in (config.sigma_sq_scale_0, config.sigma_sq_scale_1)]


def _inputs(attention, config, n, seed=0):
    x = torch.randn(2, n, config.hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        return x, *attention.heads(x)


def _phi(x):
    """elu(x) + 1 written out, normalised over features."""
    x = torch.where(x > 0, x + 1, torch.exp(x))
    return x / x.sum(-1, keepdim=True)


@pytest.mark.parametrize("keys", ["two_projections", "shifted_means"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sigma_sq_scale_1", [1.0, 1 / 3])  # LRA and LM variances
def test_softmax_form_equals_the_gaussian_mixture_formula(keys, causal, sigma_sq_scale_1):
    attention, config = _attention(keys=keys, causal=causal, sigma_sq_scale_1=sigma_sq_scale_1)
    a, pi = _coefficients(config), torch.tensor(PI, dtype=torch.float64)
    n = 9
    x, q, (k1, k2), v = _inputs(attention, config, n)
    expected = torch.zeros_like(v)
    for i in range(n):
        weights = torch.zeros(*q.shape[:2], n, dtype=torch.float64)  # [B, H, j]
        for j in range(i + 1 if causal else n):
            for r, k in enumerate((k1, k2)):
                distance = ((q[:, :, i] - k[:, :, j]) ** 2).sum(-1)
                weights[:, :, j] += pi[r] * torch.exp(-a[r] * distance)
        expected[:, :, i] = (weights[..., None] * v).sum(2) / weights.sum(-1)[..., None]
    with torch.no_grad():
        torch.testing.assert_close(attention(x), attention.out(merge_heads(expected)), atol=1e-10, rtol=1e-10)


def test_softmax_form_equals_ordinary_softmax_over_2n_augmented_keys():
    attention, config = _attention(sigma_sq_scale_1=1 / 3)  # unequal variances: the |q|^2 slot matters
    a, pi = _coefficients(config), torch.tensor(PI, dtype=torch.float64)
    x, q, keys, v = _inputs(attention, config, 20)
    q_aug = torch.cat([q, torch.ones_like(q[..., :1]), (q * q).sum(-1, keepdim=True)], -1)  # [q, 1, |q|^2]
    k_aug = torch.cat([torch.cat([2 * a[r] * k,
                                  pi[r].log()[:, None, None] - a[r] * (k * k).sum(-1, keepdim=True),
                                  torch.full_like(k[..., :1], -a[r])], -1)
                       for r, k in enumerate(keys)], 2)  # [2a_r k, log pi_r - a_r |k|^2, -a_r] for 2N keys
    assert k_aug.shape[-2:] == (2 * 20, q.shape[-1] + 2)
    expected = torch.softmax(q_aug @ k_aug.transpose(-1, -2), -1) @ torch.cat([v, v], 2)  # scale 1
    with torch.no_grad():
        torch.testing.assert_close(attention(x), attention.out(merge_heads(expected)), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("keys", ["two_projections", "shifted_means"])
def test_linear_form_equals_its_direct_formula(keys):
    attention, config = _attention(keys=keys, attention="linear")
    pi = torch.tensor(PI, dtype=torch.float64)
    n = 9
    x, q, (k1, k2), v = _inputs(attention, config, n)
    phi_q = _phi(q)
    phi_k = pi[0][:, None, None] * _phi(k1) + pi[1][:, None, None] * _phi(k2)
    expected = torch.zeros_like(v)
    for i in range(n):
        num = sum((phi_q[:, :, i] * phi_k[:, :, j]).sum(-1)[..., None] * v[:, :, j] for j in range(n))
        den = sum((phi_q[:, :, i] * phi_k[:, :, j]).sum(-1)[..., None] for j in range(n))
        expected[:, :, i] = num / den
    with torch.no_grad():
        torch.testing.assert_close(attention(x), attention.out(merge_heads(expected)), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("n", [1, 64, 150])  # one token, one full chunk, chunks with a padded tail
def test_causal_linear_form_equals_the_masked_quadratic_form(n):
    attention, config = _attention(attention="linear", causal=True)
    pi = torch.tensor(PI, dtype=torch.float64)
    x, q, (k1, k2), v = _inputs(attention, config, n)
    phi_k = pi[0][:, None, None] * _phi(k1) + pi[1][:, None, None] * _phi(k2)
    scores = (_phi(q) @ phi_k.transpose(-1, -2)).tril()
    expected = (scores @ v) / scores.sum(-1, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(attention(x), attention.out(merge_heads(expected)), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("form", ["softmax", "linear"])
def test_a_switched_off_component_leaves_one_gaussian_and_a_dead_head_outputs_zeros(form):
    # head 0 keeps only component 0; head 1 has pi = (0, 0)
    attention, config = _attention(pi=[[0.7, 0.0], [0.0, 0.0]], attention=form)
    a = _coefficients(config)
    x, q, (k1, _), v = _inputs(attention, config, 12)
    if form == "softmax":
        distance = (q * q).sum(-1)[..., None] - 2 * q @ k1.transpose(-1, -2) + (k1 * k1).sum(-1)[:, :, None]
        single = torch.softmax(-a[0] * distance, -1) @ v
    else:
        scores = _phi(q) @ _phi(k1).transpose(-1, -2)
        single = (scores @ v) / scores.sum(-1, keepdim=True)
    expected = torch.cat([single[:, :1], torch.zeros_like(single[:, 1:])], 1)
    with torch.no_grad():
        out = attention(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, attention.out(merge_heads(expected)), atol=1e-10, rtol=1e-10)


def test_shifted_means_share_one_key_projection_and_start_with_mu_0_at_zero():
    attention, config = _attention(keys="shifted_means")
    assert not hasattr(attention, "key_2")
    assert attention.mu.shape == (2, config.num_heads, config.hidden // config.num_heads)
    assert torch.equal(attention.mu[0], torch.zeros_like(attention.mu[0])) and attention.mu[1].abs().sum() > 0
    _, _, (k1, k2), _ = _inputs(attention, config, 5)
    torch.testing.assert_close(k1 - k2, (attention.mu[1] - attention.mu[0])[:, None].expand_as(k1))
    again, _ = _attention(keys="shifted_means")
    assert torch.equal(attention.mu, again.mu), "the means are drawn from the seeded generator"


def test_sequence_length_rule():
    entry, config = small_config("mgk")
    entry.check_seq_len(config, 1)
    entry.check_seq_len(config, config.max_seq_len)
    with pytest.raises(UserError, match="must be in"):
        entry.check_seq_len(config, config.max_seq_len + 1)


@pytest.mark.parametrize("overrides, field", [
    ({"keys": "three_keys"}, "keys"),
    ({"attention": "performer"}, "attention"),
    ({"sigma_sq_scale_1": 0.0}, "sigma_sq_scale_1"),
    ({"sigma_sq_scale_0": -1.0}, "sigma_sq_scale_0"),
    ({"num_heads": -2}, "num_heads"),
    ({"hidden": 66, "num_heads": 4}, "num_heads"),
])
def test_config_out_of_range_is_a_user_error(overrides, field):
    entry, _ = small_config("mgk")
    with pytest.raises(UserError, match=field):
        entry.make_config(overrides)


def test_mixture_weights_are_clamped_to_0_1():
    attention, config = _attention(pi=[[1.7, 0.5], [-0.4, 0.5]])
    x = torch.randn(1, 10, config.hidden, dtype=torch.float64)
    with torch.no_grad():
        out = attention(x)
        attention.pi.copy_(torch.tensor([[1.0, 0.5], [0.0, 0.5]], dtype=torch.float64))
        torch.testing.assert_close(attention(x), out, atol=1e-12, rtol=0)
