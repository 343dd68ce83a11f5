"""Fuse softmax attention written any standard way into DenseAttention.

Pattern: MatMul(q, k^T) -> score chain (score_chain.py: affine, c * x + bias) -> Softmax(last axis) -> [NaN guard]
-> MatMul(p, v); the scale may also sit on q and k (decomposed SDPA). Relu then square in place of the softmax is
FLASH's relu^2 attention (score_fn relu_squared). Whether the result equals the graph is then checked numerically,
as for every pass. This module takes [B, H, N, D] heads; the other rewrites of the family live beside it:
  chunked_attention.py    per-head tensors with extra chunk axes, and relu^2 weights, run per chunk
  concatenated_keys.py    one softmax over concatenated score blocks: attention over the concatenated keys
  materialised_logits.py  logits kept for another reader, or not affine in QK^T: softmax and PV fused (K1-m)
  tiled_mask.py           a constant mask of whole 0 / -inf tiles at a fixed length: BlockSparseAttention
"""
from __future__ import annotations

import onnx

from ..ops import DENSE_ATTENTION
from . import chunked_attention, concatenated_keys, head_layout, materialised_logits
from .chunk_layout import ChunkLayout
from .framework import (FamilyPass, Match, NotFused, Rewrite, check_no_escape, escaping_tensor, has_dynamic_shapes,
                        keep_shared_layouts, region, register, untransposed, verify_numerically, walk_to_boundary)
from .graph import GraphIndex
from .probe import Probe
from .score_chain import chain_bias, score_chain
from .softmax_core import axis_is_last, relu_squared_nodes, softmax_nodes, value_product
from .tiled_mask import as_block_sparse

OP = DENSE_ATTENTION


def candidates(index: GraphIndex, probe: Probe):
    for softmax in softmax_nodes(index):
        if axis_is_last(softmax, probe) and (value_product(index, softmax) is not None
                                                     or concatenated_keys.is_concatenated(index, probe, softmax)):
            yield softmax
    for relu in relu_squared_nodes(index):
        if value_product(index, relu) is not None:
            yield relu


def match(index: GraphIndex, probe: Probe, anchor: onnx.NodeProto, name: str) -> Match:
    """`anchor`: the Softmax, or the Relu of relu^2 weights."""
    pv = value_product(index, anchor)
    if pv is None:
        return concatenated_keys.match(index, probe, anchor, name)
    chain = score_chain(index, probe, anchor.input[0], shape_factors_ok=True)
    if isinstance(chain, str) and anchor.op_type == "Relu":
        raise NotFused(f"relu^2 attention weights: {chain}")
    if isinstance(chain, str):
        return materialised_logits.match(index, probe, anchor, name, f"{chain}, and as materialised logits: ")
    layout = ChunkLayout.of(probe, chain.qk.input[0])
    if layout.rank != 4 or layout.head != 1 or anchor.op_type != "Softmax":
        return chunked_attention.match(index, probe, anchor, chain, pv, layout, name)
    q, q_factor, _ = walk_to_boundary(index, probe, chain.qk.input[0])
    k, k_factor, _ = walk_to_boundary(index, probe, chain.qk.input[1])
    v, _, _ = walk_to_boundary(index, probe, pv.input[1])
    per_head_q, per_head_v = probe.shape(chain.qk.input[0]), probe.shape(pv.input[1])
    if per_head_q is None or len(per_head_q) != 4 or per_head_v is None or len(per_head_v) != 4:
        raise NotFused(f"queries are not split in heads (shape {per_head_q}, expected [B, H, N, D])")
    batch, heads, q_len, head_dim = per_head_q
    v_head_dim = per_head_v[3]
    # where the walk up from a product ends in neither layout the op reads (a packed qkv projection sliced into
    # q, k and v), the op reads the per-head operand of the product itself
    k_per_head, k_is_transposed = untransposed(index, probe, chain.qk.input[1])
    starts = {"query": chain.qk.input[0], "key": None if k_is_transposed else k_per_head, "value": pv.input[1]}
    (q, q_factor), (k, k_factor), (v, _) = [
        (tensor, factor) if head_layout.reads_as_op_input(probe, tensor, batch, heads, dim) or starts[what] is None
        else (starts[what], 1.0)
        for tensor, factor, dim, what in ((q, q_factor, head_dim, "query"), (k, k_factor, head_dim, "key"),
                                          (v, 1.0, v_head_dim, "value"))]
    rewrite = Rewrite()
    q_scaled = chain.fold_shape_factors(probe, q, name, rewrite, index.model.opset_import)
    layouts = [head_layout.into_op(probe, tensor, batch, heads, dim, what, name, rewrite) for tensor, dim, what in
               ((q_scaled, head_dim, "query"), (k, head_dim, "key"), (v, v_head_dim, "value"))]
    op_inputs, layout_values = [t[0] for t in layouts], [t[1] for t in layouts]
    output, op_output, expected = head_layout.output_side(index, probe, pv.output[0], heads, name, rewrite)
    nodes, outside = region(index, [q, k, v, *chain.side_inputs(index)], output)
    if outside:
        raise NotFused(f"the attention also reads data-dependent tensor '{outside[0]}'")
    nodes = keep_shared_layouts(index, nodes, [chain.qk.input[0], chain.qk.input[1], pv.input[1]])
    leak = escaping_tensor(index, nodes, output)
    if leak and leak[0] in {chain.qk.output[0], *(node.output[0] for node, _ in chain.steps)}:
        # the scores are materialised for another reader: fuse the softmax and PV over them
        return materialised_logits.match(index, probe, anchor, name, "")
    check_no_escape(index, nodes, output)
    if anchor.op_type == "Softmax" and pv.input[0] == anchor.output[0] and _split_stays(index, nodes,
                                                                                        chain.qk.input[0]):
        # the graph reads the per-head q elsewhere too (MGK's bias reads |q|^2): the op reads the per-head tensors,
        # heads folded into its batch, so the graph's split stays the one copy of q. Fed the merged q instead, the
        # split would feed the bias alone, and onnxruntime's transpose optimizer moves such a lone Transpose down
        # past the bias's broadcast, onto a [B, N, H, Nk] tensor: an N x Nk transpose per head on every run.
        # the op's output takes PV's name, so nothing may keep PV (TorchScript reads its shape for the merge)
        if all(c.op_type != "Shape" for c in index.consumers.get(pv.output[0], [])):
            return chunked_attention.match(index, probe, anchor, chain, pv, ChunkLayout.heads_in_batch(), name)

    attrs = {"num_heads": heads, "scale": chain.scale * q_factor * k_factor, "causal": 0}
    bias, bias_values = None, []
    if chain.has_bias:
        helpers_before_bias = len(rewrite.nodes)
        bias, bias_values = chain_bias(index, probe, chain, name, rewrite)
        # what the bias is computed from (the graph's own tensor where the chain only adds it)
        bias_reads = _read_tensors(rewrite.nodes[helpers_before_bias:]) or {bias}
        new_names = {t.name for t in rewrite.initializers}
        static_bias = all(index.is_static(t) or t in new_names for t in bias_reads)
        if static_bias and not has_dynamic_shapes(index.model) and helpers_before_bias == 0:
            block_sparse = as_block_sparse(probe, bias_values[0], name, [q, k, v], output, attrs, nodes)
            if block_sparse is not None:
                return block_sparse
    inputs = layout_values + ([lambda run: bias_values[run]] if bias else [])
    why = verify_numerically(OP, probe, inputs, expected, attrs)
    if why:
        raise NotFused(f"the op's reference does not reproduce the graph: {why}")
    return rewrite.match(OP, name, op_inputs + ([bias] if bias else []), op_output, attrs, nodes)


def _split_stays(index: GraphIndex, nodes: list[onnx.NodeProto], per_head: str) -> bool:
    """Whether the Transpose making `per_head` stays in the graph (keep_shared_layouts left it out of `nodes`)."""
    producer = index.producer.get(per_head)
    return producer is not None and producer.op_type == "Transpose" and all(n is not producer for n in nodes)


def _read_tensors(nodes: list) -> set[str]:
    produced = {o for n in nodes for o in n.output}
    return {i for n in nodes for i in n.input if i and i not in produced}


FAMILY = register(FamilyPass("dense_attention", 100, OP, candidates, match))
