"""KernelizedAttention: kernelized attention phi(Q) (phi(K)^T V), normalised or not, causal or not (family K3).

Per head, with feature maps phi:
  non-causal: out_i = phi(q_i) . sum_j phi(k_j) v_j^T  /  phi(q_i) . sum_j phi(k_j)        (normalize=1)
  causal:     the sums run over j <= i (computed as chunked prefix sums, exact).
Without normalisation the division is dropped. A zero denominator gives a zero row, never NaN.

Feature maps (`feature_map`):
  favor_positive  Performer FAVOR+ positive random features with projection W [M, D] (input 4):
                  x' = x * sqrt(scale) (scale 0 means 1/sqrt(D)),
                  phi(x) = M^-1/2 * (exp(W x' - |x'|^2/2 - c) + eps).
                  `stabilizer` names what c is the max of: logits (W x' - |x'|^2/2) or projection (W x' alone, as
                  performer-pytorch subtracts). Queries use c = max over features per token. Keys use c = max over
                  features and positions per (batch, head) when non-causal; when causal (logits only), c =
                  max_r |w_r|^2 / 2 (a bound on W x' - |x'|^2/2 that never reads future tokens). Shifts cancel in the
                  normalised output except through eps, and there the two stabilisers differ: with projection the
                  query's exp term carries exp(-|x'|^2/2), so eps dominates large-norm queries.
  elu_plus_one    phi(x) = elu(x) + 1
  identity        phi(x) = x
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .contract import Attribute, OpContract, TensorSpec, query_rows_value_width, split_heads
from .onnx_builder import OnnxBuilder

FLOATS = ("float32", "float16", "bfloat16")
FEATURE_MAPS = ("favor_positive", "elu_plus_one", "identity")
STABILIZERS = ("logits", "projection")
CHUNK = 64  # causal prefix chunk used by the decomposition; the result does not depend on it


def _check_stabilizer(stabilizer, causal):
    if stabilizer not in STABILIZERS:
        raise ValueError(f"unknown stabilizer {stabilizer!r}")
    if causal and stabilizer != "logits":  # a max over positions would read future keys
        raise ValueError("stabilizer 'projection' is defined for causal=0 only")


def feature_maps(q, k, projection, feature_map, scale, eps, causal, stabilizer="logits"):
    """phi(q), phi(k) for [B, H, N, D] inputs, computed in float32."""
    q, k = q.float(), k.float()
    if feature_map == "identity":
        return q, k
    if feature_map == "elu_plus_one":
        return torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    if feature_map != "favor_positive":
        raise ValueError(f"unknown feature_map {feature_map!r}")
    _check_stabilizer(stabilizer, causal)
    w = projection.float()
    d, m = q.shape[-1], w.shape[0]
    root_scale = math.sqrt(scale or 1.0 / math.sqrt(d))

    def logits(x):  # (W x' - |x'|^2/2, W x')
        x = x * root_scale
        projected = x @ w.t()
        return projected - (x * x).sum(-1, keepdim=True) / 2, projected

    (lq, pq), (lk, pk) = logits(q), logits(k)
    sq, sk = (lq, lk) if stabilizer == "logits" else (pq, pk)
    cq = sq.amax(-1, keepdim=True)
    ck = (w * w).sum(-1).max() / 2 if causal else sk.amax((-2, -1), keepdim=True)
    return (torch.exp(lq - cq) + eps) / math.sqrt(m), (torch.exp(lk - ck) + eps) / math.sqrt(m)


def reference(query, key, value, projection=None, *, num_heads=1, feature_map="favor_positive", causal=0,
              normalize=1, scale=0.0, eps=1e-6, stabilizer="logits"):
    q, k, v = (split_heads(t, num_heads) for t in (query, key, value))
    phi_q, phi_k = feature_maps(q, k, projection, feature_map, scale, eps, causal, stabilizer)
    v = v.float()
    if causal:  # plain masked quadratic form: the definition, not the fast path
        a = (phi_q @ phi_k.transpose(-1, -2)).tril()
        num, den = a @ v, a.sum(-1, keepdim=True)
    else:
        num = phi_q @ (phi_k.transpose(-1, -2) @ v)
        den = phi_q @ phi_k.sum(-2).unsqueeze(-1)
    out = num / (den + (den == 0)) if normalize else num
    b, h, n, d = out.shape
    return out.to(query.dtype).transpose(1, 2).reshape(b, n, h * d)


def decompose(b: OnnxBuilder, inputs: list[str], outputs: list[str], attrs: dict) -> None:
    query, key, value = inputs[:3]
    projection = inputs[3] if len(inputs) > 3 else ""
    q, k, v = (b.split_heads(t, attrs["num_heads"]) for t in (query, key, value))
    dtype_ref = q
    q, k, v = (b.op("Cast", t, to=1) for t in (q, k, v))  # features and sums in float32
    phi_q, phi_k = _features(b, q, k, projection, attrs)
    if attrs["causal"]:
        num, den = _causal_sums(b, phi_q, phi_k, v)
    else:
        kv = b.op("MatMul", b.transpose_last(phi_k, 4), v)  # [B,H,M,D]
        num = b.op("MatMul", phi_q, kv)
        if attrs["normalize"]:
            k_sum = b.transpose_last(b.reduce("ReduceSum", phi_k, [2]), 4)  # [B,H,M,1]
            den = b.op("MatMul", phi_q, k_sum)
    if attrs["normalize"]:
        zero = b.op("Cast", b.op("Equal", den, b.const(0.0, np.float32)), to=1)
        num = b.op("Div", num, b.op("Add", den, zero))
    b.merge_heads(b.op("CastLike", num, dtype_ref), outputs[0], attrs["num_heads"])


def _features(b: OnnxBuilder, q: str, k: str, projection: str, attrs: dict):
    fmap = attrs["feature_map"]
    if fmap == "identity":
        return q, k
    if fmap == "elu_plus_one":
        one = b.const(1.0, np.float32)
        return b.op("Add", b.op("Elu", q), one), b.op("Add", b.op("Elu", k), one)
    if fmap != "favor_positive":
        raise ValueError(f"unknown feature_map {fmap!r}")
    _check_stabilizer(attrs["stabilizer"], attrs["causal"])
    w = b.op("Cast", projection, to=1)  # [M, D]
    m = b.op("Cast", b.dim(b.op("Shape", w), 0), to=1)
    if attrs["scale"]:
        root_scale = b.const(math.sqrt(attrs["scale"]), np.float32)
    else:  # D^-1/4
        d = b.op("Cast", b.dim(b.op("Shape", q), 3), to=1)
        root_scale = b.op("Pow", d, b.const(-0.25, np.float32))
    w_t = b.op("Transpose", w, perm=[1, 0])
    half = b.const(0.5, np.float32)

    def logits(x):  # (W x' - |x'|^2/2, W x')
        x = b.op("Mul", x, root_scale)
        projected = b.op("MatMul", x, w_t)
        return b.op("Sub", projected, b.op("Mul", b.reduce("ReduceSum", b.op("Mul", x, x), [-1]), half)), projected

    (lq, pq), (lk, pk) = logits(q), logits(k)
    sq, sk = (lq, lk) if attrs["stabilizer"] == "logits" else (pq, pk)
    cq = b.reduce("ReduceMax", sq, [-1])
    if attrs["causal"]:
        ck = b.op("Mul", b.reduce("ReduceMax", b.reduce("ReduceSum", b.op("Mul", w, w), [-1]), [0], keepdims=0), half)
    else:
        ck = b.reduce("ReduceMax", sk, [-2, -1])
    eps = b.const(attrs["eps"], np.float32)
    norm = b.op("Sqrt", m)
    phi_q = b.op("Div", b.op("Add", b.op("Exp", b.op("Sub", lq, cq)), eps), norm)
    phi_k = b.op("Div", b.op("Add", b.op("Exp", b.op("Sub", lk, ck)), eps), norm)
    return phi_q, phi_k


def _causal_sums(b: OnnxBuilder, phi_q: str, phi_k: str, v: str):
    """Exact causal sums in chunks of CHUNK tokens: masked quadratic inside a chunk, exclusive prefix across."""
    shape = b.op("Shape", v)
    n = b.dim(shape, 2)
    c = b.const([CHUNK])
    pad = b.op("Mod", b.op("Sub", c, b.op("Mod", n, c)), c)
    # pads for [B,H,N,X]: begin (0,0,0,0), end (0,0,pad,0); padded keys come after every real query, so they
    # never reach a real row
    pads = b.op("Concat", b.const([0, 0, 0, 0, 0, 0]), pad, b.const([0]), axis=0)
    phi_q, phi_k, v = (b.op("Pad", t, pads) for t in (phi_q, phi_k, v))

    def chunked(x):
        s = b.op("Shape", x)
        return b.op("Reshape", x, b.op("Concat", b.dim(s, 0), b.dim(s, 1), b.const([-1, CHUNK]), b.dim(s, 3), axis=0))

    qc, kc, vc = chunked(phi_q), chunked(phi_k), chunked(v)  # [B,H,G,C,X]
    tril = b.const(np.tril(np.ones((CHUNK, CHUNK), np.float32)), np.float32)
    a = b.op("Mul", b.op("MatMul", qc, b.transpose_last(kc, 5)), tril)  # [B,H,G,C,C]
    num = b.op("MatMul", a, vc)
    den = b.reduce("ReduceSum", a, [-1])  # [B,H,G,C,1]
    states = b.op("MatMul", b.transpose_last(kc, 5), vc)  # [B,H,G,M,D]
    k_sums = b.transpose_last(b.reduce("ReduceSum", kc, [-2]), 5)  # [B,H,G,M,1]
    axis = b.const(2)
    prefix_states = b.op("CumSum", states, axis, exclusive=1)
    prefix_sums = b.op("CumSum", k_sums, axis, exclusive=1)
    num = b.op("Add", num, b.op("MatMul", qc, prefix_states))
    den = b.op("Add", den, b.op("MatMul", qc, prefix_sums))

    def unchunked(x):
        s = b.op("Shape", x)
        full = b.op("Reshape", x, b.op("Concat", b.dim(s, 0), b.dim(s, 1), b.const([-1]), b.dim(s, 4), axis=0))
        return b.op("Slice", full, b.const([0]), n, b.const([2]))

    return unchunked(num), unchunked(den)


CONTRACT = OpContract(
    op_type="KernelizedAttention",
    version=1,
    doc=__doc__,
    inputs=(
        TensorSpec("query", 3, FLOATS, "[B, N, H*D]"),
        TensorSpec("key", 3, FLOATS, "[B, N, H*D]"),
        TensorSpec("value", 3, FLOATS, "[B, N, H*Dv]"),
        TensorSpec("projection", 2, FLOATS, "[M, D] random-feature matrix (favor_positive only)", optional=True),
    ),
    outputs=(TensorSpec("output", 3, FLOATS, "[B, N, H*Dv]"),),
    attributes=(
        Attribute("num_heads", "int", 1, "H: the last axis of query/key is H*D, of value H*Dv"),
        Attribute("feature_map", "string", "favor_positive", "one of " + ", ".join(FEATURE_MAPS),
                  options=FEATURE_MAPS),
        Attribute("causal", "int", 0, "1: token i sees keys j <= i"),
        Attribute("normalize", "int", 1, "1: divide by phi(q) . sum phi(k)"),
        Attribute("scale", "float", 0.0, "favor_positive softmax temperature; 0 means 1/sqrt(D)"),
        Attribute("eps", "float", 1e-6, "favor_positive feature stabiliser added after exp"),
        Attribute("stabilizer", "string", "logits", "favor_positive: what the subtracted max is taken of, one of "
                  + ", ".join(STABILIZERS) + " (projection: causal=0 only)", options=STABILIZERS),
    ),
    reference=reference,
    decompose=decompose,
    output_shapes=query_rows_value_width,
)
