"""Fuse the ONNX `Attention` node (opset 23 and later) into DenseAttention.

TensorRT looks builtins up by op type, and older TensorRT releases do not implement `Attention`, so the node is
rewritten to our op: 3-D q/k/v [B, S, H*D] with as many key/value heads as query heads, an optional boolean or
additive mask (a boolean mask becomes an additive 0 / -inf bias), `scale`, `is_causal`. KV cache inputs, softcap,
local windows and the extra outputs have no counterpart and are reported instead.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..ops import DENSE_ATTENTION
from .framework import FamilyPass, Match, NotFused, Rewrite, register, unsqueeze_to_rank, verify_numerically
from .graph import GraphIndex
from .probe import Probe

OP = DENSE_ATTENTION


def candidates(index: GraphIndex, probe: Probe):
    return [n for n in index.nodes if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]


def match(index: GraphIndex, probe: Probe, node: onnx.NodeProto, name: str) -> Match:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inputs = list(node.input) + [""] * (7 - len(node.input))
    q, k, v, mask = inputs[:4]
    if any(inputs[4:]):
        raise NotFused("Attention with a KV cache (past_key/past_value/nonpad_kv_seqlen) has no fused form")
    if any(out for out in node.output[1:]):
        raise NotFused("Attention's present_key/present_value/qk_matmul_output outputs are used")
    if attrs.get("softcap", 0.0) or attrs.get("left_window_size", -1) >= 0 or attrs.get("right_window_size", -1) >= 0:
        raise NotFused("Attention with softcap or a local window has no fused form")
    heads, kv_heads = attrs.get("q_num_heads", 0), attrs.get("kv_num_heads", 0)
    if len(probe.shape(q) or ()) != 3:
        raise NotFused("Attention with 4-D q/k/v is not fused yet (only [B, S, H*D])")
    if heads <= 0 or heads != kv_heads:
        raise NotFused(f"mismatched head counts: q_num_heads {heads}, kv_num_heads {kv_heads}")

    fused_attrs = {"num_heads": heads, "scale": float(attrs.get("scale", 0.0)),
                   "causal": int(attrs.get("is_causal", 0))}
    rewrite = Rewrite()
    bias = _mask_as_bias(probe, mask, name, rewrite) if mask else ""
    fused_inputs = [q, k, v] + ([bias] if bias else [])
    bias_value = (lambda run: _bias_value(probe.runs[run][mask])) if mask else None
    why = verify_numerically(OP, probe, [q, k, v] + ([bias_value] if mask else []), node.output[0], fused_attrs)
    if why:
        raise NotFused(f"the op's reference does not reproduce the graph: {why}")
    return rewrite.match(OP, name, fused_inputs, node.output[0], fused_attrs, [node])


def _bias_value(mask: np.ndarray) -> np.ndarray:
    bias = np.where(mask, 0.0, -np.inf).astype(np.float32) if mask.dtype == np.bool_ else mask
    return bias.reshape((1,) * (4 - bias.ndim) + bias.shape)


def _mask_as_bias(probe: Probe, mask: str, name: str, rewrite: Rewrite) -> str:
    """The mask as a rank-4 additive bias."""
    value = probe.runs[0][mask]
    bias = mask
    if value.dtype == np.bool_:
        zero = rewrite.constant(f"{name}/zero", np.zeros((), np.float32))
        neg_inf = rewrite.constant(f"{name}/neg_inf", np.array(-np.inf, np.float32))
        bias = rewrite.node("Where", [mask, zero, neg_inf], f"{name}/mask_bias", name=f"{name}/mask_to_bias")
    return unsqueeze_to_rank(bias, value.ndim, name, rewrite)


FAMILY = register(FamilyPass("onnx_attention", 50, OP, candidates, match))
