"""DisentangledAttention: DeBERTa's content + relative-position attention (kernel family K4).

Per head, with relative index delta(i, j) = clamp(bucket(i - j) + span, 0, 2*span - 1):
  score_ij = scale * ( q_i.k_j                           content-to-content
                     + c2p * q_i.rel_key[delta(i, j)]    content-to-position
                     + p2c * k_j.rel_query[delta(i, j)]) position-to-content (the official code's index)
             + bias_ij                                    optional, [B|1, H|1, Nq|1, Nk], additive; -inf masks
  out = softmax_j(score) v; a row whose every score is -inf gives zeros, or with masked_rows "mean" the mean of
  the values (HF DeBERTa masks with masked_fill(finfo.min), so its padded query rows are uniform).
rel_key / rel_query are the projected relative embeddings [2*span, H*D] (DeBERTa-v2: key_proj(P), query_proj(P));
a table whose term is switched off (c2p=0 / p2c=0) is not read.
bucket(r) is transformers' DeBERTa-v2 make_log_bucket_position when max_position > 0 (no clamp of r first, so
distances past max_position give buckets beyond span - 1, which the clamp of delta then pins to the last row):
r if |r| <= span/2, else sign(r) * (span/2 + ceil(log(|r| / (span/2)) / log((max_position - 1) / (span/2)) *
(span/2 - 1))), in float32 arithmetic as transformers computes it (logs correctly rounded);
max_position = 0 means bucket(r) = r (DeBERTa v1). scale 0 means 1/sqrt((1 + c2p + p2c) D), DeBERTa's.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .contract import Attribute, OpContract, TensorSpec, shape_of_first_input, split_heads
from .dense_attention import JoinedValues, guarded_product, masked_row_weights
from .onnx_builder import OnnxBuilder

FLOATS = ("float32", "float16", "bfloat16")
MASKED_ROWS = ("zeros", "mean")  # not DenseAttention's "none": no pass proves DeBERTa's scores finite


def log_denominator(span: int, max_position: int) -> np.float32:
    """log((max_position - 1) / mid) as transformers computes it: the ratio and its log in float32."""
    return np.float32(math.log(np.float32((max_position - 1) / (span // 2))))


def log_bucket(relative: torch.Tensor, span: int, max_position: int) -> torch.Tensor:
    """transformers' DeBERTa-v2 make_log_bucket_position on an integer tensor, in its float32 arithmetic (the log
    taken in double and rounded, i.e. correctly rounded, which the kernel does too)."""
    mid = span // 2
    sign = torch.sign(relative)
    inside = (relative < mid) & (relative > -mid)
    magnitude = torch.where(inside, torch.full_like(relative, mid - 1), relative.abs())
    ratio = (magnitude.float() / mid).double().log().float()
    denominator = torch.tensor(log_denominator(span, max_position))
    log_position = torch.ceil(ratio / denominator * (mid - 1)) + mid
    return torch.where(magnitude <= mid, relative, (log_position * sign).long())


def relative_index(nq: int, nk: int, span: int, max_position: int, device=None) -> torch.Tensor:
    """delta [Nq, Nk]: the row of rel_key / rel_query that query i and key j read."""
    relative = torch.arange(nq, device=device)[:, None] - torch.arange(nk, device=device)[None]
    if max_position > 0:
        relative = log_bucket(relative, span, max_position)
    return (relative + span).clamp(0, 2 * span - 1)


def default_scale(head_dim: int, c2p: int, p2c: int) -> float:
    return 1.0 / math.sqrt((1 + int(bool(c2p)) + int(bool(p2c))) * head_dim)


def reference(query, key, value, rel_key, rel_query, bias=None, *, num_heads=1, span=256, max_position=512,
              scale=0.0, c2p=1, p2c=1, masked_rows="zeros"):
    q, k, v = (split_heads(t, num_heads).float() for t in (query, key, value))
    heads, d = q.shape[1], q.shape[-1]
    delta = relative_index(q.shape[2], k.shape[2], span, max_position, q.device)
    scores = q @ k.transpose(-1, -2)
    if c2p:
        kr = rel_key.float().reshape(rel_key.shape[0], heads, d).transpose(0, 1)  # [H, 2s, D]
        scores = scores + torch.gather(q @ kr.transpose(-1, -2), -1, delta.expand(*q.shape[:2], -1, -1))
    if p2c:
        qr = rel_query.float().reshape(rel_query.shape[0], heads, d).transpose(0, 1)
        scores = scores + torch.gather(k @ qr.transpose(-1, -2), -1,
                                       delta.t().expand(*k.shape[:2], -1, -1)).transpose(-1, -2)
    scores = scores * (scale or default_scale(d, c2p, p2c))
    if bias is not None:
        scores = scores + bias.float()
    if bias is None and masked_rows == "zeros":
        weights = torch.softmax(scores, -1)  # nothing is masked: today's plain softmax
    else:
        weights = masked_row_weights(scores, masked_rows)
    out = weights @ v
    b, h, n, _ = out.shape
    return out.to(query.dtype).transpose(1, 2).reshape(b, n, h * d)


def decompose(b: OnnxBuilder, inputs: list[str], outputs: list[str], attrs: dict) -> None:
    query, key, value, rel_key, rel_query = inputs[:5]
    bias = inputs[5] if len(inputs) > 5 and inputs[5] else ""
    heads, span, max_position = attrs["num_heads"], attrs["span"], attrs["max_position"]
    q, k, v = (b.op("Cast", b.split_heads(t, heads), to=1) for t in (query, key, value))  # [B,H,N,D] float32
    shape_q, shape_k = b.op("Shape", q), b.op("Shape", k)
    delta = _relative_index(b, b.dim(shape_q, 2), b.dim(shape_k, 2), span, max_position)  # [Nq, Nk]
    # one [B, H, Nq, Nk] index for both terms
    index = b.op("Expand", delta, b.op("Concat", b.dim(shape_q, 0), b.dim(shape_q, 1), b.op("Shape", delta), axis=0))
    k_t = b.transpose_last(k, 4)
    scores = b.op("MatMul", q, k_t)

    def table(t):  # [2*span, H*D] -> [H, 2*span, D]
        return b.op("Transpose", b.op("Reshape", b.op("Cast", t, to=1), b.const([0, heads, -1])), perm=[1, 0, 2])

    if attrs["c2p"]:  # q_i . rel_key[delta(i, j)]: row i of q rel_key^T [B,H,Nq,2s], column delta(i, j)
        c2p = b.op("GatherElements", b.op("MatMul", q, b.transpose_last(table(rel_key), 3)), index, axis=3)
        scores = b.op("Add", scores, c2p)
    if attrs["p2c"]:  # k_j . rel_query[delta(i, j)]: column j of rel_query k^T [B,H,2s,Nk], row delta(i, j)
        p2c = b.op("GatherElements", b.op("MatMul", table(rel_query), k_t), index, axis=2)
        scores = b.op("Add", scores, p2c)
    if attrs["scale"]:
        scale = b.const(attrs["scale"], np.float32)
    else:
        terms = 1 + int(bool(attrs["c2p"])) + int(bool(attrs["p2c"]))
        scale = b.op("Reciprocal", b.op("Sqrt", b.op("Mul", b.op("Cast", b.dim(shape_q, 3), to=1),
                                                      b.const([float(terms)], np.float32))))
    scores = b.op("Mul", scores, scale)
    if bias:
        scores = b.op("Add", scores, b.op("Cast", bias, to=1))
    probs = b.op("Softmax", scores, axis=-1)
    out = guarded_product(b, scores, probs, JoinedValues(v), attrs["masked_rows"]) if bias else b.op("MatMul", probs, v)
    b.merge_heads(b.op("CastLike", out, b.split_heads(query, heads)), outputs[0])


def _relative_index(b: OnnxBuilder, nq: str, nk: str, span: int, max_position: int) -> str:
    """delta [Nq, Nk] built from Range, so it follows a dynamic length (the same integer rule as relative_index).
    The bucket depends on i - j only: it is computed once per distance (L = Nq + Nk - 1 of them) and laid out as
    the Toeplitz matrix by copies alone, six times faster on onnxruntime than gathering it per pair."""
    one = b.const(1)
    nq, nk = b.op("Squeeze", nq), b.op("Squeeze", nk)
    # every i - j, from Nq - 1 down to -(Nk - 1): w[m] is the row for i - j = Nq - 1 - m
    relative = b.op("Range", b.op("Sub", nq, one), b.op("Neg", nk), b.const(-1))
    if max_position > 0:
        # make_log_bucket_position in float32, as transformers computes it
        mid = span // 2
        sign = b.op("Sign", relative)
        magnitude = b.op("Abs", relative)
        inside = b.op("Less", magnitude, b.const(mid))
        magnitude = b.op("Where", inside, b.const(mid - 1), magnitude)
        # the log in double, rounded to float32 (correctly rounded, as the reference and the kernel take it)
        scaled = b.op("Div", b.op("Cast", magnitude, to=1), b.const(float(mid), np.float32))
        ratio = b.op("Div", b.op("Cast", b.op("Log", b.op("Cast", scaled, to=11)), to=1),
                     b.const(log_denominator(span, max_position), np.float32))
        log_position = b.op("Add", b.op("Ceil", b.op("Mul", ratio, b.const(float(mid - 1), np.float32))),
                            b.const(float(mid), np.float32))
        bucketed = b.op("Mul", b.op("Cast", log_position, to=7), sign)
        relative = b.op("Where", b.op("LessOrEqual", magnitude, b.const(mid)), relative, bucketed)
    w = b.op("Clip", b.op("Add", relative, b.const(span)), b.const(0), b.const(2 * span - 1))
    # delta[i, j] = w[Nq - 1 - i + j]. w plus one spare entry, repeated Nq times and read in rows of L: row i
    # starts i entries further back in w (L = len(w') - 1), so column Nq - 1 + j of row i is w[Nq - 1 - i + j]
    distances = b.op("Sub", b.op("Add", nq, nk), one)  # L
    padded = b.op("Concat", w, b.const([0]), axis=0)
    repeated = b.op("Tile", padded, b.unsqueeze(nq, [0]))
    rows = b.op("Reshape", b.op("Slice", repeated, b.const([0]), b.unsqueeze(b.op("Mul", nq, distances), [0])),
                b.op("Concat", b.unsqueeze(nq, [0]), b.unsqueeze(distances, [0]), axis=0))
    return b.op("Slice", rows, b.unsqueeze(b.op("Sub", nq, one), [0]), b.unsqueeze(distances, [0]), b.const([1]))


CONTRACT = OpContract(
    op_type="DisentangledAttention",
    version=1,
    doc=__doc__,
    inputs=(
        TensorSpec("query", 3, FLOATS, "[B, N, H*D]"),
        TensorSpec("key", 3, FLOATS, "[B, N, H*D]"),
        TensorSpec("value", 3, FLOATS, "[B, N, H*D]"),
        TensorSpec("rel_key", 2, FLOATS, "[2*span, H*D] projected relative embeddings for content-to-position"),
        TensorSpec("rel_query", 2, FLOATS, "[2*span, H*D] projected relative embeddings for position-to-content"),
        TensorSpec("bias", 4, FLOATS, "[B or 1, H or 1, Nq or 1, Nk] additive; -inf masks a key", optional=True),
    ),
    outputs=(TensorSpec("output", 3, FLOATS, "[B, N, H*D]"),),
    attributes=(
        Attribute("num_heads", "int", 1, "H"),
        Attribute("span", "int", 256, "k: relative positions (or buckets) per side; tables have 2k rows"),
        Attribute("max_position", "int", 512, "log-bucket range L; 0 means no bucketing (v1)"),
        Attribute("scale", "float", 0.0, "score scale; 0 means 1/sqrt((1 + c2p + p2c) D)"),
        Attribute("c2p", "int", 1, "1: add the content-to-position term"),
        Attribute("p2c", "int", 1, "1: add the position-to-content term"),
        Attribute("masked_rows", "string", "zeros", "a row with every score -inf: zeros, or mean (of the values)",
                  options=MASKED_ROWS),
    ),
    reference=reference,
    decompose=decompose,
    output_shapes=shape_of_first_input,
)
