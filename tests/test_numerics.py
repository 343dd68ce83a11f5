"""Numerics of the op references and decompositions: rows that see no key are zeros (never NaN), large fp16
activations do not overflow, and the parity tolerances follow the output's precision."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from attn_export.check import compare_outputs, default_tolerances
from attn_export.ops import BLOCK_SPARSE_ATTENTION as BSA, KERNELIZED_ATTENTION as LIN
from attn_export.ops.functions import with_function_bodies

FP16_MAX = float(np.finfo(np.float16).max)


def decomposed(contract, attrs, arrays):
    """Run one custom node through its decomposition on onnxruntime; the output has the inputs' dtype."""
    names = [f"x{i}" for i in range(len(arrays))]
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), None)
              for n, a in zip(names, arrays)]
    out_type = helper.np_dtype_to_tensor_dtype(arrays[0].dtype)
    graph = helper.make_graph([contract.make_node(names, ["y"], "op", attrs)], "g", inputs,
                              [helper.make_tensor_value_info("y", out_type, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("attn_export", 1)])
    session = ort.InferenceSession(with_function_bodies(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(names, arrays)))[0]


def both(contract, attrs, tensors):
    """(reference, decomposition) outputs as numpy arrays of the inputs' dtype."""
    ref = contract.reference(*tensors, **attrs).numpy()
    return ref, decomposed(contract, attrs, [t.numpy() for t in tensors])


def assert_close(ref, got):
    results = compare_outputs({"y": ref}, {"y": got})
    assert results[0].passed, results[0].reason


# ---------------------------------------------------------------------------------------------- block sparse

HEADS, HEAD_DIM, BLOCK = 2, 8, 4
# query block 0 lists no block at all, block 1 only out-of-range and negative entries, block 2 a duplicate pair
TABLE = torch.tensor([[[-1, -1], [7, -3], [2, 2], [3, 0]]], dtype=torch.int32)
EMPTY_ROWS = slice(0, 2 * BLOCK)


def qkv(dtype, scale=1.0, seed=0, n=4 * BLOCK):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, n, HEADS * HEAD_DIM, generator=g) * scale).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_sparse_rows_that_see_no_key_are_zero(dtype):
    attrs = dict(num_heads=HEADS, block_size=BLOCK)
    ref, got = both(BSA, attrs, [*qkv(dtype), TABLE])
    for out in (ref, got):
        assert out.dtype == np.dtype(str(dtype).split(".")[1])
        assert np.all(out[:, EMPTY_ROWS] == 0)
        assert np.isfinite(out).all()
        assert np.any(out[:, 2 * BLOCK:] != 0)
    assert_close(ref, got)


def test_block_sparse_global_rows_see_every_key_even_with_an_empty_table_row():
    attrs = dict(num_heads=HEADS, block_size=BLOCK, global_blocks=1)
    ref, got = both(BSA, attrs, [*qkv(torch.float32), TABLE])
    for out in (ref, got):
        assert np.all(out[:, :BLOCK] != 0), "query block 0 is global: it attends to every key"
        assert np.all(out[:, BLOCK:2 * BLOCK] == 0), "query block 1 sees nothing"
    assert_close(ref, got)


def test_block_sparse_nan_input_is_not_hidden_as_zeros():
    """The zero rule is for rows without keys; a NaN that reaches a visible row must still show."""
    q, k, v = qkv(torch.float32)
    q[0, 3 * BLOCK, 0] = float("nan")  # a token of query block 3, which sees blocks 3 and 0
    ref, got = both(BSA, dict(num_heads=HEADS, block_size=BLOCK), [q, k, v, TABLE])
    for out in (ref, got):
        assert np.isnan(out[0, 3 * BLOCK, :HEAD_DIM]).all()
        assert np.all(out[:, EMPTY_ROWS] == 0)


@pytest.mark.parametrize("global_blocks", [0, 1])
def test_block_sparse_large_fp16_activations_do_not_overflow(global_blocks):
    q, k, v = qkv(torch.float16, scale=300.0)
    scores = q[0].float().reshape(-1, HEADS, HEAD_DIM)[:, 0] @ k[0].float().reshape(-1, HEADS, HEAD_DIM)[:, 0].T
    assert scores.abs().max() > FP16_MAX, "the inputs must be large enough to overflow fp16 scores"
    attrs = dict(num_heads=HEADS, block_size=BLOCK, global_blocks=global_blocks)
    ref, got = both(BSA, attrs, [q, k, v, TABLE])
    assert np.isfinite(ref).all() and np.isfinite(got).all()
    assert_close(ref, got)
    # and both agree with the float64 definition: a masked dense softmax
    exact = BSA.reference(*(t.double() for t in (q, k, v)), TABLE, **attrs).numpy()
    assert_close(exact.astype(np.float16), got)


# ---------------------------------------------------------------------------------------------- kernelized

@pytest.mark.parametrize("feature_map, causal", [("elu_plus_one", 0), ("elu_plus_one", 1), ("favor_positive", 1)])
def test_linear_zero_denominator_rows_are_zero(feature_map, causal):
    """Key features that underflow to 0 give 0/0: zeros, never NaN. (Non-causal FAVOR+ shifts keys by their own
    maximum, so some feature is always 1 there.)"""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 70, 16, generator=g)
    k = torch.full((1, 70, 16), -200.0)
    v = torch.randn(1, 70, 16, generator=g)
    w = torch.ones(8, 8)
    attrs = dict(num_heads=2, feature_map=feature_map, causal=causal, eps=0.0)
    ref, got = both(LIN, attrs, [q, k, v, w])
    for out in (ref, got):
        assert not np.isnan(out).any()
        assert np.all(out == 0)


@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("feature_map", ["elu_plus_one", "favor_positive"])
def test_linear_large_fp16_activations_do_not_overflow(causal, feature_map):
    g = torch.Generator().manual_seed(1)
    q, k, v = ((torch.randn(1, 70, 16, generator=g) * 200).half() for _ in range(3))
    w = torch.randn(8, 8, generator=g).half()
    attrs = dict(num_heads=2, feature_map=feature_map, causal=causal)
    ref, got = both(LIN, attrs, [q, k, v, w])
    assert np.isfinite(ref).all() and np.isfinite(got).all()
    assert np.abs(got.astype(np.float32)).max() <= np.abs(v.float().numpy()).max() * 1.001  # a convex mix of v
    assert_close(ref, got)


# ---------------------------------------------------------------------------------------------- tolerances

@pytest.mark.parametrize("dtype, expected", [(np.float64, (1e-7, 1e-6)), (np.float32, (1e-4, 1e-3)),
                                             (np.float16, (1e-2, 1e-2)), ("bfloat16", (5e-2, 5e-2)),
                                             (np.int64, (0.0, 0.0)), (np.bool_, (0.0, 0.0))])
def test_tolerances_follow_precision(dtype, expected):
    assert default_tolerances(dtype) == expected


def test_an_fp16_rounding_passes_in_fp16_and_fails_in_fp32():
    ref = np.linspace(-4, 4, 101).astype(np.float32)
    rounded = ref.astype(np.float16)
    assert compare_outputs({"y": ref.astype(np.float16)}, {"y": rounded})[0].passed
    off_by_fp16 = ref + np.float32(2e-3) * np.sign(ref)
    assert compare_outputs({"y": ref.astype(np.float16)}, {"y": off_by_fp16.astype(np.float16)})[0].passed
    assert not compare_outputs({"y": ref}, {"y": off_by_fp16})[0].passed
