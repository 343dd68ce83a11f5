"""Fuse softmax attention written any standard way into DenseAttention.

Pattern: MatMul(q, k^T) -> score chain -> Softmax(last axis) -> [NaN guard] -> MatMul(p, v), where the score chain
is made of scalings (Mul/Div by a constant scalar), additive terms (Add/Sub of a bias or mask) and masks
(Where(cond, scores, fill)), in any order; the scale may also sit on q and k (decomposed SDPA). Such a chain is
affine in the scores: chain(x) = c * x + chain(0). So the fused node gets scale c and, as its bias, the same chain
applied to a zero score, kept in the graph (static masks stay static; a mask or bias computed from other tensors
keeps reading them). Whether the result equals the graph is then checked numerically, as for every pass.
At a fixed length, a constant mask made of whole 0 / -inf tiles becomes BlockSparseAttention with that layout.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..ops import BLOCK_SPARSE_ATTENTION, DENSE_ATTENTION
from .framework import (Match, NotFused, check_no_escape, constant, has_dynamic_shapes, keep_shared_layouts, region,
                        run_nodes, scalar_value, unsqueeze_to_rank4, verify_numerically, walk_to_boundary)
from .graph import GraphIndex
from .probe import Probe
from .softmax_core import GUARD_OPS, softmax_axis_is_last, softmax_nodes

OP = DENSE_ATTENTION
CHAIN_OPS = {"Mul", "Div", "Add", "Sub", "Where", "Cast"}


class ScoreChain:
    """The nodes between the QK product and the softmax, from the product down, and where the scores enter each."""

    def __init__(self, qk: onnx.NodeProto, steps: list[tuple[onnx.NodeProto, int]], scale: float):
        self.qk, self.steps, self.scale = qk, steps, scale

    def side_inputs(self, index: GraphIndex) -> list[str]:
        """Data-dependent tensors the chain reads besides the scores (a mask or bias computed elsewhere)."""
        return [t for node, slot in self.steps for i, t in enumerate(node.input)
                if i != slot and t and not index.is_static(t)]

    @property
    def has_bias(self) -> bool:
        return any(node.op_type in ("Add", "Sub", "Where") for node, _ in self.steps)


def _is_qk_product(index: GraphIndex, node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "MatMul" and len(index.dynamic_inputs(node)) == 2


def _reaches_qk(index: GraphIndex, tensor: str, depth: int = 12) -> bool:
    node = index.producer.get(tensor)
    if _is_qk_product(index, node):
        return True
    if node is None or depth == 0 or node.op_type not in CHAIN_OPS:
        return False
    return any(_reaches_qk(index, i, depth - 1) for i in index.dynamic_inputs(node))


def score_chain(index: GraphIndex, probe: Probe, softmax: onnx.NodeProto) -> ScoreChain | str:
    """The chain feeding `softmax`, or why it is not an affine function of one QK^T product."""
    steps, scale, tensor = [], 1.0, softmax.input[0]
    while True:
        node = index.producer.get(tensor)
        if node is None:
            return "no QK^T product feeds the softmax"
        if _is_qk_product(index, node):
            break
        if node.op_type not in CHAIN_OPS:
            return f"unexpected {node.op_type} between QK^T and softmax"
        carriers = [i for i, t in enumerate(node.input) if t and not index.is_static(t) and _reaches_qk(index, t)]
        if len(carriers) != 1:
            return f"{node.op_type} between QK^T and softmax combines the scores with themselves (not affine)"
        slot = carriers[0]
        if node.op_type in ("Mul", "Div"):
            other = node.input[1 - slot]
            value = scalar_value(index, probe, other)
            if value is None or value == 0 or (node.op_type == "Div" and slot != 0):
                return f"scores are scaled by a non-constant or per-element tensor ({node.op_type} '{node.name}')"
            scale *= value if node.op_type == "Mul" else 1.0 / value
        elif node.op_type == "Sub" and slot != 0:
            return "scores are subtracted from another tensor"
        elif node.op_type == "Where" and slot == 0:
            return "the scores are a Where condition"
        steps.append((node, slot))
        tensor = node.input[slot]
    steps.reverse()
    return ScoreChain(node, steps, scale)


def value_product(index: GraphIndex, softmax: onnx.NodeProto) -> onnx.NodeProto | None:
    """MatMul(p, v) reading the softmax output, possibly through the NaN guard of fully masked rows."""
    frontier = [softmax.output[0]]
    for _ in range(4):
        nxt = []
        for t in frontier:
            for user in index.consumers.get(t, []):
                if user.op_type == "MatMul" and user.input[0] == t:
                    return user
                if user.op_type in GUARD_OPS:
                    nxt.extend(user.output)
        frontier = nxt
    return None


def candidates(index: GraphIndex, probe: Probe):
    for softmax in softmax_nodes(index):
        if softmax_axis_is_last(softmax, probe) and value_product(index, softmax) is not None:
            if not isinstance(score_chain(index, probe, softmax), str):
                yield softmax


def match(index: GraphIndex, probe: Probe, softmax: onnx.NodeProto, name: str) -> Match:
    chain = score_chain(index, probe, softmax)
    pv = value_product(index, softmax)
    q, q_factor, _ = walk_to_boundary(index, probe, chain.qk.input[0])
    k, k_factor, _ = walk_to_boundary(index, probe, chain.qk.input[1])
    v, _, _ = walk_to_boundary(index, probe, pv.input[1])
    per_head_q, per_head_v = probe.shape(chain.qk.input[0]), probe.shape(pv.input[1])
    if per_head_q is None or len(per_head_q) != 4 or per_head_v is None or len(per_head_v) != 4:
        raise NotFused(f"queries are not split in heads (shape {per_head_q}, expected [B, H, N, D])")
    batch, heads, q_len, head_dim = per_head_q
    v_head_dim = per_head_v[3]
    layouts = [_op_layout(probe, tensor, batch, heads, dim, what, name)
               for tensor, dim, what in ((q, head_dim, "query"), (k, head_dim, "key"), (v, v_head_dim, "value"))]
    op_inputs = [layout[0] for layout in layouts]
    layout_values = [layout[1] for layout in layouts]
    new_nodes = [n for layout in layouts for n in layout[2]]
    new_inits = [t for layout in layouts for t in layout[3]]

    output = _merged_output(index, probe, pv.output[0], (batch, q_len, heads * v_head_dim))
    op_output, expected = output, output
    if output is None:  # the heads are not merged right away (e.g. a guard on the per-head output)
        output, op_output = pv.output[0], f"{name}/output"
        new_nodes += _split_heads_nodes(op_output, output, heads, name)
        new_inits.append(constant(f"{name}/split_shape", np.array([0, 0, heads, -1], np.int64)))

        def expected(run):
            x = probe.runs[run][pv.output[0]]
            return x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)
    sides = chain.side_inputs(index)
    nodes, outside = region(index, [q, k, v, *sides], output)
    if outside:
        raise NotFused(f"the attention also reads data-dependent tensor '{outside[0]}'")
    nodes = keep_shared_layouts(index, nodes, [chain.qk.input[0], chain.qk.input[1], pv.input[1]])
    check_no_escape(index, nodes, output)

    attrs = {"num_heads": heads, "scale": chain.scale * q_factor * k_factor, "causal": 0}
    bias_nodes, bias, bias_inits, bias_values = [], None, [], []
    if chain.has_bias:
        bias_nodes, bias, bias_inits, bias_values = _bias_nodes(index, probe, chain, name)
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


def _split_heads_nodes(op_output: str, per_head: str, heads: int, name: str) -> list:
    """[B, N, H*Dv] from the op back to the graph's per-head [B, H, N, Dv] tensor."""
    return [helper.make_node("Reshape", [op_output, f"{name}/split_shape"], [f"{name}/output_split"],
                             name=f"{name}/output_reshape"),
            helper.make_node("Transpose", [f"{name}/output_split"], [per_head], perm=[0, 2, 1, 3],
                             name=f"{name}/output_transpose")]


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


def _bias_nodes(index: GraphIndex, probe: Probe, chain: ScoreChain, name: str):
    """The score chain copied onto a zero score: chain(0), made rank 4 ([B or 1, H or 1, Nq, Nk]).
    Returns the nodes, the bias tensor, new constants and the bias value at every probe."""
    dtype = np.asarray(probe.runs[0][chain.qk.output[0]]).dtype
    zero = f"{name}/zero_scores"
    inits = [constant(zero, np.zeros((), dtype))]
    nodes, renamed = [], {chain.qk.output[0]: zero}
    for node, _ in chain.steps:
        copy = helper.make_node(node.op_type, [renamed.get(i, i) for i in node.input],
                                [f"{name}/bias/{o}" for o in node.output], name=f"{name}/bias/{node.name}")
        copy.attribute.extend(node.attribute)
        renamed.update(zip(node.output, copy.output))
        nodes.append(copy)
    bias = nodes[-1].output[0]
    values = [run_nodes(nodes, bias, values, index.model.opset_import, inits) for values in probe.runs]
    rank = np.ndim(values[0])
    if rank > 4:
        raise NotFused(f"the score bias has rank {rank}, more than [B, H, Nq, Nk]")
    rank4_nodes, rank4_inits, bias = unsqueeze_to_rank4(bias, rank, name)
    values = [v.reshape((1,) * (4 - rank) + v.shape) for v in values]
    return nodes + rank4_nodes, bias, inits + rank4_inits, values
