"""BlockSparseAttention: softmax attention where each query block sees a table of key blocks (kernel family K2).

Semantics, per head h and query block i (blocks of `block_size` tokens, nb = N / block_size):
  - a global row (i < global_blocks or i >= nb - global_blocks) attends to every key;
  - any other row attends to the key blocks block_index[h, i, :] (entries < 0 mean "no block"); with
    count_repeats=0 a block listed twice counts once (the union), with count_repeats=1 every listed slot counts:
    a block listed r times weighs r times in the softmax (exp-sum and value sum), as HF transformers' BigBird
    computes in eval mode, where every random block is block 0;
  - scores are scale * q.k + key_bias[b, j] (scale 0 means 1/sqrt(head_dim); key_bias optional, additive per key,
    e.g. BigBird's (1 - mask) * -10000); a row that sees no key, or whose every score is -inf, outputs zeros.
This covers BigBird (window + global + random), Hypercube, and banded local attention.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from onnx import numpy_helper

from .contract import Attribute, OpContract, TensorSpec, shape_of_first_input, split_heads
from .onnx_builder import OnnxBuilder

FLOATS = ("float32", "float16", "bfloat16")


def visible_slots(block_index: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[.., m] table -> bool [.., m]: a slot counts if it names a real block not named by an earlier slot."""
    valid = (block_index >= 0) & (block_index < num_blocks)
    same = block_index.unsqueeze(-1) == block_index.unsqueeze(-2)  # [.., m, m]
    earlier = torch.ones(same.shape[-2:], dtype=torch.bool, device=block_index.device).tril(-1)
    duplicate = (same & earlier & valid.unsqueeze(-2)).any(-1)
    return valid & ~duplicate


def counted_slots(block_index: torch.Tensor, num_blocks: int, count_repeats: int) -> torch.Tensor:
    """The slots that weigh in the softmax: every valid one with count_repeats, else the first of each block."""
    if count_repeats:
        return (block_index >= 0) & (block_index < num_blocks)
    return visible_slots(block_index, num_blocks)


def reference(query, key, value, block_index, key_bias=None, *, num_heads=1, block_size=64, scale=0.0,
              global_blocks=0, count_repeats=0):
    """Block by block, as the semantics read: each query block against the key blocks its row lists (a block listed
    r times counted r times when count_repeats), global rows against every key. Memory O(N * m * block_size), so
    verifying a 4096-token layer does not build [B, H, N, N] scores."""
    q, k, v = (split_heads(t, num_heads) for t in (query, key, value))
    batch, heads, n, d = q.shape
    if n % block_size:
        raise ValueError(f"sequence length {n} is not a multiple of block_size {block_size}")
    nb = n // block_size
    scale = scale or 1.0 / math.sqrt(d)
    table = block_index.to(torch.int64).expand(heads, nb, -1)
    counted = counted_slots(table, nb, count_repeats)  # [H, nb, m]: the slots that weigh in the row's softmax
    m = table.shape[-1]

    # float32 throughout: fp16 products of large activations overflow 65504 (and exp does long before)
    q, k, v = q.float(), k.float(), v.float()
    bias = None if key_bias is None else key_bias.float()
    # every listed key block gathered per (head, query block) through a flat (head, block) index: [B, H, nb, m*b, D]
    flat = (table.clamp(0, nb - 1) + torch.arange(heads, device=q.device)[:, None, None] * nb).reshape(-1)
    kg, vg = (t.reshape(batch, heads * nb, block_size, d)[:, flat].reshape(batch, heads, nb, m * block_size, d)
              for t in (k, v))
    # in place where it can be: these [B, H, nb, b, m*b] scores are the reference's largest tensor
    scores = (q.reshape(batch, heads, nb, block_size, d) @ kg.transpose(-1, -2)).mul_(scale)  # [B, H, nb, b, m*b]
    if bias is not None:
        gathered = bias.reshape(batch, nb, block_size)[:, table.clamp(0, nb - 1)]  # [B, H, nb, m, b]
        scores.add_(gathered.reshape(batch, heads, nb, 1, m * block_size))
    # a slot the row does not count is -inf; a block listed r times is r slots, so it weighs r exp(s)
    visible = counted.repeat_interleave(block_size, -1)[None, :, :, None, :]
    out = _softmax_or_zeros_torch(scores.masked_fill_(~visible, float("-inf"))) @ vg  # [B, H, nb, b, D]

    rows = torch.arange(nb, device=q.device)
    is_global = (rows < global_blocks) | (rows >= nb - global_blocks)
    if is_global.any():  # global rows attend to every key
        q_rows = q.reshape(batch, heads, nb, block_size, d)[:, :, is_global].reshape(batch, heads, -1, d)
        dense = q_rows @ k.transpose(-1, -2) * scale
        if bias is not None:
            dense = dense + bias[:, None, None, :]
        dense = _softmax_or_zeros_torch(dense) @ v
        out[:, :, is_global] = dense.reshape(batch, heads, -1, block_size, d)
    out = out.reshape(batch, heads, n, d).to(query.dtype)
    return out.transpose(1, 2).reshape(batch, n, heads * d)


def _softmax_or_zeros_torch(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis; a row whose every score is -inf is 0/0 in softmax: zeros instead (NaN in the
    inputs still shows as NaN)."""
    dead = scores.amax(-1, keepdim=True) == float("-inf")
    return torch.softmax(scores, -1).masked_fill_(dead, 0.0)


def decompose(b: OnnxBuilder, inputs: list[str], outputs: list[str], attrs: dict) -> None:
    """Gather-based decomposition: memory O(N * m * block_size), never the dense N x N score matrix."""
    query, key, value, block_index = inputs[:4]
    key_bias = inputs[4] if len(inputs) > 4 and inputs[4] else ""
    heads, bs, g = attrs["num_heads"], attrs["block_size"], attrs["global_blocks"]
    q, k, v = (b.split_heads(t, heads) for t in (query, key, value))  # [B,H,N,D]
    dtype_ref = q
    # scores, softmax and sums in float32, as the reference: fp16 q.k of large activations overflows 65504
    q, k, v = (b.op("Cast", t, to=1) for t in (q, k, v))
    shape = b.op("Shape", q)
    head_dim = b.dim(shape, 3)
    scale = attrs["scale"]
    if scale:
        scale_t = b.const(scale, np.float32)
    else:
        scale_t = b.op("Reciprocal", b.op("Sqrt", b.op("Cast", head_dim, to=1)))

    blocked = b.op("Concat", b.dim(shape, 0), b.dim(shape, 1), b.const([-1, bs]), head_dim, axis=0)
    qb, kb, vb = (b.op("Reshape", t, blocked) for t in (q, k, v))  # [B,H,nb,bs,D]
    nb = b.dim(b.op("Shape", qb), 2)

    table = b.op("Cast", block_index, to=7)
    table = b.op("Expand", table, b.op("Concat", b.const([heads]), nb, b.const([1]), axis=0))  # [H,nb,m]
    m = b.dim(b.op("Shape", table), 2)
    valid = b.op("And", b.op("GreaterOrEqual", table, b.const(0)), b.op("Less", table, nb))
    if attrs["count_repeats"]:
        visible = valid  # every listed slot is its own set of keys in the softmax: repeats weigh r times
    else:
        same = b.op("Equal", b.unsqueeze(table, [-1]), b.unsqueeze(table, [-2]))  # [H,nb,m,m]
        ones = b.op("ConstantOfShape", b.op("Concat", m, m, axis=0),
                    value=numpy_helper.from_array(np.ones(1, np.int64)))
        earlier = b.op("Cast", b.op("Trilu", ones, b.const(-1), upper=0), to=9)
        dup = b.op("And", b.op("And", same, earlier), b.unsqueeze(valid, [-2]))
        dup_any = b.op("Cast", b.reduce("ReduceMax", b.op("Cast", dup, to=6), [-1], keepdims=0), to=9)
        visible = b.op("And", valid, b.op("Not", dup_any))  # [H,nb,m]

    # gather the listed key/value blocks through a flat (head, block) index
    # entries outside [0, nb) are not visible (masked below) but must still be gatherable
    clamped = b.op("Min", b.op("Max", table, b.const(0)), b.op("Sub", nb, b.const(1)))
    head_offset = b.op("Mul", b.const(np.arange(heads).reshape(heads, 1, 1)), nb)
    flat_index = b.op("Add", clamped, head_offset)
    flat_shape = b.op("Concat", b.dim(shape, 0), b.const([-1, bs]), head_dim, axis=0)
    gathered_shape = b.op("Concat", b.dim(shape, 0), b.dim(shape, 1), nb, b.const([-1]), head_dim, axis=0)
    # an invalid slot reads a zero key block appended after the H*nb real ones: its score is q.0 = 0, so the -inf
    # mask added below leaves exactly -inf there (a key it must not see never reaches the row, NaN or not); a
    # duplicate slot reads its block's own keys, whose scores the row already holds where they count
    k_flat = b.op("Reshape", kb, flat_shape)  # [B,H*nb,bs,D]
    zero_block = b.op("ConstantOfShape", b.op("Concat", b.dim(shape, 0), b.const([1, bs]), head_dim, axis=0),
                      value=numpy_helper.from_array(np.zeros(1, np.float32)))
    k_pool = b.op("Concat", k_flat, zero_block, axis=1)
    k_index = b.op("Where", valid, flat_index, b.op("Mul", b.const(heads), nb))
    kg = b.op("Reshape", b.op("Gather", k_pool, k_index, axis=1), gathered_shape)  # [B,H,nb,m*bs,D]
    vg = b.op("Reshape", b.op("Gather", b.op("Reshape", vb, flat_shape), flat_index, axis=1), gathered_shape)

    # the mask is additive (0 or -inf per slot, with the key bias folded in on the small gathered tensor): one Add
    # over the scores instead of a Where, which onnxruntime runs several times slower
    neg_inf = b.const(-np.inf, np.float32)
    slot_visible = b.unsqueeze(visible, [-1])  # [H,nb,m,1]
    if key_bias:
        kbias = b.op("Cast", key_bias, to=1)
        kbias_blocks = b.op("Reshape", kbias, b.op("Concat", b.dim(shape, 0), b.const([-1, bs]), axis=0))  # [B,nb,bs]
        gathered_bias = b.op("Gather", kbias_blocks, clamped, axis=1)  # [B,H,nb,m,bs]
        mask = b.op("Where", slot_visible, gathered_bias, neg_inf)
        mask_shape = b.op("Concat", b.dim(shape, 0), b.dim(shape, 1), nb, b.const([1, -1]), axis=0)
    else:
        mask = b.op("Where", slot_visible, b.const(0.0, np.float32), neg_inf)  # [H,nb,m,1]
        mask = b.op("Expand", mask, b.op("Concat", b.const([heads]), nb, m, b.const([bs]), axis=0))
        mask_shape = b.op("Concat", b.const([heads]), nb, b.const([1, -1]), axis=0)
    mask = b.op("Reshape", mask, mask_shape)  # [B or 1,H,nb,1,m*bs]
    scores = b.op("Add", b.op("Mul", b.op("MatMul", qb, b.transpose_last(kg, 5)), scale_t), mask)
    probs = b.op("Softmax", scores, axis=-1)  # [B,H,nb,bs,m*bs]
    out_blocks = _zero_dead_rows(b, scores, b.op("MatMul", probs, vg))  # [B,H,nb,bs,D]

    if g:
        # global rows attend densely to every key: rows [0, g) and [max(nb-g, g), nb)
        zero, g_t = b.const([0]), b.const([g])
        first_end = b.op("Min", g_t, nb)
        last_start = b.op("Max", b.op("Sub", nb, g_t), first_end)
        q_rows = b.op("Concat", b.op("Slice", qb, zero, first_end, b.const([2])),
                      b.op("Slice", qb, last_start, nb, b.const([2])), axis=2)
        rows_shape = b.op("Concat", b.dim(shape, 0), b.dim(shape, 1), b.const([-1]), head_dim, axis=0)
        q_rows = b.op("Reshape", q_rows, rows_shape)
        dense_scores = b.op("Mul", b.op("MatMul", q_rows, b.transpose_last(k, 4)), scale_t)
        if key_bias:  # a key bias of -inf can empty a global row too
            dense_scores = b.op("Add", dense_scores, b.unsqueeze(kbias, [1, 2]))
            dense = _zero_dead_rows(b, dense_scores, b.op("MatMul", b.op("Softmax", dense_scores, axis=-1), v))
        else:
            dense = b.op("MatMul", b.op("Softmax", dense_scores, axis=-1), v)  # every key visible: no empty row
        dense = b.op("Reshape", dense, blocked)  # [B,H,rows,bs,D]
        n_first = b.op("Shape", b.op("Slice", qb, zero, first_end, b.const([2])))
        dense_first = b.op("Slice", dense, zero, b.dim(n_first, 2), b.const([2]))
        dense_last = b.op("Slice", dense, b.dim(n_first, 2), b.const([np.iinfo(np.int64).max]), b.const([2]))
        middle = b.op("Slice", out_blocks, first_end, last_start, b.const([2]))
        out_blocks = b.op("Concat", dense_first, middle, dense_last, axis=2)

    b.merge_heads(b.op("CastLike", b.op("Reshape", out_blocks, b.op("Shape", q)), dtype_ref), outputs[0])


def _zero_dead_rows(b: OnnxBuilder, scores: str, out: str) -> str:
    """A row whose scores are all -inf (0/0 in softmax) outputs zeros; NaN from the inputs stays NaN. The row max
    tells (one read of the scores); the zeros are written on the output, O(N * D), not on the weights."""
    dead = b.op("Equal", b.reduce("ReduceMax", scores, [-1]), b.const(-np.inf, np.float32))
    return b.op("Where", dead, b.const(0.0, np.float32), out)


CONTRACT = OpContract(
    op_type="BlockSparseAttention",
    version=1,
    doc=__doc__,
    inputs=(
        TensorSpec("query", 3, FLOATS, "[B, N, H*D]"),
        TensorSpec("key", 3, FLOATS, "[B, N, H*D]"),
        TensorSpec("value", 3, FLOATS, "[B, N, H*D]"),
        TensorSpec("block_index", 3, ("int32",), "[H or 1, N/block_size, m] key blocks per query block; <0 = none"),
        TensorSpec("key_bias", 2, FLOATS, "[B, N] additive to every score of key j; -inf masks the key",
                   optional=True),
    ),
    outputs=(TensorSpec("output", 3, FLOATS, "[B, N, H*D]"),),
    attributes=(
        Attribute("num_heads", "int", 1, "H: the last axis of query/key/value is H*D"),
        Attribute("block_size", "int", 64, "tokens per block; N must be a multiple"),
        Attribute("scale", "float", 0.0, "score scale; 0 means 1/sqrt(D)"),
        Attribute("global_blocks", "int", 0, "the first and the last this-many query blocks attend to all keys"),
        Attribute("count_repeats", "int", 0, "1: a key block listed r times in a row weighs r times (HF BigBird)"),
    ),
    reference=reference,
    decompose=decompose,
    output_shapes=shape_of_first_input,
)
