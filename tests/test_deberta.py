"""DeBERTa's disentangled attention: the log-bucket function, the relative index, and equality with an explicit
per-(i, j) sum of the c2c, c2p and p2c terms at scale 1/sqrt(3D)."""
import math

import numpy as np
import pytest
import torch

from attn_export.errors import UserError
from conftest import small_config
from models.common import merge_heads, split_heads
from models.deberta import DisentangledAttention, log_bucket, relative_index


def _scalar_bucket(r: int, m: int, max_position: int) -> int:
    """The formula, one integer at a time, as transformers' make_log_bucket_position computes it: no clamp of r,
    exact up to mid, logarithmic beyond, in float32 steps (logs correctly rounded)."""
    mid = m // 2
    if abs(r) <= mid:
        return r
    f32 = np.float32
    ratio = f32(math.log(f32(abs(r)) / f32(mid))) / f32(math.log(f32((max_position - 1) / mid)))
    magnitude = mid + int(math.ceil(ratio * f32(mid - 1)))
    return magnitude if r > 0 else -magnitude


@pytest.mark.parametrize("m, max_position", [(256, 512), (32, 256), (32, 64), (8, 16), (2, 8)])
def test_bucket_matches_the_scalar_formula(m, max_position):
    relative = torch.arange(-max_position - 40, max_position + 40)
    expected = torch.tensor([_scalar_bucket(int(r), m, max_position) for r in relative])
    assert torch.equal(log_bucket(relative, m, max_position), expected)


def test_bucket_is_exact_within_mid_logarithmic_beyond_odd_and_within_m_minus_1():
    m, max_position, mid = 256, 512, 128
    relative = torch.arange(-2000, 2001)
    bucket = log_bucket(relative, m, max_position)
    inside = relative.abs() <= mid
    assert torch.equal(bucket[inside], relative[inside])
    assert torch.equal(bucket, -bucket.flip(0)), "bucket(-r) = -bucket(r)"
    assert torch.equal(bucket.sign(), relative.sign())
    positive = bucket[relative > mid]
    assert (positive > mid).all() and (positive[1:] >= positive[:-1]).all(), "increasing beyond mid"
    assert positive[0] == mid + 1 and (positive <= relative[relative > mid]).all(), "compressed beyond mid"
    within = relative.abs() <= max_position - 1
    assert bucket[within].max() == m - 1 and bucket[within].min() == -(m - 1)
    # past L - 1 transformers does not clamp: the buckets keep growing, and the clamp of delta reads the edge rows
    assert (bucket[relative > max_position - 1] > m - 1).all()
    assert len(bucket[within].unique()) == 2 * m - 1


def test_relative_index_is_the_shifted_clamped_bucket_of_i_minus_j():
    m, max_position, n = 8, 16, 40
    delta = relative_index(n, m, max_position)
    for i in range(n):
        for j in range(n):
            assert delta[i, j] == min(max(_scalar_bucket(i - j, m, max_position) + m, 0), 2 * m - 1)
    assert delta.min() == 0 and delta.max() == 2 * m - 1  # row 0 past -L, as transformers reads it
    assert torch.equal(relative_index(n // 2, m, max_position), delta[: n // 2, : n // 2]), "a slice serves shorter N"


def _attention():
    entry, _ = small_config("deberta")
    # small buckets so that a short sequence reaches the log buckets (|i-j| > 4) and the clamp (|i-j| > 15)
    config = entry.make_config({**entry.small, "position_buckets": 8, "max_relative_positions": 16})
    return DisentangledAttention(config).double().eval(), config


def test_attention_equals_explicit_loop_of_c2c_c2p_p2c():
    attention, config = _attention()
    m, n, heads = config.position_buckets, 24, config.num_heads
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, n, config.hidden, generator=g, dtype=torch.float64)
    rel_embeddings = torch.randn(2 * m, config.hidden, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = attention(x, rel_embeddings, relative_index(n, m, config.max_relative_positions))
        q, k, v = (split_heads(p(x), heads) for p in (attention.query, attention.key, attention.value))
        k_r = split_heads(attention.key(rel_embeddings)[None], heads)[0]  # [H, 2m, D]: share_att_key
        q_r = split_heads(attention.query(rel_embeddings)[None], heads)[0]
    d = q.shape[-1]
    scores = torch.zeros(2, heads, n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            delta = min(max(_scalar_bucket(i - j, m, config.max_relative_positions) + m, 0), 2 * m - 1)
            c2c = (q[:, :, i] * k[:, :, j]).sum(-1)
            c2p = (q[:, :, i] * k_r[:, delta]).sum(-1)
            p2c = (k[:, :, j] * q_r[:, delta]).sum(-1)  # the official code's index: delta(i, j), not delta(j, i)
            scores[:, :, i, j] = (c2c + c2p + p2c) / math.sqrt(3 * d)
    expected = attention.out(merge_heads(torch.softmax(scores, -1) @ v))
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_scale_is_one_over_sqrt_3d():
    attention, config = _attention()
    n, m = 12, config.position_buckets
    with torch.no_grad():  # zero relative rows and projection biases: K_r = Q_r = 0, only c2c is left
        attention.query.bias.zero_()
        attention.key.bias.zero_()
        x = torch.randn(1, n, config.hidden, dtype=torch.float64)
        out = attention(x, torch.zeros(2 * m, config.hidden, dtype=torch.float64),
                        relative_index(n, m, config.max_relative_positions))
        q, k, v = (split_heads(p(x), config.num_heads) for p in (attention.query, attention.key, attention.value))
        d = q.shape[-1]
        for scale, matches in ((1 / math.sqrt(3 * d), True), (1 / math.sqrt(d), False)):
            expected = attention.out(merge_heads(torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v))
            assert torch.allclose(out, expected, atol=1e-12, rtol=1e-12) == matches


def test_every_layer_reads_one_normalised_table_and_the_index_sliced_to_n():
    entry, config = small_config("deberta")
    model = entry.build(config).eval()
    seen = []
    for layer in model.layers:
        layer.attention.register_forward_pre_hook(lambda module, args: seen.append(args[1:]))
    n = 50
    with torch.no_grad():
        model(**entry.example_inputs(config, 1, n))
        table = model.rel_norm(model.rel_embeddings.weight)  # LN(P)
    assert len(seen) == config.num_layers and table.shape == (2 * config.position_buckets, config.hidden)
    for rel_embeddings, delta in seen:
        torch.testing.assert_close(rel_embeddings, table, atol=0, rtol=0)
        assert torch.equal(delta, relative_index(n, config.position_buckets, config.max_relative_positions))


def test_sequence_length_rule():
    entry, config = small_config("deberta")
    entry.check_seq_len(config, 1)
    entry.check_seq_len(config, config.max_seq_len)
    with pytest.raises(UserError, match="must be in"):
        entry.check_seq_len(config, config.max_seq_len + 1)


@pytest.mark.parametrize("overrides, field", [
    ({"position_buckets": 1}, "position_buckets"),
    ({"position_buckets": 256, "max_relative_positions": 129}, "max_relative_positions"),
    ({"max_relative_positions": 0}, "max_relative_positions"),
    ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
    ({"num_heads": -2}, "num_heads"),
    ({"hidden": 66, "num_heads": 4}, "num_heads"),
])
def test_config_out_of_range_is_a_user_error(overrides, field):
    entry, _ = small_config("deberta")
    with pytest.raises(UserError, match=field):
        entry.make_config(overrides)
