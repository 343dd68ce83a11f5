"""DenseAttention: softmax attention with an optional additive bias (kernel family K1).

Per head: out = softmax(scale * q.k^T + bias [+ causal mask]) v, in float32 statistics.
  - q and k share a head dim D; v may have its own head dim Dv (MGK's augmented keys: D = Dq + 2).
  - bias (optional) is additive and broadcasts as [B or 1, H or 1, Nq, Nk]; -inf entries mask keys.
  - causal=1 masks key j for query i when j > i + (Nk - Nq) (the last query sees every key).
  - scale 0 means 1/sqrt(D). A row with no visible key outputs zeros, never NaN.
Covers ViT, Switch's attention, MGK (one softmax over 2N augmented keys), Evolving Attention (the evolved map
as bias), Treeformer TC, and standard attention written any other way.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from onnx import numpy_helper

from .contract import Attribute, OpContract, TensorSpec, query_rows_value_width, split_heads
from .onnx_builder import OnnxBuilder

FLOATS = ("float32", "float16", "bfloat16")


def reference(query, key, value, bias=None, *, num_heads=1, scale=0.0, causal=0):
    q, k, v = (split_heads(t, num_heads).float() for t in (query, key, value))
    nq, nk = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-1, -2)) * (scale or 1.0 / math.sqrt(q.shape[-1]))
    if bias is not None:
        scores = scores + bias.float()
    if causal:
        future = torch.ones(nq, nk, dtype=torch.bool, device=q.device).triu(nk - nq + 1)
        scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    out = probs @ v
    b, h, n, dv = out.shape
    return out.to(query.dtype).transpose(1, 2).reshape(b, n, h * dv)


def decompose(b: OnnxBuilder, inputs: list[str], outputs: list[str], attrs: dict) -> None:
    query, key, value = inputs[:3]
    bias = inputs[3] if len(inputs) > 3 and inputs[3] else ""
    q, k, v = (b.split_heads(t, attrs["num_heads"]) for t in (query, key, value))  # [B,H,N,D]
    qf, kf, vf = (b.op("Cast", t, to=1) for t in (q, k, v))  # float32 statistics
    if attrs["scale"]:
        scale = b.const(attrs["scale"], np.float32)
    else:
        head_dim = b.op("Cast", b.dim(b.op("Shape", qf), 3), to=1)
        scale = b.op("Reciprocal", b.op("Sqrt", head_dim))
    scores = b.op("MatMul", b.op("Mul", qf, scale), b.transpose_last(kf, 4))  # scaling q: N*D products, not N*N
    if bias:
        scores = b.op("Add", scores, b.op("Cast", bias, to=1))
    if attrs["causal"]:
        shape = b.op("Shape", scores)
        nq, nk = b.dim(shape, 2), b.dim(shape, 3)
        ones = b.op("ConstantOfShape", b.op("Concat", nq, nk, axis=0),
                    value=numpy_helper.from_array(np.ones(1, np.int64)))
        future = b.op("Cast", b.op("Trilu", ones, b.op("Add", b.op("Sub", nk, nq), b.const([1])), upper=1), to=9)
        scores = b.op("Where", future, b.const(-np.inf, np.float32), scores)
    probs = b.op("Softmax", scores, axis=-1)
    if bias or attrs["causal"]:  # only a mask can hide every key of a row; such a row gives zeros, not NaN
        probs = b.op("Where", b.op("IsNaN", probs), b.const(0.0, np.float32), probs)
    out = b.op("CastLike", b.op("MatMul", probs, vf), q)
    b.merge_heads(out, outputs[0])


CONTRACT = OpContract(
    op_type="DenseAttention",
    version=1,
    doc=__doc__,
    inputs=(
        TensorSpec("query", 3, FLOATS, "[B, Nq, H*D]"),
        TensorSpec("key", 3, FLOATS, "[B, Nk, H*D]"),
        TensorSpec("value", 3, FLOATS, "[B, Nk, H*Dv]"),
        TensorSpec("bias", 4, FLOATS, "[B or 1, H or 1, Nq, Nk] additive; -inf masks a key", optional=True),
    ),
    outputs=(TensorSpec("output", 3, FLOATS, "[B, Nq, H*Dv]"),),
    attributes=(
        Attribute("num_heads", "int", 1, "H: the last axis of query/key is H*D, of value H*Dv"),
        Attribute("scale", "float", 0.0, "score scale; 0 means 1/sqrt(D)"),
        Attribute("causal", "int", 0, "1: query i sees keys j <= i + Nk - Nq"),
    ),
    reference=reference,
    decompose=decompose,
    output_shapes=query_rows_value_width,
)
