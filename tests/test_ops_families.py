"""The dense, disentangled, mixture-of-experts and long-convolution ops: references pinned to independent slow
formulations, decompositions (function bodies run on onnxruntime) equal to the references."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from attn_export.ops import DENSE_ATTENTION as DENSE, DISENTANGLED_ATTENTION as DIS, LONG_CONVOLUTION as CONV
from attn_export.ops import MIXTURE_OF_EXPERTS as MOE
from attn_export.ops.disentangled_attention import log_bucket, relative_index
from conftest import run_single_op


def _heads(x, h):
    return x.reshape(x.shape[0], x.shape[1], h, -1).transpose(1, 2)


# ------------------------------------------------------------------------------------------------ dense
@settings(max_examples=10, deadline=None)
@given(heads=st.integers(1, 3), d=st.sampled_from([4, 8]), dv=st.sampled_from([4, 6]), nq=st.integers(1, 9),
       extra_keys=st.integers(0, 5), causal=st.integers(0, 1), bias=st.sampled_from(["none", "full", "key"]),
       seed=st.integers(0, 99))
def test_dense_decomposition_matches_reference(heads, d, dv, nq, extra_keys, causal, bias, seed):
    g = torch.Generator().manual_seed(seed)
    nk = nq + extra_keys
    q, k = torch.randn(2, nq, heads * d, generator=g), torch.randn(2, nk, heads * d, generator=g)
    v = torch.randn(2, nk, heads * dv, generator=g)
    arrays = [q, k, v]
    if bias == "full":
        arrays.append(torch.randn(2, heads, nq, nk, generator=g))
    elif bias == "key":  # a padding mask: some keys hidden from everyone
        arrays.append(torch.where(torch.rand(1, 1, 1, nk, generator=g) < 0.3, float("-inf"), 0.0))
    attrs = dict(num_heads=heads, causal=causal)
    expected = DENSE.reference(*arrays, **attrs).numpy()
    got = run_single_op(DENSE, attrs, [a.numpy() for a in arrays])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_dense_equals_sdpa_and_masked_rows_are_zero():
    q, k, v = (torch.randn(2, 7, 2 * 8) for _ in range(3))
    bias = torch.zeros(1, 1, 7, 7)
    bias[..., 3, :] = float("-inf")  # query 3 sees nothing
    out = DENSE.reference(q, k, v, bias, num_heads=2, causal=1)
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    expected = torch.nn.functional.scaled_dot_product_attention(_heads(q, 2), _heads(k, 2), _heads(v, 2),
                                                                attn_mask=mask)
    expected = expected.transpose(1, 2).reshape(2, 7, 16)
    rows = [i for i in range(7) if i != 3]
    torch.testing.assert_close(out[:, rows], expected[:, rows], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[:, 3], torch.zeros_like(out[:, 3]))


# ------------------------------------------------------------------------------------------------ disentangled
def _bucket_scalar(r: int, span: int, max_position: int) -> int:
    mid = span // 2
    r = max(-(max_position - 1), min(max_position - 1, r))
    if abs(r) <= mid:
        return r
    return int(math.copysign(mid + math.ceil(math.log(abs(r) / mid) / math.log((max_position - 1) / mid) * (mid - 1)),
                             r))


def test_log_bucket_matches_the_scalar_formula():
    r = torch.arange(-700, 701)  # offsets beyond max_position are clamped first
    got = log_bucket(r, 256, 512)
    assert got.tolist() == [_bucket_scalar(x, 256, 512) for x in r.tolist()]
    assert got.abs().max() == 255 and torch.equal(got[700 - 128:700 + 129], r[700 - 128:700 + 129])


def test_disentangled_equals_an_explicit_loop():
    heads, d, n, span = 2, 4, 6, 3
    q, k, v = (torch.randn(1, n, heads * d) for _ in range(3))
    kr, qr = torch.randn(2 * span, heads * d), torch.randn(2 * span, heads * d)
    out = DIS.reference(q, k, v, kr, qr, num_heads=heads, span=span, max_position=0)
    qh, kh, vh = _heads(q, heads)[0], _heads(k, heads)[0], _heads(v, heads)[0]
    krh, qrh = kr.reshape(2 * span, heads, d), qr.reshape(2 * span, heads, d)
    expected = torch.zeros(heads, n, d)
    for h in range(heads):
        scores = torch.zeros(n, n)
        for i in range(n):
            for j in range(n):
                delta = min(max(i - j + span, 0), 2 * span - 1)
                scores[i, j] = (qh[h, i] @ kh[h, j] + qh[h, i] @ krh[delta, h] + kh[h, j] @ qrh[delta, h])
        expected[h] = torch.softmax(scores / math.sqrt(3 * d), -1) @ vh[h]
    torch.testing.assert_close(out[0], expected.transpose(0, 1).reshape(n, heads * d), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n,span,max_position", [(5, 4, 0), (40, 8, 32), (33, 16, 64), (50, 8, 16)])
def test_disentangled_decomposition_matches_reference(n, span, max_position):
    heads, d = 2, 8
    q, k, v = (torch.randn(2, n, heads * d) for _ in range(3))
    kr, qr = torch.randn(2 * span, heads * d), torch.randn(2 * span, heads * d)
    attrs = dict(num_heads=heads, span=span, max_position=max_position)
    expected = DIS.reference(q, k, v, kr, qr, **attrs).numpy()
    got = run_single_op(DIS, attrs, [t.numpy() for t in (q, k, v, kr, qr)])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert relative_index(n, n, span, max_position).max() <= 2 * span - 1


# ------------------------------------------------------------------------------------------------ MoE
def _moe_loop(x, router, w_in, w_out, capacity):
    """Token by token, in sequence order, per batch row: the Switch rule written plainly."""
    y = torch.zeros_like(x)
    for b in range(x.shape[0]):
        load = [0] * router.shape[1]
        for t in range(x.shape[1]):
            p = torch.softmax(x[b, t] @ router, -1)
            e = int(p.argmax())
            load[e] += 1
            if load[e] <= capacity:
                y[b, t] = p[e] * (torch.relu(x[b, t] @ w_in[e]) @ w_out[e])
    return y


@pytest.mark.parametrize("tokens,experts,capacity,factor", [(12, 4, 0, 1.0), (12, 3, 2, 1.0), (9, 4, 0, 0.5)])
def test_moe_reference_and_decomposition_follow_the_switch_rule(tokens, experts, capacity, factor):
    d, f = 6, 10
    x = torch.randn(2, tokens, d)
    router, w_in, w_out = torch.randn(d, experts), torch.randn(experts, d, f), torch.randn(experts, f, d)
    attrs = dict(capacity=capacity, capacity_factor=factor)
    cap = capacity or math.ceil(tokens * factor / experts)
    expected = _moe_loop(x, router, w_in, w_out, cap)
    got = MOE.reference(x, router, w_in, w_out, **attrs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got.abs().sum(-1) == 0).any(), "the case is chosen so that some token is dropped"
    onnx_out = run_single_op(MOE, attrs, [t.numpy() for t in (x, router, w_in, w_out)])
    np.testing.assert_allclose(onnx_out, expected.numpy(), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ long convolution
@pytest.mark.parametrize("n,reverse", [(1, False), (7, False), (7, True), (16, True)])
def test_long_convolution_equals_the_sum_and_its_decomposition(n, reverse):
    c, taps = 3, 20
    u, kernel, skip = torch.randn(2, n, c), torch.randn(c, taps), torch.randn(c)
    kernel_reverse = torch.randn(c, taps) if reverse else None
    expected = u * skip
    for t in range(n):
        for s in range(t + 1):
            expected[:, t] += kernel[:, t - s] * u[:, s]
        if reverse:
            for s in range(t + 1, n):
                expected[:, t] += kernel_reverse[:, s - t - 1] * u[:, s]
    args = [u, kernel, skip] + ([kernel_reverse] if reverse else [])
    torch.testing.assert_close(CONV.reference(*args), expected, atol=1e-5, rtol=1e-5)
    got = run_single_op(CONV, dict(channels=c), [t.numpy() for t in args])
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=1e-4)
