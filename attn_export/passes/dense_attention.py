"""Fuse softmax attention written any standard way into DenseAttention.

Pattern: MatMul(q, k^T) -> score chain (score_chain.py: affine, c * x + bias) -> Softmax(last axis) -> [NaN guard]
-> MatMul(p, v); the scale may also sit on q and k (decomposed SDPA). Relu then square in place of the softmax is
FLASH's relu^2 attention (score_fn relu_squared). Per-head tensors with extra chunk axes run per chunk
(chunk_layout.py); one softmax over concatenated score blocks is attention over the concatenated keys
(concatenated_keys.py). Whether the result equals the graph is then checked numerically, as for every pass.
At a fixed length, a constant mask made of whole 0 / -inf tiles becomes BlockSparseAttention with that layout.

When the complete logits are materialised on purpose (another op reads them, as Evolving Attention hands each
layer's map to the next) or are not affine in one QK^T product (the evolved map's convolution), only softmax and
the value product are fused: the K1-m form, logits_input=1, the logits as the bias.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..ops import BLOCK_SPARSE_ATTENTION, DENSE_ATTENTION
from . import concatenated_keys
from .chunk_layout import ChunkLayout
from .framework import (FamilyPass, Match, NotFused, check_no_escape, closed_region, constant, escaping_tensor,
                        has_dynamic_shapes, keep_shared_layouts, region, register, untransposed, verify_numerically,
                        walk_to_boundary)
from .graph import GraphIndex
from .probe import Probe
from .score_chain import ScoreChain, chain_bias, is_qk_product, score_chain
from .softmax_core import axis_is_last, relu_squared_nodes, softmax_nodes, value_product

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
        return _match_logits(index, probe, anchor, name, f"{chain}, and as materialised logits: ")
    layout = ChunkLayout.of(probe, chain.qk.input[0])
    if layout.rank != 4 or layout.head != 1 or anchor.op_type != "Softmax":
        return _match_per_chunk(index, probe, anchor, chain, pv, layout, name)
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
        (tensor, factor) if _reads_as_op_input(probe, tensor, batch, heads, dim) or starts[what] is None
        else (starts[what], 1.0)
        for tensor, factor, dim, what in ((q, q_factor, head_dim, "query"), (k, k_factor, head_dim, "key"),
                                          (v, 1.0, v_head_dim, "value"))]
    q_scaled, scale_nodes = chain.fold_shape_factors(probe, q, name, index.model.opset_import)
    layouts = [_op_layout(probe, tensor, batch, heads, dim, what, name) for tensor, dim, what in
               ((q_scaled, head_dim, "query"), (k, head_dim, "key"), (v, v_head_dim, "value"))]
    op_inputs = [layout[0] for layout in layouts]
    layout_values = [layout[1] for layout in layouts]
    new_nodes = scale_nodes + [n for layout in layouts for n in layout[2]]
    new_inits = [t for layout in layouts for t in layout[3]]

    output, op_output, expected, out_nodes, out_inits = _output_side(index, probe, pv, heads, name)
    new_nodes, new_inits = new_nodes + out_nodes, new_inits + out_inits
    sides = chain.side_inputs(index)
    nodes, outside = region(index, [q, k, v, *sides], output)
    if outside:
        raise NotFused(f"the attention also reads data-dependent tensor '{outside[0]}'")
    nodes = keep_shared_layouts(index, nodes, [chain.qk.input[0], chain.qk.input[1], pv.input[1]])
    leak = escaping_tensor(index, nodes, output)
    if leak and leak[0] in {chain.qk.output[0], *(node.output[0] for node, _ in chain.steps)}:
        # the scores are materialised for another reader: fuse the softmax and PV over them
        return _match_logits(index, probe, anchor, name, "")
    check_no_escape(index, nodes, output)
    if anchor.op_type == "Softmax" and pv.input[0] == anchor.output[0] and _split_stays(index, nodes,
                                                                                        chain.qk.input[0]):
        # the graph reads the per-head q elsewhere too (MGK's bias reads |q|^2): the op reads the per-head tensors,
        # heads folded into its batch, so the graph's split stays the one copy of q. Fed the merged q instead, the
        # split would feed the bias alone, and onnxruntime's transpose optimizer moves such a lone Transpose down
        # past the bias's broadcast, onto a [B, N, H, Nk] tensor: an N x Nk transpose per head on every run.
        # the op's output takes PV's name, so nothing may keep PV (TorchScript reads its shape for the merge)
        if all(c.op_type != "Shape" for c in index.consumers.get(pv.output[0], [])):
            return _match_per_chunk(index, probe, anchor, chain, pv, ChunkLayout.heads_in_batch(), name)

    attrs = {"num_heads": heads, "scale": chain.scale * q_factor * k_factor, "causal": 0}
    bias_nodes, bias, bias_inits, bias_values = [], None, [], []
    if chain.has_bias:
        bias_nodes, bias, bias_inits, bias_values = chain_bias(index, probe, chain, name)
    new_names = {t.name for t in bias_inits}
    static_bias = bias and all(index.is_static(t) or t in new_names for t in _read_tensors(bias_nodes))
    if static_bias and not has_dynamic_shapes(index.model) and not new_nodes:
        block_sparse = _as_block_sparse(probe, bias_values[0], name, [q, k, v], output, attrs, nodes)
        if block_sparse is not None:
            return block_sparse
    inputs = layout_values + ([lambda run: bias_values[run]] if bias else [])
    why = verify_numerically(OP, probe, inputs, expected, attrs)
    if why:
        raise NotFused(f"the op's reference does not reproduce the graph: {why}")
    return Match(OP, name, op_inputs + ([bias] if bias else []), op_output, attrs, nodes, new_inits + bias_inits,
                 new_nodes + bias_nodes)


def _split_stays(index: GraphIndex, nodes: list[onnx.NodeProto], per_head: str) -> bool:
    """Whether the Transpose making `per_head` stays in the graph (keep_shared_layouts left it out of `nodes`)."""
    producer = index.producer.get(per_head)
    return producer is not None and producer.op_type == "Transpose" and all(n is not producer for n in nodes)


def _match_per_chunk(index: GraphIndex, probe: Probe, anchor: onnx.NodeProto, chain: ScoreChain,
                     pv: onnx.NodeProto, layout: ChunkLayout, name: str) -> Match:
    """Attention on per-head tensors with extra leading axes (chunks), or relu^2 weights: the op reads the per-head
    q, k, v themselves, chunks folded into its batch, and the graph's per-head output is rebuilt from its output."""
    q, v, output = chain.qk.input[0], pv.input[1], pv.output[0]
    k, k_transposed = untransposed(index, probe, chain.qk.input[1])
    q_scaled, scale_nodes = chain.fold_shape_factors(probe, q, name, index.model.opset_import)
    inputs, values, op_output, expected, new_nodes, new_inits = layout.qkv_into_op(probe, q_scaled, k, v, output,
                                                                                   name, k_transposed)
    new_nodes = scale_nodes + new_nodes
    nodes = closed_region(index, [q, k, v, *chain.side_inputs(index)], output)

    score_fn = "softmax" if anchor.op_type == "Softmax" else "relu_squared"
    attrs = {"num_heads": layout.heads, "scale": chain.scale, "causal": 0, "score_fn": score_fn}
    if chain.has_bias:
        bias_nodes, bias, bias_inits, bias_values = chain_bias(index, probe, chain, name, rank4=False)
        # a bias read from graph tensors that span q's batch axes (by the exporter's symbolic shapes) spans them too
        full = all(any(probe.same_symbolic_dims(side, q, [axis]) for side in chain.side_inputs(index))
                   for axis in layout.batch)
        bias, bias_value, more_nodes, more_inits = layout.bias_into_op(probe, bias, bias_values, like=q, name=name,
                                                                       full_batch=full)
        inputs, values = inputs + [bias], values + [bias_value]
        new_nodes, new_inits = new_nodes + bias_nodes + more_nodes, new_inits + bias_inits + more_inits
    why = verify_numerically(OP, probe, values, expected, attrs)
    if why:
        raise NotFused(f"the op's reference does not reproduce the graph: {why}")
    return Match(OP, name, inputs, op_output, attrs, nodes, new_inits, new_nodes)


def _output_side(index: GraphIndex, probe: Probe, pv: onnx.NodeProto, heads: int, name: str):
    """Where the fused node's [B, Nq, H*Dv] output goes: the first merged-heads tensor after PV, or, when the heads
    are not merged right away (e.g. a guard on the per-head output), PV's own output through a new split.
    Returns (graph output, op output, expected value (name or run -> array), new nodes, new initializers)."""
    batch, _, q_len, v_head_dim = probe.shape(pv.output[0])
    output = _merged_output(index, probe, pv.output[0], (batch, q_len, heads * v_head_dim))
    if output is not None:
        return output, output, output, [], []
    op_output = f"{name}/output"

    def expected(run):
        x = probe.runs[run][pv.output[0]]
        return x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)
    return (pv.output[0], op_output, expected, _split_heads_nodes(op_output, pv.output[0], heads, name),
            [constant(f"{name}/split_shape", np.array([0, 0, heads, -1], np.int64))])


def _match_logits(index: GraphIndex, probe: Probe, softmax: onnx.NodeProto, name: str, prefix: str) -> Match:
    """The K1-m form: DenseAttention(logits_input=1) over the materialised logits, the value product fused."""
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
    v_op, v_value, new_nodes, new_inits = _op_layout(probe, v, batch, heads, v_head_dim, "value", name)
    output, op_output, expected, out_nodes, out_inits = _output_side(index, probe, pv, heads, name)
    nodes, outside = region(index, [v, logits], output)
    if outside:
        refuse(f"the attention also reads data-dependent tensor '{outside[0]}'")
    nodes = keep_shared_layouts(index, nodes, [pv.input[1]])
    check_no_escape(index, nodes, output)
    attrs = {"num_heads": heads, "scale": 0.0, "causal": 0, "logits_input": 1}
    # the op reads only the shape of query and key (Nq = Nk here): the value stands in for both
    why = verify_numerically(OP, probe, [v_value, v_value, v_value, logits], expected, attrs)
    if why:
        refuse(f"the op's reference does not reproduce the graph: {why}")
    products = [n for n in index.ancestors(logits, stop={v})[:40] if is_qk_product(index, n)]
    return Match(OP, name, [v_op, v_op, v_op, logits], op_output, attrs, nodes, new_inits + out_inits,
                 new_nodes + out_nodes, kept=products)


def _split_heads_nodes(op_output: str, per_head: str, heads: int, name: str) -> list:
    """[B, N, H*Dv] from the op back to the graph's per-head [B, H, N, Dv] tensor."""
    return [helper.make_node("Reshape", [op_output, f"{name}/split_shape"], [f"{name}/output_split"],
                             name=f"{name}/output_reshape"),
            helper.make_node("Transpose", [f"{name}/output_split"], [per_head], perm=[0, 2, 1, 3],
                             name=f"{name}/output_transpose")]


def _reads_as_op_input(probe: Probe, tensor: str, batch: int, heads: int, dim: int) -> bool:
    """[B, N, H*D], or per-head [B, H, N, D]: the two layouts `_op_layout` takes."""
    shape = probe.shape(tensor)
    return shape is not None and ((len(shape) == 3 and shape[0] == batch and shape[2] == heads * dim) or
                                  (len(shape) == 4 and tuple(shape[:2]) == (batch, heads) and shape[3] == dim))


def _op_layout(probe: Probe, tensor: str, batch: int, heads: int, dim: int, what: str, name: str):
    """How the op reads a q/k/v boundary tensor: as is when it is [B, N, H*D]; through a new Transpose + Reshape
    when the walk stopped at a per-head [B, H, N, D] tensor (e.g. MGK's keys, concatenated per head).
    Returns (op input name, probe value of it per run, new nodes, new initializers)."""
    shape = probe.shape(tensor)
    if shape is not None and len(shape) == 3 and shape[0] == batch and shape[2] == heads * dim:
        return tensor, tensor, [], []
    if shape is None or len(shape) != 4 or tuple(shape[:2]) != (batch, heads) or shape[3] != dim:
        raise NotFused(f"{what} {shape} is not [B, N, {heads}*{dim}] (mismatched head count?)")
    merged, target = f"{name}/{what}", f"{name}/{what}_shape"
    nodes = [helper.make_node("Transpose", [tensor], [f"{merged}_t"], perm=[0, 2, 1, 3], name=f"{merged}_transpose"),
             helper.make_node("Reshape", [f"{merged}_t", target], [merged], name=f"{merged}_merge")]

    def value(run):
        x = probe.runs[run][tensor]
        return x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)
    return merged, value, nodes, [constant(target, np.array([0, 0, -1], np.int64))]


def _read_tensors(nodes: list) -> set[str]:
    produced = {o for n in nodes for o in n.output}
    return {i for n in nodes for i in n.input if i and i not in produced}


def _as_block_sparse(probe: Probe, bias: np.ndarray, name: str, qkv: list[str], output: str, attrs: dict,
                     nodes: list) -> Match | None:
    """A constant 0 / -inf mask made of whole b x b tiles (fixed length): BlockSparseAttention with the derived
    layout, when it skips at least half of the tiles. None when the mask is not such a layout."""
    if bias.shape[0] != 1 or not np.all((bias == 0) | np.isneginf(bias)):
        return None
    visible = bias[0] == 0  # [H or 1, Nq, Nk]
    n = visible.shape[-1]
    if visible.shape[-2] != n:
        return None
    for block in (b for b in (128, 64, 32, 16, 8) if n % b == 0 and n // b >= 2):
        nb = n // block
        tiles = visible.reshape(visible.shape[0], nb, block, nb, block)
        if not (np.all(tiles == tiles[:, :, :1, :, :1]) and tiles[:, :, 0, :, 0].mean() <= 0.5):
            continue
        table_mask = tiles[:, :, 0, :, 0]  # [H or 1, nb, nb]
        m = max(int(table_mask.sum(-1).max()), 1)
        table = np.full(table_mask.shape[:2] + (m,), -1, np.int32)
        for h, i in np.ndindex(*table_mask.shape[:2]):
            listed = np.flatnonzero(table_mask[h, i])
            table[h, i, :len(listed)] = listed
        sparse_attrs = {"num_heads": attrs["num_heads"], "block_size": block, "scale": attrs["scale"],
                        "global_blocks": 0}
        if verify_numerically(BLOCK_SPARSE_ATTENTION, probe, qkv + [lambda run, t=table: t], output, sparse_attrs):
            return None
        table_name = f"{name}/block_index"
        return Match(BLOCK_SPARSE_ATTENTION, name, qkv + [table_name], output, sparse_attrs, nodes,
                     [constant(table_name, table)])
    return None


def _merged_output(index: GraphIndex, probe: Probe, start: str, shape: tuple, limit: int = 12) -> str | None:
    """Follow layout ops from the attention product to the first tensor of shape [B, N, H*Dv]."""
    tensor = start
    for _ in range(limit):
        if tuple(probe.shape(tensor) or ()) == shape:
            return tensor
        users = [u for u in index.consumers.get(tensor, []) if not all(o in index.static for o in u.output if o)]
        if len(users) != 1 or users[0].op_type not in ("Transpose", "Reshape", "Flatten", "Cast"):
            return None
        tensor = users[0].output[0]
    return None


FAMILY = register(FamilyPass("dense_attention", 100, OP, candidates, match))
