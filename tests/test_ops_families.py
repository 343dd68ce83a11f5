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


def _dense_bias(kind, b, heads, nq, nk, g):
    """Additive biases in every broadcast form, with fully masked rows where the form can express them."""
    if kind == "padding":  # [B, 1, 1, Nk]: batch row 1 sees no key at all
        bias = torch.where(torch.rand(b, 1, 1, nk, generator=g) < 0.4, float("-inf"), 0.0)
        bias[1] = float("-inf")
        return bias
    if kind == "rows":  # [1, H, Nq, Nk] with query 0 fully masked in head 0
        bias = torch.randn(1, heads, nq, nk, generator=g)
        bias[0, 0, 0] = float("-inf")
        return bias
    if kind == "query":  # [B, 1, Nq, Nk] query x key padding (DeBERTa's): padded queries see nothing
        keep = torch.rand(b, nq, generator=g) < 0.7
        keep_k = torch.rand(b, nk, generator=g) < 0.7
        keep_k[:, 0] = True
        pair = keep[:, :, None] & keep_k[:, None, :]
        return torch.where(pair, 0.0, float("-inf"))[:, None]
    raise ValueError(kind)


@settings(max_examples=12, deadline=None)
@given(heads=st.integers(1, 3), nq=st.integers(1, 7), extra_keys=st.integers(0, 4), causal=st.integers(0, 1),
       kind=st.sampled_from(["padding", "rows", "query"]), masked_rows=st.sampled_from(["zeros", "mean"]),
       seed=st.integers(0, 99))
def test_dense_broadcast_bias_and_masked_rows(heads, nq, extra_keys, causal, kind, masked_rows, seed):
    g = torch.Generator().manual_seed(seed)
    nk, d = nq + extra_keys, 4
    q, k, v = (torch.randn(2, n, heads * d, generator=g) for n in (nq, nk, nk))
    bias = _dense_bias(kind, 2, heads, nq, nk, g)
    attrs = dict(num_heads=heads, causal=causal, masked_rows=masked_rows)
    expected = DENSE.reference(q, k, v, bias, **attrs)
    # the same scores with the bias expanded to [B, H, Nq, Nk] give the same output: broadcasting is exact
    torch.testing.assert_close(expected, DENSE.reference(q, k, v, bias.expand(2, heads, nq, nk), **attrs))
    got = run_single_op(DENSE, attrs, [t.numpy() for t in (q, k, v, bias)])
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=1e-4)
    assert not np.isnan(got).any()


def test_dense_mean_rows_are_what_a_finite_masked_fill_computes():
    """masked_rows="mean" with -inf equals the original masked_fill(finfo.min) softmax on every row, fully masked
    rows included; "zeros" differs exactly there."""
    heads, d, n = 2, 8, 6
    q, k, v = (torch.randn(2, n, heads * d) for _ in range(3))
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    pair = keep[:, None, :, None] & keep[:, None, None, :]  # padded queries see nothing
    qh, kh, vh = _heads(q, heads), _heads(k, heads), _heads(v, heads)
    scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(d)
    original = torch.softmax(scores.masked_fill(~pair, torch.finfo(torch.float32).min), -1) @ vh
    original = original.transpose(1, 2).reshape(2, n, heads * d)
    bias = torch.where(pair, 0.0, float("-inf"))
    mean = DENSE.reference(q, k, v, bias, num_heads=heads, masked_rows="mean")
    torch.testing.assert_close(mean, original, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean[0, 4], v[0].mean(0))
    zeros = DENSE.reference(q, k, v, bias, num_heads=heads)
    assert torch.equal(zeros[0, 4:], torch.zeros_like(zeros[0, 4:]))
    torch.testing.assert_close(zeros[:, :4], mean[:, :4])


def test_a_finite_fill_is_not_minus_infinity():
    """An additive finfo.min mask is finite: a row with every key masked is uniform (what the original computes),
    in the reference and its decomposition alike; only -inf rows follow masked_rows."""
    q, k, v = (torch.randn(2, 5, 8) for _ in range(3))
    fill = torch.zeros(2, 1, 1, 5)
    fill[0] = torch.finfo(torch.float32).min
    out = DENSE.reference(q, k, v, fill)
    torch.testing.assert_close(out[0], v[0].mean(0).expand(5, 8))
    got = run_single_op(DENSE, {}, [t.numpy() for t in (q, k, v, fill)])
    np.testing.assert_allclose(got, out.numpy(), atol=1e-5, rtol=1e-4)


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


def test_unchecked_rows_are_nan_as_a_plain_softmax_makes_them():
    """masked_rows "none": the other rows as "zeros" gives them, the row that sees no key NaN, in the reference and
    its decomposition alike."""
    heads, n = 2, 6
    q, k, v = (torch.randn(1, n, heads * 4) for _ in range(3))
    bias = torch.zeros(1, 1, n, n)
    bias[..., 2, :] = float("-inf")
    tensors, attrs = [q, k, v, bias], dict(num_heads=heads)
    zeros = DENSE.reference(*tensors, **attrs, masked_rows="zeros").numpy()
    for got in (DENSE.reference(*tensors, **attrs, masked_rows="none").numpy(),
                run_single_op(DENSE, {**attrs, "masked_rows": "none"}, [t.numpy() for t in tensors])):
        assert np.isnan(got[:, 2]).all()
        rows = [i for i in range(n) if i != 2]
        np.testing.assert_allclose(got[:, rows], zeros[:, rows], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("heads", [1, 2])  # one head: a group's rows stack into one product per shared set
@settings(max_examples=8, deadline=None)
@given(groups=st.integers(1, 3), shared_rows=st.integers(1, 4), nq=st.integers(1, 5),
       causal=st.integers(0, 1), masked_rows=st.sampled_from(["zeros", "mean"]), seed=st.integers(0, 99))
def test_shared_keys_are_what_each_group_sees_first(heads, groups, shared_rows, nq, causal, masked_rows, seed):
    """Batch row b sees its group's shared set (b // (B / Bs)) ahead of its own keys: the same output as those keys
    copied into every row, in the reference and its decomposition; a row whose keys are all masked, shared ones
    included, follows masked_rows over all R + Nk values."""
    g = torch.Generator().manual_seed(seed)
    sets, d, nk = 2, 4, nq + 1
    rows = sets * groups
    q, k, v = (torch.randn(rows, n, heads * d, generator=g) for n in (nq, nk, nk))
    shared_k, shared_v = (torch.randn(sets, shared_rows, heads * d, generator=g) for _ in range(2))
    bias = torch.where(torch.rand(rows, 1, nq, shared_rows + nk, generator=g) < 0.3, float("-inf"), 0.0)
    bias[-1, :, 0] = float("-inf")  # the last row's first query sees no key at all
    attrs = dict(num_heads=heads, causal=causal, masked_rows=masked_rows)
    copied = [torch.cat([s[b // groups][None] for b in range(rows)]) for s in (shared_k, shared_v)]
    expected = DENSE.reference(q, torch.cat([copied[0], k], 1), torch.cat([copied[1], v], 1), bias, **attrs)
    torch.testing.assert_close(DENSE.reference(q, k, v, bias, shared_k, shared_v, **attrs), expected)
    got = run_single_op(DENSE, attrs, [t.numpy() for t in (q, k, v, bias, shared_k, shared_v)])
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=1e-4)
    if masked_rows == "mean":
        torch.testing.assert_close(expected[-1, 0], torch.cat([copied[1][-1], v[-1]]).mean(0))


def test_shared_keys_come_as_a_pair_after_a_bias_and_divide_the_batch():
    q = k = v = torch.randn(4, 3, 8)
    shared, bias = torch.randn(3, 2, 8), torch.zeros(1, 1, 1, 5)
    for pair, bias_given in (((shared[:2], None), bias), ((shared[:2], shared[:2]), None)):
        with pytest.raises(ValueError, match="together, after a bias"):
            DENSE.reference(q, k, v, bias_given, *pair)
    with pytest.raises(ValueError, match="does not divide"):
        DENSE.reference(q, k, v, bias, shared, shared)


def test_the_masked_row_guard_loads_in_onnxruntime_without_a_warning(capfd):
    """The guard's If reads the softmax from the outer graph: an outer Slice read there too made onnxruntime's
    optimiser print a warning on every load of a portable graph."""
    q, k, v = (torch.randn(1, 6, 8) for _ in range(3))
    bias = torch.zeros(1, 1, 6, 6)
    bias[..., 2, :] = float("-inf")
    capfd.readouterr()
    got = run_single_op(DENSE, {}, [t.numpy() for t in (q, k, v, bias)])
    assert np.all(got[:, 2] == 0) and np.isfinite(got).all()
    assert "onnxruntime" not in capfd.readouterr().err

# ------------------------------------------------------------------------------------------------ disentangled
def _bucket_scalar(r: int, span: int, max_position: int) -> int:
    """make_log_bucket_position for one offset, written out: no clamp of r, float32 steps, correctly rounded logs."""
    mid = span // 2
    if abs(r) <= mid:
        return r
    f32 = np.float32
    ratio = f32(math.log(f32(abs(r)) / f32(mid)))
    denominator = f32(math.log(f32((max_position - 1) / mid)))
    return int(math.copysign(float(f32(math.ceil(ratio / denominator * f32(mid - 1))) + mid), r))


def test_log_bucket_matches_the_scalar_formula():
    r = torch.arange(-1500, 1501)  # offsets beyond max_position are not clamped (transformers does not)
    got = log_bucket(r, 256, 512)
    assert got.tolist() == [_bucket_scalar(x, 256, 512) for x in r.tolist()]
    assert torch.equal(got[1500 - 128:1500 + 129], r[1500 - 128:1500 + 129])
    assert got.max() > 255 and got.min() < -255  # past +-(max_position - 1): beyond span - 1, clamped in delta


@settings(max_examples=25, deadline=None)
@given(span=st.sampled_from([4, 6, 8, 16, 32, 64, 128, 256, 512]), extra=st.integers(2, 5000),
       seed=st.integers(0, 10_000))
def test_log_bucket_is_transformers_make_log_bucket_position(span, extra, seed):
    """Random offsets (far past max_position included) bucket exactly as transformers' DeBERTa-v2 does, on every
    row the op reads: far past the last row (buckets of 70000 with max_position just above span/2) torch's
    vectorised float32 log and the correctly rounded one may part by an ulp at a ceil boundary, which the clamp to
    the table's 2*span rows makes invisible."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    max_position = span // 2 + extra
    g = torch.Generator().manual_seed(seed)
    r = torch.cat([torch.randint(-8 * max_position, 8 * max_position, (2000,), generator=g),
                   torch.arange(-max_position - 2, max_position + 3)])
    expected = make_log_bucket_position(r, span, max_position).long()
    got = log_bucket(r, span, max_position)
    assert torch.equal((got + span).clamp(0, 2 * span - 1), (expected + span).clamp(0, 2 * span - 1))
    read = (expected + span >= 0) & (expected + span < 2 * span)
    assert torch.equal(got[read], expected[read])


def test_relative_index_past_max_position_reads_the_edge_rows():
    """Issue 14 item 3: with N > max_position every distance <= -max_position reads row 0 for an even span (as in
    transformers), where clamping first read row 1."""
    span, max_position, n = 8, 16, 40
    delta = relative_index(n, n, span, max_position)
    rel = torch.arange(n)[:, None] - torch.arange(n)[None]
    assert delta[rel <= -max_position].eq(0).all() and delta[rel >= max_position].eq(2 * span - 1).all()


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


@pytest.mark.parametrize("nq,nk", [(7, 40), (40, 7), (1, 30), (30, 1)])
def test_disentangled_decomposition_with_fewer_queries_or_keys(nq, nk):
    """The relative index laid out from one bucket per distance is the same at Nq != Nk (cross-length rows)."""
    heads, d, span, max_position = 2, 4, 8, 16
    g = torch.Generator().manual_seed(nq * 100 + nk)
    q = torch.randn(2, nq, heads * d, generator=g)
    k, v = (torch.randn(2, nk, heads * d, generator=g) for _ in range(2))
    kr, qr = torch.randn(2 * span, heads * d, generator=g), torch.randn(2 * span, heads * d, generator=g)
    attrs = dict(num_heads=heads, span=span, max_position=max_position)
    expected = DIS.reference(q, k, v, kr, qr, **attrs).numpy()
    got = run_single_op(DIS, attrs, [t.numpy() for t in (q, k, v, kr, qr)])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("c2p,p2c", [(1, 1), (1, 0), (0, 1), (0, 0)])
@pytest.mark.parametrize("bias_kind,masked_rows", [(None, "zeros"), ("query", "zeros"), ("query", "mean"),
                                                   ("padding", "mean")])
def test_disentangled_terms_bias_and_masked_rows(c2p, p2c, bias_kind, masked_rows):
    """Past max_position (n = 40 > 16), each term switch, broadcast biases with fully masked rows: the decomposition
    equals the reference, and the reference equals the explicit sum of the terms it switches on."""
    heads, d, n, span, max_position = 2, 4, 40, 8, 16
    g = torch.Generator().manual_seed(c2p * 2 + p2c)
    q, k, v = (torch.randn(2, n, heads * d, generator=g) for _ in range(3))
    kr, qr = torch.randn(2 * span, heads * d, generator=g), torch.randn(2 * span, heads * d, generator=g)
    arrays = [q, k, v, kr, qr]
    if bias_kind:
        arrays.append(_dense_bias(bias_kind, 2, heads, n, n, g))
    attrs = dict(num_heads=heads, span=span, max_position=max_position, c2p=c2p, p2c=p2c, masked_rows=masked_rows)
    expected = DIS.reference(*arrays, **attrs)
    got = run_single_op(DIS, attrs, [t.numpy() for t in arrays])
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=1e-4)
    # the terms, summed by hand; the default scale is DeBERTa's 1/sqrt((1 + c2p + p2c) D)
    delta = relative_index(n, n, span, max_position)
    qh, kh, vh = _heads(q, heads), _heads(k, heads), _heads(v, heads)
    krh, qrh = kr.reshape(2 * span, heads, d).transpose(0, 1), qr.reshape(2 * span, heads, d).transpose(0, 1)
    scores = qh @ kh.transpose(-1, -2)
    if c2p:
        scores = scores + torch.einsum("bhid,hijd->bhij", qh, krh[:, delta])
    if p2c:
        scores = scores + torch.einsum("bhjd,hijd->bhij", kh, qrh[:, delta])
    scores = scores / math.sqrt((1 + c2p + p2c) * d)
    if bias_kind:
        scores = scores + arrays[5]
    weights = torch.softmax(scores, -1)
    dead = (scores == float("-inf")).all(-1, keepdim=True)
    weights = weights.masked_fill(dead, 1.0 / n if masked_rows == "mean" else 0.0)
    by_hand = (weights @ vh).transpose(1, 2).reshape(2, n, heads * d)
    torch.testing.assert_close(expected, by_hand, atol=1e-5, rtol=1e-5)


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
