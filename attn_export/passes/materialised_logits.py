"""The K1-m form of DenseAttention: softmax and the value product fused over logits the graph keeps materialised.

When the complete logits are materialised on purpose (another op reads them, as Evolving Attention hands each
layer's map to the next) or are not affine in one QK^T product (the evolved map's convolution), only the softmax
and the value product are fused: logits_input=1, the logits as the op's bias. Logits proved finite (even in half
precision) leave no row without a visible key, so the op checks none (masked_rows "none").
"""
from __future__ import annotations

import onnx

from ..ops import DENSE_ATTENTION
from . import head_layout
from .finite_scores import FiniteCheck
from .framework import Match, NotFused, Rewrite, check_no_escape, keep_shared_layouts, region, verify_numerically, \
    walk_to_boundary
from .graph import GraphIndex
from .probe import Probe
from .score_chain import is_qk_product
from .softmax_core import value_product

OP = DENSE_ATTENTION


def match(index: GraphIndex, probe: Probe, softmax: onnx.NodeProto, name: str, prefix: str) -> Match:
    """`prefix` says why the full form did not fit; a refusal here is reported after it."""
    def refuse(why: str):
        raise NotFused(prefix + why)

    logits, pv = softmax.input[0], value_product(index, softmax)
    shape, per_head_v = probe.shape(logits), probe.shape(pv.input[1])
    if shape is None or len(shape) != 4 or per_head_v is None or len(per_head_v) != 4:
        refuse(f"the logits {shape} and values {per_head_v} are not [B, H, Nq, Nk] and [B, H, Nk, Dv]")
    batch, heads, _, v_head_dim = per_head_v
    if shape[2] != shape[3] or shape[3] != per_head_v[2] or shape[1] not in (1, heads):
        refuse(f"the logits {shape} are not [B, H, N, N] for values {per_head_v}")
    v, _, _ = walk_to_boundary(index, probe, pv.input[1])
    rewrite = Rewrite()
    v_op, v_value = head_layout.into_op(probe, v, batch, heads, v_head_dim, "value", name, rewrite)
    output, op_output, expected = head_layout.output_side(index, probe, pv.output[0], heads, name, rewrite)
    nodes, outside = region(index, [v, logits], output)
    if outside:
        refuse(f"the attention also reads data-dependent tensor '{outside[0]}'")
    nodes = keep_shared_layouts(index, nodes, [pv.input[1]])
    check_no_escape(index, nodes, output)
    attrs = {"num_heads": heads, "scale": 0.0, "causal": 0, "logits_input": 1}
    if FiniteCheck(index, probe, half=True)(logits):  # every row keeps a visible key: nothing to check
        attrs["masked_rows"] = "none"
    # the op reads only the shape of query and key (Nq = Nk here): the value stands in for both
    why = verify_numerically(OP, probe, [v_value, v_value, v_value, logits], expected, attrs)
    if why:
        refuse(f"the op's reference does not reproduce the graph: {why}")
    products = [n for n in index.ancestors(logits, stop={v})[:40] if is_qk_product(index, n)]
    return rewrite.match(OP, name, [v_op, v_op, v_op, logits], op_output, attrs, nodes, kept=products)
