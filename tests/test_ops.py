"""The op contract: decompositions (function bodies) agree with the torch references; attributes are TensorRT-safe."""
import math

import numpy as np
import onnx.defs
import pytest
import torch
from hypothesis import given, settings, strategies as st

from attn_export.ops import OPS, BLOCK_SPARSE_ATTENTION as BSA, KERNELIZED_ATTENTION as LIN
from attn_export.ops.block_sparse_attention import visible_slots
from conftest import run_single_op


def test_contracts_are_tensorrt_safe():
    for op in OPS.values():
        assert not onnx.defs.has(op.op_type), f"{op.op_type} collides with a built-in ONNX op"
        assert op.op_type != "Attention"
        for attr in op.attributes:
            assert attr.kind in ("int", "float", "string")
            assert attr.default is not None
        node = op.make_node(["a", "b", "c"], ["y"], "n", {})
        attrs = {a.name: a for a in node.attribute}
        assert attrs["plugin_version"].s == b"1" and attrs["plugin_namespace"].s == b"attn_export"
        assert node.domain == "attn_export"


def test_unknown_attribute_is_rejected():
    with pytest.raises(KeyError):
        BSA.make_node(["q", "k", "v", "t"], ["y"], "n", {"bogus": 1})


def test_visible_slots_drop_duplicates_and_out_of_range():
    table = torch.tensor([[[0, 2, 2, -1, 5, 0]]])
    assert visible_slots(table, num_blocks=4).tolist() == [[[True, True, False, False, False, False]]]


@settings(max_examples=12, deadline=None)
@given(heads=st.integers(1, 3), head_dim=st.sampled_from([4, 8]), block=st.sampled_from([2, 4]),
       nb=st.integers(1, 6), slots=st.integers(1, 4), global_blocks=st.integers(0, 2), seed=st.integers(0, 99))
def test_block_sparse_decomposition_matches_reference(heads, head_dim, block, nb, slots, global_blocks, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, nb * block, heads * head_dim, generator=g) for _ in range(3))
    table = torch.randint(-1, nb, (heads, nb, slots), generator=g).int()  # duplicates and empty slots included
    attrs = dict(num_heads=heads, block_size=block, global_blocks=global_blocks)
    expected = BSA.reference(q, k, v, table, **attrs).numpy()
    got = run_single_op(BSA, attrs, [q.numpy(), k.numpy(), v.numpy(), table.numpy()])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)


@settings(max_examples=12, deadline=None)
@given(heads=st.integers(1, 3), block=st.sampled_from([2, 4]), nb=st.integers(1, 6), slots=st.integers(1, 5),
       global_blocks=st.integers(0, 2), bias=st.sampled_from(["none", "finite", "masked"]), seed=st.integers(0, 99))
def test_block_sparse_repeats_and_key_bias_decomposition(heads, block, nb, slots, global_blocks, bias, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, nb * block, heads * 4, generator=g) for _ in range(3))
    table = torch.randint(-1, nb, (heads, nb, slots), generator=g).int()
    arrays = [q, k, v, table]
    if bias != "none":
        key_bias = torch.randn(2, nb * block, generator=g) * 3
        if bias == "masked":  # padded keys, and batch row 1 with every key masked
            key_bias[0, -block:] = float("-inf")
            key_bias[1] = float("-inf")
        arrays.append(key_bias)
    attrs = dict(num_heads=heads, block_size=block, global_blocks=global_blocks, count_repeats=1)
    expected = BSA.reference(*arrays, **attrs).numpy()
    got = run_single_op(BSA, attrs, [a.numpy() for a in arrays])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert not np.isnan(got).any()


def test_block_sparse_count_repeats_weighs_a_block_per_listing():
    """A block listed r times weighs r times: the reference equals an explicit multiplicity-weighted softmax, with
    the key bias inside; count_repeats=0 keeps the union (the same as listing each block once)."""
    d, b, nb = 8, 4, 4
    q, k, v = (torch.randn(1, nb * b, d) for _ in range(3))
    key_bias = torch.randn(1, nb * b)
    table = torch.tensor([[[0, 0, 0, 2], [1, 0, 0, -1], [2, 3, 2, 0], [3, 3, -1, -1]]])
    out = BSA.reference(q, k, v, table, key_bias, block_size=b, count_repeats=1)
    mult = torch.zeros(nb, nb)
    for i in range(nb):
        for kb in table[0, i].tolist():
            if kb >= 0:
                mult[i, kb] += 1
    mult = mult.repeat_interleave(b, 0).repeat_interleave(b, 1)
    e = torch.exp((q[0] @ k[0].T) / math.sqrt(d) + key_bias)
    weights = mult * e / (mult * e).sum(-1, keepdim=True)
    torch.testing.assert_close(out[0], weights @ v[0], atol=1e-5, rtol=1e-5)
    union = torch.tensor([[[0, 2, -1, -1], [1, 0, -1, -1], [2, 3, 0, -1], [3, -1, -1, -1]]])
    torch.testing.assert_close(BSA.reference(q, k, v, table, key_bias, block_size=b),
                               BSA.reference(q, k, v, union, key_bias, block_size=b, count_repeats=1))
    assert not torch.allclose(out, BSA.reference(q, k, v, table, key_bias, block_size=b))
    # a finite fill on every key (finfo.min) leaves the weights proportional to the multiplicities, as the
    # decomposition (one softmax slot per listing) and the kernels compute it
    fill = torch.full((1, nb * b), torch.finfo(torch.float32).min)
    filled = BSA.reference(q, k, v, table, fill, block_size=b, count_repeats=1)
    row1 = (2 * v[0, 0:4].sum(0) + v[0, 4:8].sum(0)) / (3 * b)  # block 0 listed twice, block 1 once
    torch.testing.assert_close(filled[0, 4], row1, atol=1e-5, rtol=1e-5)
    got = run_single_op(BSA, dict(block_size=b, count_repeats=1), [q.numpy(), k.numpy(), v.numpy(),
                                                                    table.int().numpy(), fill.numpy()])
    np.testing.assert_allclose(got, filled.numpy(), atol=1e-5, rtol=1e-4)


def test_block_sparse_equals_dense_masked_softmax():
    heads, d, b, nb = 2, 8, 4, 5
    q, k, v = (torch.randn(1, nb * b, heads * d) for _ in range(3))
    table = torch.tensor([[[i, (i + 1) % nb] for i in range(nb)]] * heads)
    out = BSA.reference(q, k, v, table, num_heads=heads, block_size=b)
    mask = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        mask[i, i] = mask[i, (i + 1) % nb] = True
    mask = mask.repeat_interleave(b, 0).repeat_interleave(b, 1)
    qh, kh, vh = (t.reshape(1, nb * b, heads, d).transpose(1, 2) for t in (q, k, v))
    dense = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    torch.testing.assert_close(out, dense.transpose(1, 2).reshape(1, nb * b, heads * d), atol=1e-5, rtol=1e-5)


def test_block_sparse_row_without_keys_is_zero_not_nan():
    q, k, v = (torch.randn(1, 8, 4) for _ in range(3))
    table = torch.tensor([[[-1], [1]]])  # query block 0 sees nothing
    attrs = dict(num_heads=1, block_size=4)
    expected = BSA.reference(q, k, v, table, **attrs)
    got = run_single_op(BSA, attrs, [q.numpy(), k.numpy(), v.numpy(), table.int().numpy()])
    assert torch.all(expected[:, :4] == 0) and np.all(got[:, :4] == 0)
    assert not np.isnan(got).any()


@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("feature_map", ["favor_positive", "elu_plus_one", "identity"])
@pytest.mark.parametrize("n", [1, 50, 130])
def test_linear_decomposition_matches_reference(causal, feature_map, n):
    heads, d, m = 2, 8, 16
    q, k, v = (torch.randn(2, n, heads * d) for _ in range(3))
    w = torch.randn(m, d)
    attrs = dict(num_heads=heads, feature_map=feature_map, causal=causal, normalize=int(feature_map != "identity"))
    expected = LIN.reference(q, k, v, w, **attrs).numpy()
    got = run_single_op(LIN, attrs, [q.numpy(), k.numpy(), v.numpy(), w.numpy()])
    np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, np.abs(expected).max()), rtol=1e-4)


@pytest.mark.parametrize("norm", [1.0, 6.0])
def test_linear_projection_stabilizer_matches_its_definition(norm):
    """stabilizer=projection: the shift is the max of W x' alone (queries per token, keys over every position), so
    the query's exp term keeps exp(-|x'|^2/2) and eps takes over large-norm queries; the decomposition agrees."""
    heads, d, m, eps = 2, 8, 16, 1e-4
    q, k = (torch.randn(2, 30, heads * d) * norm for _ in range(2))
    v, w = torch.randn(2, 30, heads * d), torch.randn(m, d)
    attrs = dict(num_heads=heads, eps=eps, stabilizer="projection")
    got = LIN.reference(q, k, v, w, **attrs)
    x_q, x_k, v_h = (t.reshape(2, 30, heads, d).transpose(1, 2) * d ** -0.25 for t in (q, k, v))
    v_h = v_h * d ** 0.25
    proj_q, proj_k = x_q @ w.t(), x_k @ w.t()
    phi_q = torch.exp(proj_q - (x_q ** 2).sum(-1, keepdim=True) / 2 - proj_q.amax(-1, keepdim=True)) + eps
    phi_k = torch.exp(proj_k - (x_k ** 2).sum(-1, keepdim=True) / 2 - proj_k.amax((-2, -1), keepdim=True)) + eps
    a = phi_q @ phi_k.transpose(-1, -2)
    want = (a @ v_h / a.sum(-1, keepdim=True)).transpose(1, 2).reshape(2, 30, heads * d)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    logits = LIN.reference(q, k, v, w, num_heads=heads, eps=eps)
    assert (got - logits).abs().max() > (1e-2 if norm > 1 else 0)  # the stabilisers part where eps matters
    onnx_got = run_single_op(LIN, attrs, [q.numpy(), k.numpy(), v.numpy(), w.numpy()])
    np.testing.assert_allclose(onnx_got, got.numpy(), atol=1e-5, rtol=1e-4)


def test_linear_projection_stabilizer_is_non_causal_only():
    q = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="causal=0 only"):
        LIN.reference(q, q, q, torch.randn(6, 8), causal=1, stabilizer="projection")


def test_linear_causal_ignores_future_tokens():
    q, k, v = (torch.randn(1, 20, 8) for _ in range(3))
    w = torch.randn(16, 8)
    out = LIN.reference(q, k, v, w, causal=1)
    k2, v2 = k.clone(), v.clone()
    k2[:, 10:] += 5
    v2[:, 10:] -= 3
    out2 = LIN.reference(q, k2, v2, w, causal=1)
    torch.testing.assert_close(out[:, :10], out2[:, :10])
    assert not torch.allclose(out[:, 10:], out2[:, 10:])


def test_linear_zero_denominator_gives_zero():
    q = torch.zeros(1, 4, 4)
    k, v = torch.randn(1, 4, 4), torch.randn(1, 4, 4)
    out = LIN.reference(q, k, v, None, feature_map="identity", normalize=1)
    assert torch.all(out == 0)
