"""DisentangledAttention: DeBERTa's content + relative-position attention (kernel family K4).

Per head, with relative index delta(i, j) = clamp(bucket(i - j) + span, 0, 2*span - 1):
  score_ij = scale * ( q_i.k_j                     content-to-content
                     + q_i.rel_key[delta(i, j)]    content-to-position
                     + k_j.rel_query[delta(i, j)]) position-to-content (the official code's index, not the paper's)
  out = softmax_j(score) v.
rel_key / rel_query are the projected relative embeddings [2*span, H*D] (DeBERTa-v2: key_proj(P), query_proj(P)).
bucket(r) is DeBERTa-v2's log bucket when max_position > 0: with r first clamped to +-(max_position - 1) (as the
official code does, so buckets stay within +-(span - 1)), r if |r| <= span/2, else
sign(r) * (span/2 + ceil(log(|r| / (span/2)) / log((max_position - 1) / (span/2)) * (span/2 - 1)));
max_position = 0 means bucket(r) = r (DeBERTa v1). scale 0 means 1/sqrt(3 D).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .contract import Attribute, OpContract, TensorSpec, shape_of_first_input, split_heads
from .onnx_builder import OnnxBuilder

FLOATS = ("float32", "float16", "bfloat16")


def log_bucket(relative: torch.Tensor, span: int, max_position: int) -> torch.Tensor:
    """DeBERTa-v2's make_log_bucket_position on an integer tensor."""
    mid = span // 2
    relative = relative.clamp(-(max_position - 1), max_position - 1)
    sign = torch.sign(relative)
    inside = (relative < mid) & (relative > -mid)
    magnitude = torch.where(inside, torch.full_like(relative, mid - 1), relative.abs()).double()
    log_position = torch.ceil(torch.log(magnitude / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    return torch.where(magnitude <= mid, relative, (log_position * sign).long())


def relative_index(nq: int, nk: int, span: int, max_position: int, device=None) -> torch.Tensor:
    """delta [Nq, Nk]: the row of rel_key / rel_query that query i and key j read."""
    relative = torch.arange(nq, device=device)[:, None] - torch.arange(nk, device=device)[None]
    if max_position > 0:
        relative = log_bucket(relative, span, max_position)
    return (relative + span).clamp(0, 2 * span - 1)


def reference(query, key, value, rel_key, rel_query, *, num_heads=1, span=256, max_position=512, scale=0.0):
    q, k, v = (split_heads(t, num_heads).float() for t in (query, key, value))
    heads, d = q.shape[1], q.shape[-1]
    kr, qr = (t.float().reshape(t.shape[0], heads, d).transpose(0, 1) for t in (rel_key, rel_query))  # [H,2s,D]
    delta = relative_index(q.shape[2], k.shape[2], span, max_position, q.device)
    c2p = torch.gather(q @ kr.transpose(-1, -2), -1, delta.expand(*q.shape[:2], -1, -1))  # [B,H,Nq,Nk]
    p2c = torch.gather(k @ qr.transpose(-1, -2), -1, delta.t().expand(*k.shape[:2], -1, -1)).transpose(-1, -2)
    scores = (q @ k.transpose(-1, -2) + c2p + p2c) * (scale or 1.0 / math.sqrt(3 * d))
    out = torch.softmax(scores, -1) @ v
    b, h, n, _ = out.shape
    return out.to(query.dtype).transpose(1, 2).reshape(b, n, h * d)


def decompose(b: OnnxBuilder, inputs: list[str], outputs: list[str], attrs: dict) -> None:
    query, key, value, rel_key, rel_query = inputs
    heads, span, max_position = attrs["num_heads"], attrs["span"], attrs["max_position"]
    q, k, v = (b.op("Cast", b.split_heads(t, heads), to=1) for t in (query, key, value))  # [B,H,N,D] float32
    kr, qr = (b.op("Transpose", b.op("Reshape", b.op("Cast", t, to=1), b.const([0, heads, -1])), perm=[1, 0, 2])
              for t in (rel_key, rel_query))  # [H, 2*span, D]
    shape_q, shape_k = b.op("Shape", q), b.op("Shape", k)
    delta = _relative_index(b, b.dim(shape_q, 2), b.dim(shape_k, 2), span, max_position)  # [Nq, Nk]
    bh = b.op("Concat", b.dim(shape_q, 0), b.dim(shape_q, 1), axis=0)
    c2p = b.op("GatherElements", b.op("MatMul", q, b.transpose_last(kr, 3)),
               b.op("Expand", delta, b.op("Concat", bh, b.op("Shape", delta), axis=0)), axis=3)
    delta_t = b.op("Transpose", delta, perm=[1, 0])
    p2c = b.op("GatherElements", b.op("MatMul", k, b.transpose_last(qr, 3)),
               b.op("Expand", delta_t, b.op("Concat", bh, b.op("Shape", delta_t), axis=0)), axis=3)
    scores = b.op("Add", b.op("Add", b.op("MatMul", q, b.transpose_last(k, 4)), c2p), b.transpose_last(p2c, 4))
    if attrs["scale"]:
        scale = b.const(attrs["scale"], np.float32)
    else:
        scale = b.op("Reciprocal", b.op("Sqrt", b.op("Mul", b.op("Cast", b.dim(shape_q, 3), to=1),
                                                      b.const([3.0], np.float32))))
    probs = b.op("Softmax", b.op("Mul", scores, scale), axis=-1)
    b.merge_heads(b.op("CastLike", b.op("MatMul", probs, v), b.split_heads(query, heads)), outputs[0])


def _relative_index(b: OnnxBuilder, nq: str, nk: str, span: int, max_position: int) -> str:
    """delta [Nq, Nk] built from Range, so it follows a dynamic length (the same integer rule as relative_index)."""
    zero, one = b.const(0), b.const(1)
    rows = b.op("Range", zero, b.op("Squeeze", nq), one)
    cols = b.op("Range", zero, b.op("Squeeze", nk), one)
    relative = b.op("Sub", b.unsqueeze(rows, [1]), b.unsqueeze(cols, [0]))  # int64
    if max_position > 0:
        mid = span // 2
        relative = b.op("Clip", relative, b.const(-(max_position - 1)), b.const(max_position - 1))
        as_float = b.op("Cast", relative, to=11)  # double, as the reference
        sign = b.op("Sign", as_float)
        magnitude = b.op("Abs", as_float)
        inside = b.op("Less", magnitude, b.const(float(mid), np.float64))
        magnitude = b.op("Where", inside, b.const(float(mid - 1), np.float64), magnitude)
        ratio = b.op("Div", b.op("Log", b.op("Div", magnitude, b.const(float(mid), np.float64))),
                     b.const(math.log((max_position - 1) / mid), np.float64))
        log_position = b.op("Add", b.op("Ceil", b.op("Mul", ratio, b.const(float(mid - 1), np.float64))),
                            b.const(float(mid), np.float64))
        bucketed = b.op("Cast", b.op("Mul", log_position, sign), to=7)
        relative = b.op("Where", b.op("LessOrEqual", magnitude, b.const(float(mid), np.float64)), relative, bucketed)
    shifted = b.op("Add", relative, b.const(span))
    return b.op("Clip", shifted, b.const(0), b.const(2 * span - 1))


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
    ),
    outputs=(TensorSpec("output", 3, FLOATS, "[B, N, H*D]"),),
    attributes=(
        Attribute("num_heads", "int", 1, "H"),
        Attribute("span", "int", 256, "k: relative positions (or buckets) per side; tables have 2k rows"),
        Attribute("max_position", "int", 512, "log-bucket range L; 0 means no bucketing (v1)"),
        Attribute("scale", "float", 0.0, "score scale; 0 means 1/sqrt(3 D)"),
    ),
    reference=reference,
    decompose=decompose,
    output_shapes=shape_of_first_input,
)
