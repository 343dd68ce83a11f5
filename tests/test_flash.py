"""FLASH: mixed chunk attention against its explicit per-token sums (non-causal and causal), independence from the
padding to whole chunks, RoPE, the GAU's shapes, and the config and length rules."""
import math

import pytest
import torch
import torch.nn.functional as F

from attn_export.errors import UserError
from conftest import small_config
from models.common import t5_relative_buckets
from models.flash import T5_BUCKETS, T5_MAX_DISTANCE, FlashLayer, Rotary, mixed_chunk_attention

CHUNK = 16


def _layer(causal: bool):
    _, config = small_config("flash")
    config.causal, config.group_size = causal, CHUNK
    layer = FlashLayer(config, Rotary(config.rotary_dim, config.max_seq_len)).eval()
    with torch.no_grad():  # offsets and scales of order one, a bias that does not drown Q K^T / C
        layer.gamma.normal_()
        layer.beta.normal_()
        layer.relative_bias.weight.normal_(std=0.05)
        # centre relu's input on zero, so that the pairs it cuts and the pairs it keeps both take part
        _, _, quad_q, quad_k, _, _ = layer.gau_inputs(torch.randn(2, 4 * CHUNK, config.hidden))
        centre = (quad_q @ quad_k.transpose(-1, -2)).mean() / CHUNK
        layer.relative_bias.weight.sub_(centre / math.sqrt(config.query_key_dim))
    return layer, config


def _explicit_mca(quad_q, quad_k, lin_q, lin_k, v, relative_bias, causal, n_real):
    """Per-token sums, one (query i, key j) pair at a time: relu^2 over keys of i's own chunk (j <= i when causal)
    plus the global linear term over all real keys / N (non-causal) or keys of earlier chunks / C (causal).
    Rows from n_real on are padding: their keys may hold anything, their values are zero."""
    s, n = quad_q.shape[-1], v.shape[1]
    out = torch.zeros_like(v)
    for i in range(n_real):
        for j in range(n):
            same_chunk = i // CHUNK == j // CHUNK
            if same_chunk and (not causal or j <= i):
                bucket = t5_relative_buckets(torch.tensor(j - i), bidirectional=not causal, num_buckets=T5_BUCKETS,
                                             max_distance=T5_MAX_DISTANCE)
                bias = relative_bias[bucket, 0] * math.sqrt(s)
                a = torch.relu((quad_q[:, i] * quad_k[:, j]).sum(-1) / CHUNK + bias) ** 2
                out[:, i] += a[:, None] * v[:, j]
            if not causal:
                out[:, i] += (lin_q[:, i] * lin_k[:, j]).sum(-1, keepdim=True) / n_real * v[:, j]
            elif j // CHUNK < i // CHUNK:
                out[:, i] += (lin_q[:, i] * lin_k[:, j]).sum(-1, keepdim=True) / CHUNK * v[:, j]
    return out[:, :n_real]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [CHUNK * 3, CHUNK * 3 - 5])
def test_layer_equals_the_explicit_quadratic_form(causal, n):
    layer, config = _layer(causal)
    x = torch.randn(2, n, config.hidden)
    u, v, quad_q, quad_k, lin_q, lin_k = layer.gau_inputs(x)
    o = _explicit_mca(quad_q, quad_k, lin_q, lin_k, v, layer.relative_bias.weight, causal, n)
    torch.testing.assert_close(layer(x), layer.to_out(u * o) + x, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_result_is_independent_of_the_padding_to_whole_chunks(causal):
    """N = 3C - 5 equals the computation over 3C tokens whose last 5 have arbitrary Q/K and zero V, restricted
    to the real tokens (with the non-causal global term still divided by the real N)."""
    layer, config = _layer(causal)
    n, pad = 3 * CHUNK - 5, 5
    u, v, *qk = layer.gau_inputs(torch.randn(2, n, config.hidden))
    got = mixed_chunk_attention(*qk, v, layer.local_bias(), causal)
    garbage_qk = [torch.cat([t, 10 * torch.randn(2, pad, t.shape[-1])], 1) for t in qk]
    padded = _explicit_mca(*garbage_qk, F.pad(v, (0, 0, 0, pad)), layer.relative_bias.weight, causal, n)
    torch.testing.assert_close(got, padded, atol=1e-5, rtol=1e-4)


def test_causal_model_does_not_read_the_future():
    entry, config = small_config("flash")
    config.causal = True
    model = entry.build(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 80))
    n = 45  # a padded chunk boundary: the short run pads where the long run has real tokens
    torch.testing.assert_close(model(ids[:, :n]), model(ids)[:, :n], atol=1e-5, rtol=1e-4)


def test_rotary_turns_each_pair_by_position_times_its_frequency():
    dim, n = 8, 12
    rotary = Rotary(dim, max_seq_len=64)
    x = torch.randn(2, n, dim + 4)
    y = rotary(x)
    torch.testing.assert_close(y[..., dim:], x[..., dim:], atol=0, rtol=0)
    for p in range(n):
        for k in range(dim // 2):
            theta = p * 10000 ** (-2 * k / dim)
            x0, x1 = x[:, p, 2 * k], x[:, p, 2 * k + 1]
            torch.testing.assert_close(y[:, p, 2 * k], x0 * math.cos(theta) - x1 * math.sin(theta))
            torch.testing.assert_close(y[:, p, 2 * k + 1], x0 * math.sin(theta) + x1 * math.cos(theta))


@pytest.mark.parametrize("norm", ["scalenorm", "layernorm"])
def test_gau_shapes_and_one_shared_z_for_the_four_offset_scales(norm):
    _, config = small_config("flash")
    config.norm = norm
    layer = FlashLayer(config, Rotary(config.rotary_dim, config.max_seq_len)).eval()
    b, n, d, e, s = 2, 37, config.hidden, config.expansion * config.hidden, config.query_key_dim
    x = torch.randn(b, n, d)
    u, v, quad_q, quad_k, lin_q, lin_k = layer.gau_inputs(x)
    assert u.shape == v.shape == (b, n, e)
    assert quad_q.shape == quad_k.shape == lin_q.shape == lin_k.shape == (b, n, s)
    assert layer(x).shape == (b, n, d)
    if norm == "scalenorm":
        x_hat = x / (x.norm(dim=-1, keepdim=True) / math.sqrt(d))
    else:
        x_hat = F.layer_norm(x, (d,), layer.norm.weight, layer.norm.bias)
    z = F.silu(x_hat @ layer.to_qk.weight.t() + layer.to_qk.bias)
    for row, t in enumerate((quad_q, lin_q, quad_k, lin_k)):
        torch.testing.assert_close(t, layer.rotary(z * layer.gamma[row] + layer.beta[row]), atol=1e-5, rtol=1e-5)


def test_sequence_length_rule():
    entry, config = small_config("flash")
    entry.check_seq_len(config, 1)
    entry.check_seq_len(config, config.group_size + 3)
    for bad in (0, config.max_seq_len + 1):
        with pytest.raises(UserError, match="must be in"):
            entry.check_seq_len(config, bad)


@pytest.mark.parametrize("overrides,field", [
    ({"group_size": 0}, "group_size"),
    ({"rotary_dim": 7}, "rotary_dim"),
    ({"rotary_dim": 64, "query_key_dim": 32}, "rotary_dim"),
    ({"norm": "batchnorm"}, "norm"),
])
def test_config_out_of_range_is_a_user_error(overrides, field):
    entry, _ = small_config("flash")
    with pytest.raises(UserError, match=field):
        entry.make_config(overrides)
