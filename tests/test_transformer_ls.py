"""Transformer-LS: long-short attention against dense attention over (window keys + projected keys) under an
explicit per-query mask, padded keys, DualLN, the projection softmax over the sequence axis, config and lengths."""
import math

import pytest
import torch

from attn_export.errors import UserError
from conftest import small_config
from models.transformer_ls import LongShortAttention


def _attention():
    _, config = small_config("transformer-ls")
    attention = LongShortAttention(config).eval()
    with torch.no_grad():  # LN gains and shifts away from (1, 0), so that swapping the two LNs shows
        for ln in (attention.ln_short, attention.ln_long):
            ln.weight.normal_()
            ln.bias.normal_()
    return attention, config


def _layer_norm(t, ln):
    """LN over the whole last axis (the merged d = H * D), written out."""
    mean = t.mean(-1, keepdim=True)
    var = ((t - mean) ** 2).mean(-1, keepdim=True)
    return (t - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _heads(t, h):
    """[B, M, d] -> [B, H, M, D]"""
    return t.reshape(t.shape[0], t.shape[1], h, -1).permute(0, 2, 1, 3)


def _merge(t):
    """[B, H, M, D] -> [B, M, H * D]"""
    return t.permute(0, 2, 1, 3).reshape(t.shape[0], t.shape[2], -1)


def _explicit_projection(attention, x):
    """P[b, h, l, i] = exp(s[b, i, h r + l]) / sum_j exp(s[b, j, h r + l]), s = X W_p + b_p: over the tokens."""
    h, r = attention.num_heads, attention.rank
    s = attention.projection(x)
    p = torch.zeros(x.shape[0], h, r, x.shape[1])
    for head in range(h):
        for landmark in range(r):
            column = s[:, :, head * r + landmark]
            p[:, head, landmark] = torch.exp(column) / torch.exp(column).sum(1, keepdim=True)
    return p


def _explicit_keys(attention, x):
    """Window K, V = LN_S(X W); landmarks K_bar, V_bar = LN_L(P K), LN_L(P V), all [B, H, ., D]."""
    h = attention.num_heads
    k, v = (_heads(_layer_norm(linear(x), attention.ln_short), h) for linear in (attention.key, attention.value))
    p = _explicit_projection(attention, x)
    k_bar, v_bar = (_heads(_layer_norm(_merge(p @ t), attention.ln_long), h) for t in (k, v))
    return k, v, k_bar, v_bar


def _window_mask(n, w):
    """[N, N] bool: query i sees key j when j lies in [start - e, end + e) of i's segment, e = max(w // 2, 1)."""
    e = max(w // 2, 1)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        start = i // w * w
        for j in range(n):
            mask[i, j] = start - e <= j < start + w + e
    return mask


@pytest.mark.parametrize("n", [8, 40, 64])
def test_equals_dense_attention_over_window_and_projected_keys(n):
    attention, config = _attention()
    x = torch.randn(2, n, config.hidden)
    q = _heads(attention.query(x), attention.num_heads)
    k, v, k_bar, v_bar = _explicit_keys(attention, x)
    window_scores = (q @ k.transpose(-1, -2)).masked_fill(~_window_mask(n, config.window_size), float("-inf"))
    scores = torch.cat([q @ k_bar.transpose(-1, -2), window_scores], -1) / math.sqrt(q.shape[-1])
    weights = torch.softmax(scores, -1)
    out = weights @ torch.cat([v_bar, v], 2)
    torch.testing.assert_close(attention(x), attention.out(_merge(out)), atol=1e-5, rtol=1e-4)


def test_padded_window_keys_never_get_weight():
    attention, config = _attention()
    n, w, e = 32, config.window_size, attention.halo
    x = torch.randn(2, n, config.hidden)
    q, k_bar, v_bar, k_win, v_win, real = attention.segments(x)
    g = n // w
    expected = torch.tensor([[0 <= s * w + t - e < n for t in range(w + 2 * e)] for s in range(g)])
    assert torch.equal(real[:, 0], expected)
    assert not expected[0, :e].any() and not expected[-1, -e:].any() and expected[1:-1].all()
    assert torch.equal(k_win[..., ~expected, :], torch.zeros_like(k_win[..., ~expected, :]))
    out = attention.attend(q, k_bar, v_bar, k_win, v_win, real)
    garbage = ~real[:, 0, :, None]
    k_junk, v_junk = (t + 100 * garbage * torch.randn_like(t) for t in (k_win, v_win))
    torch.testing.assert_close(attention.attend(q, k_bar, v_bar, k_junk, v_junk, real), out, atol=0, rtol=0)


def test_dual_layer_norm_short_on_window_keys_long_on_projected_keys():
    attention, config = _attention()
    n, w, e = 24, config.window_size, attention.halo
    x = torch.randn(2, n, config.hidden)
    _, k_bar, v_bar, k_win, v_win, _ = attention.segments(x)
    k, v, k_bar_expected, v_bar_expected = _explicit_keys(attention, x)
    torch.testing.assert_close(k_bar[:, :, 0], k_bar_expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_bar[:, :, 0], v_bar_expected, atol=1e-5, rtol=1e-5)
    for s in range(n // w):
        for t in range(w + 2 * e):
            position = s * w + t - e
            if 0 <= position < n:
                torch.testing.assert_close(k_win[:, :, s, t], k[:, :, position])
                torch.testing.assert_close(v_win[:, :, s, t], v[:, :, position])
    # each LN normalises over the merged d (all heads together), not per head
    for t, ln in ((_merge(k_bar[:, :, 0]), attention.ln_long), (_merge(k_win[:, :, 1]), attention.ln_short)):
        unit = (t - ln.bias) / ln.weight
        torch.testing.assert_close(unit.mean(-1), torch.zeros(unit.shape[:-1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(unit.var(-1, unbiased=False), torch.ones(unit.shape[:-1]), atol=1e-3, rtol=0)


def test_projection_softmax_runs_over_the_sequence_axis():
    attention, config = _attention()
    x = torch.randn(2, 24, config.hidden)
    p = attention.dynamic_projection(x)
    assert p.shape == (2, config.num_heads, config.rank, 24)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, config.num_heads, config.rank))
    torch.testing.assert_close(p, _explicit_projection(attention, x), atol=1e-6, rtol=1e-5)


def test_sequence_length_rule():
    entry, config = small_config("transformer-ls")
    w = config.window_size
    entry.check_seq_len(config, w)
    entry.check_seq_len(config, 7 * w)
    with pytest.raises(UserError, match="multiple of window_size"):
        entry.check_seq_len(config, 7 * w + 1)
    with pytest.raises(UserError, match="must be in"):
        entry.check_seq_len(config, config.max_seq_len + w)


@pytest.mark.parametrize("overrides,field", [
    ({"rank": 0}, "rank"),
    ({"window_size": -8}, "window_size"),
    ({"hidden": 66, "num_heads": 4}, "num_heads"),
    ({"max_seq_len": 100, "window_size": 8}, "window_size"),
])
def test_config_out_of_range_is_a_user_error(overrides, field):
    entry, _ = small_config("transformer-ls")
    with pytest.raises(UserError, match=field):
        entry.make_config(overrides)
