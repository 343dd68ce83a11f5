"""The scores of softmax-style attention as an affine function of one QK^T product.

MatMul(q, k^T) -> chain -> weights, where the chain is made of scalings (Mul/Div by a constant scalar), additive
terms (Add/Sub of a bias or mask) and masks (Where(cond, scores, fill)), in any order. Such a chain is affine in the
scores: chain(x) = c * x + chain(0). A fused node gets scale c and, as its bias, the same chain applied to a zero
score, kept in the graph (static masks stay static; a mask or bias computed from other tensors keeps reading them).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .framework import LAYOUT_OPS, NotFused, Rewrite, constant, run_nodes, scalar_value, unsqueeze_to_rank
from .graph import GraphIndex
from .probe import Probe

CHAIN_OPS = {"Mul", "Div", "Add", "Sub", "Where", "Cast"}
# the reason for weights that are not attention at all (a gate, a classifier head): not reported
NO_SCORE_PRODUCT = "no QK^T product feeds the softmax"


class ScoreChain:
    """The nodes between the QK product and the softmax, from the product down, and where the scores enter each."""

    def __init__(self, qk: onnx.NodeProto, steps: list[tuple[onnx.NodeProto, int]], scale: float,
                 shape_factors: list[tuple[str, str]] = ()):
        self.qk, self.steps, self.scale = qk, steps, scale
        # scalar factors computed from the input shape (GAU's 1/N): (tensor, "Mul" or "Div"), folded into the query
        self.shape_factors = list(shape_factors)

    def fold_shape_factors(self, probe: Probe, query: str, name: str, rewrite: Rewrite, opset_imports) -> str:
        """The query times the chain's shape-dependent factors (the op's scale is a constant): the new query, its
        nodes added to `rewrite` and already evaluated on the probe."""
        nodes = []
        for i, (factor, op_type) in enumerate(self.shape_factors):
            scaled = f"{name}/query_scaled{i}"
            nodes.append(helper.make_node(op_type, [query, factor], [scaled], name=scaled))
            query = scaled
        if nodes:
            probe.evaluate(nodes, [n.output[0] for n in nodes], opset_imports)
            rewrite.nodes.extend(nodes)
        return query

    def side_inputs(self, index: GraphIndex) -> list[str]:
        """Data-dependent tensors the chain reads besides the scores (a mask or bias computed elsewhere)."""
        return [t for node, slot in self.steps for i, t in enumerate(node.input)
                if i != slot and t and not index.is_static(t)]

    @property
    def has_bias(self) -> bool:
        return any(node.op_type in ("Add", "Sub", "Where") for node, _ in self.steps)


def is_qk_product(index: GraphIndex, node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "MatMul" and len(index.dynamic_inputs(node)) == 2


def _reaches_qk(index: GraphIndex, tensor: str, ops: set[str], depth: int = 12) -> bool:
    node = index.producer.get(tensor)
    if is_qk_product(index, node):
        return True
    if node is None or depth == 0 or node.op_type not in ops:
        return False
    return any(_reaches_qk(index, i, ops, depth - 1) for i in index.dynamic_inputs(node))


def score_chain(index: GraphIndex, probe: Probe, scores: str, shape_factors_ok: bool = False,
                through_layouts: bool = False) -> ScoreChain | str:
    """The one walk from attention weights back to QK^T: the chain that makes `scores` (what a softmax reads), or
    why it is not an affine function of one QK^T product (NO_SCORE_PRODUCT: no such product at all). With
    `shape_factors_ok` a scalar factor computed from the input shape is kept in the chain for the caller to fold
    into the query; with `through_layouts` the scores may be reshaped on the way (HF's bmm on [B*H, N, N] viewed as
    [B, H, N, N] for its mask), layout steps the caller then reads the scores through."""
    ops = CHAIN_OPS | LAYOUT_OPS if through_layouts else CHAIN_OPS
    steps, scale, tensor, shape_factors = [], 1.0, scores, []
    while True:
        node = index.producer.get(tensor)
        if node is None:
            return NO_SCORE_PRODUCT
        if is_qk_product(index, node):
            break
        if node.op_type in ("MatMul", "Gemm"):  # a projection of one tensor (a gate, a router): no QK^T
            return NO_SCORE_PRODUCT
        if node.op_type not in ops:
            return f"unexpected {node.op_type} between QK^T and softmax"
        carriers = [i for i, t in enumerate(node.input) if t and not index.is_static(t) and _reaches_qk(index, t, ops)]
        if not carriers:  # no QK^T within reach: follow the one data input to say what stands in the way
            carriers = [i for i, t in enumerate(node.input) if t and not index.is_static(t)]
            if len(carriers) != 1:
                return f"{node.op_type} between QK^T and softmax mixes two data-dependent tensors"
        elif len(carriers) != 1:
            return f"{node.op_type} between QK^T and softmax combines the scores with themselves (not affine)"
        slot = carriers[0]
        if node.op_type in ("Mul", "Div"):
            other = node.input[1 - slot]
            value = scalar_value(index, probe, other)
            if value is None and _shape_scalar(index, probe, other) and (node.op_type == "Mul" or slot == 0):
                if not shape_factors_ok:
                    return (f"scores are scaled by a factor that changes with the input shape (such as 1/N; "
                            f"{node.op_type} '{node.name}'); the op's scale is a constant")
                shape_factors.append((other, node.op_type))
            elif value is None or value == 0 or (node.op_type == "Div" and slot != 0):
                return f"scores are scaled by a non-constant or per-element tensor ({node.op_type} '{node.name}')"
            else:
                scale *= value if node.op_type == "Mul" else 1.0 / value
        elif node.op_type == "Sub" and slot != 0:
            return "scores are subtracted from another tensor"
        elif node.op_type == "Where" and slot == 0:
            return "the scores are a Where condition"
        steps.append((node, slot))
        tensor = node.input[slot]
    steps.reverse()
    return ScoreChain(node, steps, scale, shape_factors)


def _shape_scalar(index: GraphIndex, probe: Probe, tensor: str) -> bool:
    """A static scalar, nonzero at every probe shape (its value may differ between them)."""
    values = [run.get(tensor) for run in probe.runs]
    return index.is_static(tensor) and all(v is not None and np.size(v) == 1 and np.all(v != 0) for v in values)


def chain_bias(index: GraphIndex, probe: Probe, chain: ScoreChain, name: str, rewrite: Rewrite,
               rank4: bool = True) -> tuple[str, list[np.ndarray]]:
    """The score chain copied onto a zero score: chain(0), made rank 4 ([B or 1, H or 1, Nq, Nk]) unless not
    `rank4`. Its nodes go to `rewrite`; returns the bias tensor and its value at every probe."""
    dtype = np.asarray(probe.runs[0][chain.qk.output[0]]).dtype
    zero = constant(f"{name}/zero_scores", np.zeros((), dtype))
    nodes, renamed = [], {chain.qk.output[0]: zero.name}
    for node, slot in chain.steps:
        if node.op_type == "Add" and renamed[node.input[slot]] == zero.name:
            # 0 + b is b: the graph's own bias (MGK's [B, H, N, 2N] logit offsets), not a copy of it
            renamed[node.output[0]] = node.input[1 - slot]
            continue
        copy = helper.make_node(node.op_type, [renamed.get(i, i) for i in node.input],
                                [f"{name}/bias/{o}" for o in node.output], name=f"{name}/bias/{node.name}")
        copy.attribute.extend(node.attribute)
        renamed.update(zip(node.output, copy.output))
        nodes.append(copy)
    bias = renamed[chain.steps[-1][0].output[0]]
    values = [run_nodes(nodes, bias, values, index.model.opset_import, [zero]) if nodes else values[bias]
              for values in probe.runs]
    rewrite.nodes.extend(nodes)
    if nodes:
        rewrite.initializers.append(zero)
    if not rank4:
        return bias, values
    rank = np.ndim(values[0])
    if rank > 4:
        raise NotFused(f"the score bias has rank {rank}, more than [B, H, Nq, Nk]")
    return unsqueeze_to_rank(bias, rank, name, rewrite), [v.reshape((1,) * (4 - rank) + v.shape) for v in values]
