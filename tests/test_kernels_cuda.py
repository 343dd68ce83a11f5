"""Each CUDA kernel against its op contract's torch reference, on a GPU (skipped without one).

Shapes cover lengths that are not multiples of the tiles, 1 to 16 heads, head dims 32/64/128 (tensor-core paths)
and others (CUDA-core paths), fp32, fp16 and bf16, and rows that see no key. Errors are measured against the
largest reference magnitude: fp32 1e-4, fp16 1e-2, bf16 4e-2 (max), a quarter of that on average.
"""
from __future__ import annotations

import math

import pytest
import torch

from attn_export.backends import cuda_ops
from attn_export.ops import OPS

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@pytest.fixture(scope="module", autouse=True)
def extension():
    reason = cuda_ops.unavailable_reason()
    if reason:
        pytest.skip(reason)
    return cuda_ops.load_extension()


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def check(op_type, tensors, attrs, dtype):
    """Kernel output against the reference on the same (rounded) inputs; returns the kernel output."""
    out = cuda_ops.run_op(op_type, *tensors, **attrs)
    torch.cuda.synchronize()
    cpu = [t.cpu() if t is not None else None for t in tensors]
    while cpu and cpu[-1] is None:
        cpu.pop()
    ref = OPS[op_type].reference(*cpu, **OPS[op_type].resolve_attrs(attrs)).float()
    got = out.float().cpu()
    assert got.shape == ref.shape
    assert torch.isfinite(got).all(), "kernel produced NaN or inf"
    err = (got - ref).abs()
    scale = ref.abs().max().clamp_min(1e-6)
    tol = TOLERANCE[dtype]
    assert err.max() <= tol * scale, f"max error {err.max():.3g} > {tol} x {scale:.3g}"
    assert err.mean() <= tol / 4 * scale, f"mean error {err.mean():.3g} > {tol / 4} x {scale:.3g}"
    return out


# ---- DenseAttention ------------------------------------------------------------------------------------------
DENSE = [  # batch, heads, q_len, kv_len, head_dim, v_head_dim, causal, bias
    (2, 4, 77, 77, 64, 64, 0, None),
    (1, 16, 200, 333, 32, 32, 1, None),
    (2, 1, 130, 70, 128, 128, 1, None),  # more queries than keys: the first rows see nothing
    (1, 8, 65, 129, 64, 64, 0, "full"),
    (2, 3, 50, 50, 66, 64, 0, "heads"),  # MGK's augmented keys (D = Dq + 2): CUDA-core path
    (1, 2, 33, 300, 128, 128, 1, "batch"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", DENSE, ids=str)
def test_dense_attention(case, dtype):
    b, h, nq, nk, d, dv, causal, bias_kind = case
    q, k, v = rand(b, nq, h * d, dtype=dtype), rand(b, nk, h * d, dtype=dtype), rand(b, nk, h * dv, dtype=dtype)
    bias = None
    if bias_kind:
        shape = {"full": (b, h, nq, nk), "heads": (1, h, nq, nk), "batch": (b, 1, nq, nk)}[bias_kind]
        bias = rand(*shape, dtype=dtype)
    check("DenseAttention", (q, k, v, bias), {"num_heads": h, "causal": causal, "scale": 0.0}, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dense_attention_fully_masked_rows_are_zero(dtype):
    b, h, n, d = 1, 2, 96, 64
    q, k, v = (rand(b, n, h * d, dtype=dtype) for _ in range(3))
    bias = torch.zeros(b, h, n, n, device="cuda")
    bias[:, :, 5] = float("-inf")  # row 5 sees no key
    bias[:, 1, 70:] = float("-inf")
    out = check("DenseAttention", (q, k, v, bias.to(dtype)), {"num_heads": h}, dtype)
    heads = out.float().reshape(b, n, h, d)
    assert (heads[:, 5] == 0).all() and (heads[:, 70:, 1] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dense_attention_unchecked_rows_are_nan_as_a_plain_softmax_makes_them(dtype):
    """masked_rows "none" (set where a pass proved the scores finite): a row that sees no key anyway is NaN, as in
    the reference; every other row as the reference gives it."""
    b, h, n, d = 1, 2, 96, 64
    q, k, v = (rand(b, n, h * d, dtype=dtype) for _ in range(3))
    bias = torch.zeros(b, h, n, n, device="cuda")
    bias[:, 1, 70:] = float("-inf")
    bias = bias.to(dtype)
    out = cuda_ops.run_op("DenseAttention", q, k, v, bias, num_heads=h, masked_rows="none").float().cpu()
    ref = OPS["DenseAttention"].reference(q.cpu(), k.cpu(), v.cpu(), bias.cpu(), num_heads=h, masked_rows="none")
    dead = torch.zeros(b, n, h, d, dtype=torch.bool)
    dead[:, 70:, 1] = True
    dead = dead.reshape(b, n, h * d)
    assert torch.isnan(out[dead]).all() and torch.isnan(ref.float()[dead]).all()
    err = (out[~dead] - ref.float()[~dead]).abs().max()
    assert err <= TOLERANCE[dtype] * ref.float()[~dead].abs().max()


DENSE_MASKS = [  # batch, heads, q_len, kv_len, head_dim, causal, bias form, masked_rows
    (2, 4, 77, 90, 64, "padding", 0, "zeros"),  # [B, 1, 1, Nk] read in place (issue 14 item 4)
    (2, 4, 77, 90, 64, "padding", 0, "mean"),
    (2, 2, 100, 100, 32, "query", 0, "mean"),  # DeBERTa-style query x key padding [B, 1, Nq, Nk]
    (1, 2, 130, 70, 128, None, 1, "mean"),  # rows the causal mask empties average every key
    (2, 3, 50, 61, 48, "padding", 1, "mean"),  # CUDA-core path
    (1, 2, 65, 65, 64, "heads", 0, "mean"),  # [1, H, 1, Nk]
]


def masked_bias(form, b, h, nq, nk):
    """An additive -inf/0 mask in one broadcast form; batch row 0 always has a fully masked query row or batch."""
    if form == "padding":
        keep = torch.rand(b, 1, 1, nk) < 0.7
        keep[0] = False  # batch row 0 sees no key at all
    elif form == "query":
        keep_q, keep_k = torch.rand(b, nq) < 0.8, torch.rand(b, nk) < 0.8
        keep_q[0, :7] = False
        keep = (keep_q[:, :, None] & keep_k[:, None, :])[:, None]
    elif form == "heads":
        keep = torch.rand(1, h, 1, nk) < 0.6
        keep[0, 0] = False
    else:
        return None
    return torch.where(keep, 0.0, float("-inf")).cuda()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", DENSE_MASKS, ids=str)
def test_dense_attention_broadcast_masks_and_masked_rows(case, dtype):
    b, h, nq, nk, d, form, causal, masked_rows = case
    q, k, v = rand(b, nq, h * d, dtype=dtype), rand(b, nk, h * d, dtype=dtype), rand(b, nk, h * d, dtype=dtype)
    bias = masked_bias(form, b, h, nq, nk)
    bias = bias.to(dtype) if bias is not None else None
    attrs = {"num_heads": h, "causal": causal, "masked_rows": masked_rows}
    out = check("DenseAttention", (q, k, v, bias), attrs, dtype)
    if form == "padding":
        batch0 = out.float()[0]
        if masked_rows == "zeros":
            assert (batch0 == 0).all()
        else:
            mean = v.float()[0].mean(0)
            torch.testing.assert_close(batch0, mean.expand_as(batch0), atol=TOLERANCE[dtype], rtol=0)


SHARED_KEYS = [  # batch, shared batch, heads, q_len, own keys, shared keys, head_dim, causal, bias form, masked_rows
    (6, 2, 2, 32, 64, 16, 64, 0, "padding", "zeros"),  # Transformer-LS: 3 segments per sequence, 16 landmarks
    (4, 1, 4, 50, 50, 30, 32, 1, "heads", "mean"),  # the tile boundary falls inside the shared set
    (3, 3, 2, 40, 20, 70, 48, 0, "query", "mean"),  # CUDA-core path; one set per batch row
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", SHARED_KEYS, ids=str)
def test_dense_attention_shared_keys_match_the_copied_keys(case, dtype):
    """Keys every group of batch rows shares, read in place, give what the same keys copied ahead of each row's
    own give: against the reference, and against the kernel run on the copies."""
    b, bs, h, nq, nk, r, d, causal, form, masked_rows = case
    q, k, v = rand(b, nq, h * d, dtype=dtype), rand(b, nk, h * d, dtype=dtype), rand(b, nk, h * d, dtype=dtype)
    sk, sv = rand(bs, r, h * d, dtype=dtype), rand(bs, r, h * d, dtype=dtype)
    bias = masked_bias(form, b, h, nq, r + nk).to(dtype)
    attrs = {"num_heads": h, "causal": causal, "masked_rows": masked_rows}
    out = check("DenseAttention", (q, k, v, bias, sk, sv), attrs, dtype)
    copied = [torch.cat([s.repeat_interleave(b // bs, 0), t], 1) for s, t in ((sk, k), (sv, v))]
    expected = cuda_ops.run_op("DenseAttention", q, *copied, bias, **attrs)
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[dtype] / 10, rtol=0)


@pytest.mark.parametrize("d", [64, 48])
def test_finite_fill_rows_are_uniform_as_in_the_reference(d):
    """An additive finfo(float32).min mask (BERT's) is finite: a batch row with every key masked is the mean of
    the values, in the reference (exact softmax of equal numbers) and in the kernels (the fill must not overflow
    to -inf when scaled to log2 units), for DenseAttention, DisentangledAttention and BlockSparse key_bias."""
    b, h, n = 2, 2, 96
    q, k, v = (rand(b, n, h * d, dtype=torch.float32) for _ in range(3))
    keep = torch.ones(b, n, device="cuda")
    keep[0] = 0
    keep[1, 80:] = 0
    fill = (1.0 - keep) * torch.finfo(torch.float32).min
    out = check("DenseAttention", (q, k, v, fill[:, None, None, :]), {"num_heads": h}, torch.float32)
    torch.testing.assert_close(out[0], v[0].mean(0).expand_as(out[0]), atol=1e-4, rtol=0)
    rel = rand(16, h * d, dtype=torch.float32)
    out = check("DisentangledAttention", (q, k, v, rel, rel, fill[:, None, None, :]),
                {"num_heads": h, "span": 8, "max_position": 32}, torch.float32)
    torch.testing.assert_close(out[0], v[0].mean(0).expand_as(out[0]), atol=1e-4, rtol=0)
    table = hf_bigbird_table(n // 16, 2).cuda()
    check("BlockSparseAttention", (q, k, v, table, fill),
          {"num_heads": h, "block_size": 16, "global_blocks": 1, "count_repeats": 1}, torch.float32)


def test_dense_attention_fp16_past_65504_keys():
    """The softmax sum passes fp16's largest value: statistics stay in fp32, nothing overflows."""
    b, h, nq, nk, d = 1, 1, 64, 70_000, 64
    q = rand(b, nq, h * d, dtype=torch.float16, scale=0.01)
    k, v = rand(b, nk, h * d, dtype=torch.float16), rand(b, nk, h * d, dtype=torch.float16)
    check("DenseAttention", (q, k, v), {"num_heads": h}, torch.float16)


# relu(s)^2 weights (FLASH's local attention) and the logits as input (Evolving Attention's materialised map)
DENSE_SCORES = [  # batch, heads, q_len, kv_len, head_dim (= v_head_dim), causal, bias, score_fn, logits_input
    (2, 4, 77, 77, 64, 0, "full", "relu_squared", 0),
    (1, 8, 100, 150, 32, 1, None, "relu_squared", 0),
    (2, 2, 130, 70, 128, 1, "heads", "relu_squared", 0),  # more queries than keys: the first rows see nothing
    (1, 3, 50, 61, 33, 1, "batch", "relu_squared", 0),  # odd head dim: CUDA-core path
    (2, 4, 77, 77, 64, 1, "full", "softmax", 1),
    (1, 8, 65, 129, 32, 1, "heads", "softmax", 1),
    (1, 2, 33, 300, 128, 1, "batch", "softmax", 1),
    (2, 3, 50, 50, 33, 0, "full", "softmax", 1),
    (1, 4, 64, 96, 64, 1, "full", "relu_squared", 1),
    (1, 2, 70, 70, 33, 1, "heads", "relu_squared", 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", DENSE_SCORES, ids=str)
def test_dense_attention_score_fn_and_logits_input(case, dtype):
    b, h, nq, nk, d, causal, bias_kind, score_fn, logits_input = case
    q, k, v = rand(b, nq, h * d, dtype=dtype), rand(b, nk, h * d, dtype=dtype), rand(b, nk, h * d, dtype=dtype)
    bias = None
    if bias_kind:
        shape = {"full": (b, h, nq, nk), "heads": (1, h, nq, nk), "batch": (b, 1, nq, nk)}[bias_kind]
        bias = rand(*shape, dtype=dtype)
    attrs = {"num_heads": h, "causal": causal, "score_fn": score_fn, "logits_input": logits_input}
    out = check("DenseAttention", (q, k, v, bias), attrs, dtype)
    if causal and nq > nk:  # rows that see no key are zero for either score_fn
        assert (out[:, : nq - nk] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("d", [64, 33])
def test_dense_attention_logits_input_never_reads_query_or_key(d, dtype):
    """NaN queries and keys (the key even of another length) leave the output of logits_input=1 untouched."""
    b, h, nq, nk = 2, 2, 40, 56
    v = rand(b, nk, h * d, dtype=dtype)
    logits = rand(b, h, nq, nk, dtype=dtype)
    q = torch.full((b, nq, 3), float("nan"), device="cuda", dtype=dtype)
    k = torch.full((b, 1, 3), float("nan"), device="cuda", dtype=dtype)
    attrs = {"num_heads": h, "causal": 1, "logits_input": 1}
    out = check("DenseAttention", (q, k, v, logits), attrs, dtype)
    assert out.shape == (b, nq, h * d)


def test_dense_attention_logits_input_needs_the_bias():
    q, k, v = (rand(1, 8, 32, dtype=torch.float16) for _ in range(3))
    with pytest.raises(RuntimeError, match="needs the logits as the bias input"):
        cuda_ops.run_op("DenseAttention", q, k, v, num_heads=2, logits_input=1)


# ---- BlockSparseAttention ------------------------------------------------------------------------------------
SPARSE = [  # batch, heads, seq_len, head_dim, block_size, slots, global_blocks, per-head table
    (1, 4, 512, 64, 64, 5, 1, False),
    (2, 2, 384, 128, 128, 2, 0, True),
    (1, 16, 256, 32, 32, 4, 1, True),
    (1, 3, 96, 64, 16, 3, 0, False),
    (1, 2, 120, 64, 8, 4, 1, False),  # block smaller than a tensor-core tile: CUDA-core path
    (1, 2, 144, 48, 48, 2, 0, False),  # head dim 48: CUDA-core path
]


def block_table(heads, blocks, slots, empty_row):
    """Random table with out-of-range entries, repeats, and one row that lists nothing."""
    table = torch.randint(-1, blocks + 1, (heads, blocks, slots), dtype=torch.int32)
    table[..., -1] = table[..., 0]  # a repeat in every row
    if empty_row is not None:
        table[:, empty_row] = -1
    return table


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", SPARSE, ids=str)
def test_block_sparse_attention(case, dtype):
    b, h, n, d, bs, slots, g, per_head = case
    nb = n // bs
    q, k, v = (rand(b, n, h * d, dtype=dtype) for _ in range(3))
    empty = g if g < nb - g else None
    table = block_table(h if per_head else 1, nb, slots, empty).cuda()
    attrs = {"num_heads": h, "block_size": bs, "global_blocks": g}
    out = check("BlockSparseAttention", (q, k, v, table), attrs, dtype)
    if empty is not None:  # a non-global row listing no block is zero
        rows = out.float().reshape(b, nb, bs, h * d)[:, empty]
        assert (rows == 0).all()


def hf_bigbird_table(nb, random_blocks):
    """HF BigBird's eval layout (tests/test_hf_attention_reference.py): block 0 listed 1 + r times per row."""
    rand = [0] * random_blocks
    rows = [[-1]] + [[0, 1, 2, nb - 1] + rand] + [[i - 1, i, i + 1, 0, nb - 1] + rand for i in range(2, nb - 2)]
    rows += [[0, nb - 3, nb - 2, nb - 1] + rand] + [[-1]]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int32)[None]


SPARSE_REPEATS = [  # batch, heads, seq_len, head_dim, block_size, random blocks, key bias
    (2, 4, 1024, 64, 64, 3, "padding"),  # BigBird-base-like blocks: tensor-core path
    (1, 2, 512, 32, 16, 2, "finite"),
    (2, 2, 192, 128, 32, 1, None),
    (2, 2, 160, 48, 16, 2, "padding"),  # head dim 48: CUDA-core path
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", SPARSE_REPEATS, ids=str)
def test_block_sparse_attention_count_repeats_and_key_bias(case, dtype):
    b, h, n, d, bs, r, bias_kind = case
    q, k, v = (rand(b, n, h * d, dtype=dtype) for _ in range(3))
    table = hf_bigbird_table(n // bs, r).cuda()
    key_bias = None
    if bias_kind == "finite":
        key_bias = rand(b, n, dtype=dtype)
    elif bias_kind == "padding":  # HF's -10000 on padded keys, and one batch row with every key -inf
        key_bias = torch.zeros(b, n, device="cuda")
        key_bias[:, n - bs - 5:] = -10000.0
        key_bias[-1] = float("-inf") if b > 1 else key_bias[-1]
        key_bias = key_bias.to(dtype)
    attrs = {"num_heads": h, "block_size": bs, "global_blocks": 1, "count_repeats": 1}
    out = check("BlockSparseAttention", (q, k, v, table, key_bias), attrs, dtype)
    if bias_kind == "padding" and b > 1:
        assert (out[-1] == 0).all()


# ---- KernelizedAttention -------------------------------------------------------------------------------------
LINEAR = [  # batch, heads, seq_len, head_dim, features, feature_map, causal, normalize
    (2, 4, 300, 64, 256, "favor_positive", 0, 1),
    (1, 2, 200, 64, 266, "favor_positive", 1, 1),  # Performer's default M = D ln D: padded to 288
    (1, 8, 129, 32, 64, "favor_positive", 0, 0),
    (2, 2, 100, 128, 128, "favor_positive", 1, 0),
    (1, 4, 257, 64, 0, "elu_plus_one", 0, 1),
    (1, 3, 130, 128, 0, "elu_plus_one", 1, 1),
    (1, 1, 70, 32, 0, "identity", 1, 0),
    (2, 16, 65, 32, 0, "identity", 0, 1),
    (1, 2, 90, 48, 96, "favor_positive", 0, 1),  # head dim 48: CUDA-core path
    # issue 14: more than 64 features (key-state blocks past the first read their own projection rows), causal
    # favor in fp16 (phi(k) near eps), and a CUDA-core state too large for shared memory (kept in the workspace)
    (1, 2, 200, 64, 266, "favor_positive", 0, 1),
    (1, 2, 300, 64, 512, "favor_positive", 1, 1),
    (2, 2, 100, 128, 128, "favor_positive", 1, 1),
    (1, 2, 130, 48, 1200, "favor_positive", 0, 1),
    (1, 1, 70, 48, 1200, "favor_positive", 1, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", LINEAR, ids=str)
def test_kernelized_attention(case, dtype):
    b, h, n, d, m, fmap, causal, normalize = case
    q, k, v = (rand(b, n, h * d, dtype=dtype) for _ in range(3))
    if fmap == "identity" and normalize:  # keep phi(q).sum phi(k) away from 0, where the output is ill-posed
        q, k = q.abs(), k.abs()
    projection = rand(m, d, dtype=dtype) if fmap == "favor_positive" else None
    attrs = {"num_heads": h, "feature_map": fmap, "causal": causal, "normalize": normalize}
    check("KernelizedAttention", (q, k, v, projection), attrs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("d, norm", [(64, 1.0), (64, 4.0), (48, 4.0)], ids=str)  # tensor-core and CUDA-core paths
def test_kernelized_attention_projection_stabilizer(d, norm, dtype):
    """performer-pytorch's shift (max of W x'): large norms, where eps decides phi(q), must follow the reference."""
    q, k = (norm * rand(2, 150, 2 * d, dtype=dtype) for _ in range(2))
    v, projection = rand(2, 150, 2 * d, dtype=dtype), rand(96, d, dtype=dtype)
    attrs = {"num_heads": 2, "feature_map": "favor_positive", "eps": 1e-4, "stabilizer": "projection"}
    check("KernelizedAttention", (q, k, v, projection), attrs, dtype)


# ---- DisentangledAttention -----------------------------------------------------------------------------------
DEBERTA = [  # batch, heads, seq_len, head_dim, span, max_position (seq_len < max_position: see relative_index)
    (1, 4, 200, 64, 64, 512),
    (2, 2, 130, 32, 16, 0),  # DeBERTa v1: no buckets, distances past span clamp
    (1, 12, 256, 64, 128, 512),
    (1, 1, 100, 128, 32, 256),
    (1, 2, 75, 48, 16, 128),  # head dim 48: CUDA-core path
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", DEBERTA, ids=str)
def test_disentangled_attention(case, dtype):
    b, h, n, d, span, max_position = case
    q, k, v = (rand(b, n, h * d, dtype=dtype) for _ in range(3))
    rel_key, rel_query = rand(2 * span, h * d, dtype=dtype), rand(2 * span, h * d, dtype=dtype)
    attrs = {"num_heads": h, "span": span, "max_position": max_position}
    check("DisentangledAttention", (q, k, v, rel_key, rel_query), attrs, dtype)


DEBERTA_EXT = [  # batch, heads, seq_len, head_dim, span, max_position, c2p, p2c, bias form, masked_rows
    (1, 2, 700, 64, 128, 512, 1, 1, None, "zeros"),  # N > max_position (issue 14 item 3)
    (2, 4, 300, 64, 32, 64, 1, 1, "query", "mean"),  # HF DeBERTa's query x key padding: tensor cores, 32-key tiles
    (2, 2, 200, 32, 16, 48, 1, 0, "padding", "mean"),
    (1, 2, 150, 128, 16, 32, 0, 1, "query", "zeros"),
    (2, 2, 90, 48, 8, 16, 0, 0, "query", "mean"),  # CUDA-core path
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", DEBERTA_EXT, ids=str)
def test_disentangled_attention_terms_bias_and_long_sequences(case, dtype):
    b, h, n, d, span, max_position, c2p, p2c, form, masked_rows = case
    q, k, v = (rand(b, n, h * d, dtype=dtype) for _ in range(3))
    rel_key, rel_query = rand(2 * span, h * d, dtype=dtype), rand(2 * span, h * d, dtype=dtype)
    bias = masked_bias(form, b, h, n, n)
    bias = bias.to(dtype) if bias is not None else None
    attrs = {"num_heads": h, "span": span, "max_position": max_position, "c2p": c2p, "p2c": p2c,
             "masked_rows": masked_rows}
    check("DisentangledAttention", (q, k, v, rel_key, rel_query, bias), attrs, dtype)


# ---- MixtureOfExperts ----------------------------------------------------------------------------------------
MOE = [  # batch, tokens, model_dim, ffn_dim, experts, capacity, capacity_factor, activation
    (2, 100, 64, 256, 4, 0, 1.0, "relu"),
    (1, 300, 128, 512, 8, 0, 1.25, "gelu"),
    (3, 64, 64, 128, 8, 5, 1.0, "relu"),  # a small fixed capacity: many dropped tokens
    (1, 50, 40, 100, 3, 0, 2.0, "gelu"),  # ffn_dim 100: CUDA-core GEMM
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", MOE, ids=str)
def test_mixture_of_experts(case, dtype):
    b, t, dm, f, e, capacity, factor, act = case
    hidden = rand(b, t, dm, dtype=dtype)
    router = rand(dm, e, dtype=dtype, scale=dm ** -0.5)
    expert_in = rand(e, dm, f, dtype=dtype, scale=dm ** -0.5)
    expert_out = rand(e, f, dm, dtype=dtype, scale=f ** -0.5)
    attrs = {"capacity": capacity, "capacity_factor": factor, "activation": act}
    out = check("MixtureOfExperts", (hidden, router, expert_in, expert_out), attrs, dtype)
    if capacity:
        assert (out.float().abs().sum(-1) == 0).sum() >= b * (t - capacity * e)  # dropped tokens are zero


# ---- LongConvolution -----------------------------------------------------------------------------------------
CONV = [  # batch, seq_len, channels, kernel_len, bidirectional
    (2, 100, 48, 128, False),
    (1, 1000, 256, 1000, True),
    (1, 65, 33, 70, True),
    (3, 300, 64, 512, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CONV, ids=str)
def test_long_convolution(case, dtype):
    b, n, c, length, bidirectional = case
    decay = torch.exp(-torch.arange(length, device="cuda") / 50.0)
    u = rand(b, n, c, dtype=dtype)
    kernel = (torch.randn(c, length, device="cuda") * decay * 0.2).to(dtype)
    skip = rand(c, dtype=dtype)
    reverse = (torch.randn(c, length, device="cuda") * decay * 0.2).to(dtype) if bidirectional else None
    check("LongConvolution", (u, kernel, skip, reverse), {"channels": c}, dtype)


# ---- launch rules --------------------------------------------------------------------------------------------
def test_grids_past_65535_blocks_along_y_or_z():
    """batch * heads, experts * batch and the batch past 65535 (grid.y/z limit): the launchers flatten or slice."""
    dtype = torch.float16
    h = 65540
    q, k, v = (rand(1, 8, h * 32, dtype=dtype) for _ in range(3))
    check("KernelizedAttention", (q, k, v, rand(64, 32, dtype=dtype)),
          {"num_heads": h, "feature_map": "favor_positive", "causal": 1}, dtype)
    check("KernelizedAttention", (q, k, v, None), {"num_heads": h, "feature_map": "elu_plus_one"}, dtype)
    q, k, v = (rand(1, 4, h * 32, dtype=dtype) for _ in range(3))
    rel = [rand(8, h * 32, dtype=dtype) for _ in range(2)]
    check("DisentangledAttention", (q, k, v, *rel), {"num_heads": h, "span": 4, "max_position": 0}, dtype)
    b = 65537
    q, k, v = (rand(b, 4, 32, dtype=dtype) for _ in range(3))
    check("DenseAttention", (q, k, v, None), {"num_heads": 1}, dtype)
    hidden = rand(b, 1, 16, dtype=dtype)
    moe = (rand(16, 1, dtype=dtype), rand(1, 16, 16, dtype=dtype, scale=0.25), rand(1, 16, 16, dtype=dtype, scale=0.25))
    check("MixtureOfExperts", (hidden, *moe), {"capacity": 1}, dtype)


def test_kernels_run_inside_cuda_graph_capture():
    """Launchers neither allocate nor synchronise: a captured graph replays them."""
    b, h, n, d = 1, 4, 256, 64
    q, k, v = (rand(b, n, h * d, dtype=torch.float16) for _ in range(3))
    table = block_table(1, n // 64, 3, None).cuda()
    attrs = {"num_heads": h, "block_size": 64, "global_blocks": 1}
    expected = cuda_ops.run_op("BlockSparseAttention", q, k, v, table, **attrs)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = cuda_ops.run_op("BlockSparseAttention", q, k, v, table, **attrs)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, expected, atol=0, rtol=0)


def test_non_cuda_inputs_use_the_reference():
    q, k, v = (torch.randn(1, 10, 16) for _ in range(3))
    out = cuda_ops.run_op("DenseAttention", q, k, v, num_heads=2)
    assert out.device.type == "cpu"
    assert math.isfinite(out.abs().max().item())
