"""DenseAttention: softmax attention with an optional additive bias (kernel family K1).

Per head: out = weights(scale * q.k^T + bias [+ causal mask]) v, in float32 statistics.
  - q and k share a head dim D; v may have its own head dim Dv (MGK's augmented keys: D = Dq + 2).
  - bias (optional) is additive and broadcasts as [B or 1, H or 1, Nq or 1, Nk] (a padding mask is [B, 1, 1, Nk]);
    -inf entries mask keys.
  - causal=1 masks key j for query i when j > i + (Nk - Nq) (the last query sees every key).
  - scale 0 means 1/sqrt(D). A row with no visible key (every score -inf) outputs zeros with masked_rows "zeros",
    and the mean of all Nk values with masked_rows "mean": what a masked_fill with a finite fill (finfo.min,
    -10000) computes, since the softmax of equal numbers is uniform. softmax only (relu(s)^2 weighs a masked key 0).
    masked_rows "none" checks no row, so such a row is NaN, as a plain softmax makes it: a pass sets it where it
    proved every score finite (a row then always has a visible key), and the decomposition skips the check.
  - score_fn "softmax" (the default) normalises each row; "relu_squared" takes relu(s)^2 with no normalisation
    (FLASH's local attention; a masked key has s = -inf, so weight 0).
  - logits_input=1 (the K1-m form): the bias holds the complete, materialised logits, for maps that other ops
    also read (Evolving Attention hands each layer's map to the next); the values of query and key are not
    read (query still gives Nq, its rows), and scale is ignored.
  - shared_key, shared_value (optional, together, after a bias: only trailing inputs may be left out;
    [Bs, R, H*D] and [Bs, R, H*Dv], Bs dividing B):
    a key set that every row of a group of B / Bs consecutive batch rows sees ahead of its own keys. Batch row b
    attends to [shared_key[b // (B / Bs)]; key[b]], R + Nk keys that the bias and the causal diagonal both count.
    Transformer-LS's r landmarks, seen by every segment (segments folded into the batch), are read in place, never
    copied into each segment. Not with logits_input.
Covers ViT, Switch's attention, MGK (one softmax over 2N augmented keys), Evolving Attention (the evolved map
as logits), Treeformer TC, chunked local attention run per chunk (SPADE, FLASH), and standard attention written
any other way.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from onnx import numpy_helper

from .contract import Attribute, OpContract, TensorSpec, query_rows_value_width, split_heads
from .onnx_builder import OnnxBuilder

FLOATS = ("float32", "float16", "bfloat16")


SCORE_FNS = ("softmax", "relu_squared")
MASKED_ROWS = ("zeros", "mean", "none")


def masked_row_weights(scores: torch.Tensor, masked_rows: str) -> torch.Tensor:
    """softmax over the last axis. A row whose every score is -inf (0/0): zeros with "zeros" (today's rule, which
    also zeroes NaN weights), uniform weights with "mean" (there NaN from the inputs stays NaN), NaN with "none"."""
    if masked_rows not in MASKED_ROWS:
        raise ValueError(f"unknown masked_rows {masked_rows!r}")
    if masked_rows == "none":
        return torch.softmax(scores, -1)
    if masked_rows == "zeros":
        return torch.softmax(scores, -1).nan_to_num(0.0)
    dead = (scores == float("-inf")).all(-1, keepdim=True)
    return torch.softmax(scores, -1).masked_fill(dead, 1.0 / max(scores.shape[-1], 1))


def reference(query, key, value, bias=None, shared_key=None, shared_value=None, *, num_heads=1, scale=0.0,
              causal=0, score_fn="softmax", logits_input=0, masked_rows="zeros"):
    if score_fn not in SCORE_FNS:
        raise ValueError(f"unknown score_fn {score_fn!r}")
    if (shared_key is None) != (shared_value is None) or (shared_key is not None and (logits_input or bias is None)):
        raise ValueError("shared_key and shared_value come together, after a bias, and not with logits_input")
    if shared_key is not None:  # each group of batch rows sees its shared set first
        if key.shape[0] % shared_key.shape[0]:
            raise ValueError(f"the shared sets' batch {shared_key.shape[0]} does not divide {key.shape[0]}")
        group = key.shape[0] // shared_key.shape[0]
        key, value = (torch.cat([s.repeat_interleave(group, 0), t], 1)
                      for s, t in ((shared_key, key), (shared_value, value)))
    v = split_heads(value, num_heads).float()
    if logits_input:
        if bias is None:
            raise ValueError("logits_input=1 needs the logits as the bias input")
        scores = bias.float().expand(v.shape[0], num_heads, query.shape[1], v.shape[2])
    else:
        q, k = (split_heads(t, num_heads).float() for t in (query, key))
        scores = (q @ k.transpose(-1, -2)) * (scale or 1.0 / math.sqrt(q.shape[-1]))
        if bias is not None:
            scores = scores + bias.float()
    nq, nk = scores.shape[-2:]
    if causal:
        future = torch.ones(nq, nk, dtype=torch.bool, device=scores.device).triu(nk - nq + 1)
        scores = scores.masked_fill(future, float("-inf"))
    if score_fn == "softmax":
        weights = masked_row_weights(scores, masked_rows)
    else:
        weights = torch.relu(scores).square()
    out = weights @ v
    b, h, n, dv = out.shape
    return out.to(query.dtype).transpose(1, 2).reshape(b, n, h * dv)


def decompose(b: OnnxBuilder, inputs: list[str], outputs: list[str], attrs: dict) -> None:
    query, key, value = inputs[:3]
    bias, shared_key, shared_value = (inputs[i] if len(inputs) > i else "" for i in (3, 4, 5))
    v = b.split_heads(value, attrs["num_heads"])  # [B,H,N,Dv]
    vf = b.op("Cast", v, to=1)  # float32 statistics
    shared = None  # (keys, values) of the shared sets, [Bs,H,R,D] and [Bs,H,R,Dv]
    if attrs["logits_input"]:
        scores = b.op("Cast", bias, to=1)
    else:
        q, k = (b.split_heads(t, attrs["num_heads"]) for t in (query, key))
        qf, kf = b.op("Cast", q, to=1), b.op("Cast", k, to=1)
        if attrs["scale"]:
            scale = b.const(attrs["scale"], np.float32)
        else:
            head_dim = b.op("Cast", b.dim(b.op("Shape", qf), 3), to=1)
            scale = b.op("Reciprocal", b.op("Sqrt", head_dim))
        qs = b.op("Mul", qf, scale)  # scaling q: N*D products, not N*N
        scores = b.op("MatMul", qs, b.transpose_last(kf, 4))
        if shared_key:
            shared = tuple(b.op("Cast", b.split_heads(t, attrs["num_heads"]), to=1) for t in (shared_key, shared_value))
            # scaled after its MatMul: q scaled once for two MatMuls would be a Mul onnxruntime cannot fold away
            shared_scores = _per_group(b, qf, b.transpose_last(shared[0], 4), attrs["num_heads"], scale)
            scores = b.op("Concat", shared_scores, scores, axis=-1)
        if bias:
            scores = b.op("Add", scores, b.op("Cast", bias, to=1))
    if attrs["causal"]:
        shape = b.op("Shape", scores)
        nq, nk = b.dim(shape, 2), b.dim(shape, 3)
        ones = b.op("ConstantOfShape", b.op("Concat", nq, nk, axis=0),
                    value=numpy_helper.from_array(np.ones(1, np.int64)))
        future = b.op("Cast", b.op("Trilu", ones, b.op("Add", b.op("Sub", nk, nq), b.const([1])), upper=1), to=9)
        scores = b.op("Where", future, b.const(-np.inf, np.float32), scores)
    if attrs["score_fn"] == "relu_squared":
        relu = b.op("Relu", scores)
        probs = b.op("Mul", relu, relu)
    elif attrs["score_fn"] == "softmax":
        probs = b.op("Softmax", scores, axis=-1)
    else:
        raise ValueError(f"unknown score_fn {attrs['score_fn']!r}")
    values = JoinedValues(vf, *((shared[1], attrs["num_heads"]) if shared else ()))
    if attrs["score_fn"] == "softmax" and (bias or attrs["causal"]):
        out = guarded_product(b, scores, probs, values, attrs["masked_rows"])
    else:
        out = values.product(b, probs)
    out = b.op("CastLike", out, v)
    b.merge_heads(out, outputs[0], attrs["num_heads"])


def _per_group(b: OnnxBuilder, rows: str, shared: str, heads: int, scale: str | None = None) -> str:
    """rows [B, H, N, X] @ shared [Bs, H, X, Y] (times `scale`), batch row b against shared[b // (B / Bs)], each
    shared set read in place. With one head (Transformer-LS: heads and chunks folded into the batch) a group's rows
    are consecutive, so they stack as [Bs, 1, G*N, X]: one large product per set instead of G small ones (which
    onnxruntime runs one by one). Otherwise rows [Bs, G, H, N, X] against shared [Bs, 1, H, X, Y], broadcast. The
    scale follows the MatMul directly, where onnxruntime folds a constant one into it."""
    if heads == 1:  # Reshape's 0 copies the input's size on that axis
        stacked = b.op("Reshape", rows, b.op("Concat", b.op("Shape", shared, end=1), b.const([1, -1, 0]), axis=0))
        product = b.op("MatMul", stacked, shared)
    else:
        grouped = b.op("Reshape", rows, b.op("Concat", b.op("Shape", shared, end=1), b.const([-1]),
                                             b.op("Shape", rows, start=1), axis=0))
        product = b.op("MatMul", grouped, b.unsqueeze(shared, [1]))
    if scale is not None:
        product = b.op("Mul", product, scale)
    # back to [B, H, N, Y]
    return b.op("Reshape", product, b.op("Concat", b.const([-1]), b.op("Shape", rows, start=1, end=3),
                                         b.op("Shape", shared, start=3), axis=0))


class JoinedValues:
    """The values a weight row multiplies: the row's own [B,H,Nk,Dv], after its group's shared set [Bs,H,R,Dv]
    where there is one (the weights' first R columns are the shared keys')."""

    def __init__(self, own: str, shared: str | None = None, heads: int = 1):
        self.own, self.shared, self.heads = own, shared, heads

    def product(self, b: OnnxBuilder, probs: str) -> str:
        if self.shared is None:
            return b.op("MatMul", probs, self.own)
        sizes = b.op("Concat", *(b.op("Shape", t, start=2, end=3) for t in (self.shared, self.own)), axis=0)
        first, rest = b.op("Split", probs, sizes, axis=-1, n_out=2)
        return b.op("Add", _per_group(b, first, self.shared, self.heads), b.op("MatMul", rest, self.own))

    def mean(self, b: OnnxBuilder, probs: str) -> str:
        """[B,H,1,Dv]: the mean of every value a row of `probs` [B,H,Nq,R+Nk] sees."""
        if self.shared is None:
            return b.reduce("ReduceMean", self.own, [-2])
        one_row = b.op("Concat", b.op("Shape", probs, end=2), b.const([1]), b.op("Shape", probs, start=3), axis=0)
        uniform = b.op("Reciprocal", b.op("Cast", b.op("Shape", probs, start=3), to=1))
        return self.product(b, b.op("Expand", uniform, one_row))  # uniform weights over R + Nk keys


def guarded_product(b: OnnxBuilder, scores: str, probs: str, values: JoinedValues, masked_rows: str) -> str:
    """probs @ values, where rows whose every score is -inf (NaN in softmax) give zeros, or the mean of the values.
    A softmax row is NaN everywhere or nowhere (one NaN or -inf max spoils its sum), so the rows' first weights
    tell: when none is NaN (the usual case) an If takes the plain product and skips the guard, a broadcast Where
    over the output that costs onnxruntime more than the check. Each branch writes its own product, so neither
    copies an outer tensor into the If's output. "none" checks nothing: the plain product."""
    if masked_rows not in MASKED_ROWS:
        raise ValueError(f"unknown masked_rows {masked_rows!r}")
    if masked_rows == "none":
        return values.product(b, probs)

    def first_weights():  # [.., Nq, 1]; sliced anew inside the If: an outer Slice read there makes onnxruntime's
        return b.op("Slice", probs, b.const([0]), b.const([1]), b.const([-1]))  # optimiser warn on every load
    suspect = b.op("IsNaN", b.op("ReduceSum", first_weights(), keepdims=0))

    def guarded():
        out = values.product(b, probs)
        if masked_rows == "zeros":
            return b.op("Where", b.op("IsNaN", first_weights()), b.const(0.0, np.float32), out)
        # only rows that are all -inf become the mean (NaN from the inputs stays NaN): the row max tells
        dead = b.op("Equal", b.reduce("ReduceMax", scores, [-1]), b.const(-np.inf, np.float32))  # [.., Nq, 1]
        return b.op("Where", dead, values.mean(b, probs), out)
    return b.op("If", suspect, then_branch=b.branch(guarded), else_branch=b.branch(
        lambda: values.product(b, probs)))


CONTRACT = OpContract(
    op_type="DenseAttention",
    version=1,
    doc=__doc__,
    inputs=(
        TensorSpec("query", 3, FLOATS, "[B, Nq, H*D]"),
        TensorSpec("key", 3, FLOATS, "[B, Nk, H*D]"),
        TensorSpec("value", 3, FLOATS, "[B, Nk, H*Dv]"),
        TensorSpec("bias", 4, FLOATS, "[B or 1, H or 1, Nq or 1, Nk] additive; -inf masks a key (R + Nk keys with "
                   "shared ones)", optional=True),
        TensorSpec("shared_key", 3, FLOATS, "[Bs, R, H*D]: keys each group of B / Bs batch rows sees first",
                   optional=True),
        TensorSpec("shared_value", 3, FLOATS, "[Bs, R, H*Dv]: their values", optional=True),
    ),
    outputs=(TensorSpec("output", 3, FLOATS, "[B, Nq, H*Dv]"),),
    attributes=(
        Attribute("num_heads", "int", 1, "H: the last axis of query/key is H*D, of value H*Dv"),
        Attribute("scale", "float", 0.0, "score scale; 0 means 1/sqrt(D)"),
        Attribute("causal", "int", 0, "1: query i sees keys j <= i + Nk - Nq"),
        Attribute("score_fn", "string", "softmax", "scores to weights: " + ", ".join(SCORE_FNS),
                  options=SCORE_FNS),
        Attribute("logits_input", "int", 0, "1: the bias is the complete logits; query and key are not read"),
        Attribute("masked_rows", "string", "zeros",
                  "a softmax row with every score -inf: zeros, mean (of the values) or none (NaN, unchecked)",
                  options=MASKED_ROWS),
    ),
    reference=reference,
    decompose=decompose,
    output_shapes=query_rows_value_width,
)
