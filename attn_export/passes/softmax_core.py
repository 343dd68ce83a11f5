"""Find softmax attention cores:
MatMul(q, k^T) -> [scale, mask] -> Softmax(last axis) -> [NaN guard] -> MatMul(p, v);
and the weights' value product, for softmax and for FLASH's relu^2 weights alike."""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from .framework import scalar_value
from .graph import GraphIndex
from .probe import Probe

SCORE_OPS = {"Where", "Add", "Sub", "Mul", "Div", "Cast"}
GUARD_OPS = {"Where", "Cast", "IsNaN", "Not"}

# a softmax with either of these reasons is not attention at all (a gate, a classifier head): not reported
NO_SCORE_PRODUCT = "no QK^T product feeds the softmax"
NO_VALUE_PRODUCT = "softmax output does not feed a product with V"


@dataclass
class SoftmaxCore:
    softmax: onnx.NodeProto
    qk: onnx.NodeProto  # MatMul(q_side, kT_side)
    pv: onnx.NodeProto  # MatMul(probs, v_side)
    probs: str  # softmax output
    score_scale: float  # scalar factors between the QK product and the softmax
    masked: bool  # a Where/Add on the scores (mask or bias)

    @property
    def q_side(self):
        return self.qk.input[0]

    @property
    def kt_side(self):
        return self.qk.input[1]

    @property
    def v_side(self):
        return self.pv.input[1]


def axis_is_last(node: onnx.NodeProto, probe: Probe) -> bool:
    """The node's `axis` attribute (a Softmax's, defaulting to -1, or a Concat's) names its input's last axis."""
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    rank = len(probe.shape(node.input[0]) or ())
    return axis == -1 or axis == rank - 1


def find_core(index: GraphIndex, probe: Probe, softmax: onnx.NodeProto) -> SoftmaxCore | str:
    """The core around a Softmax node, or a string saying why this Softmax is not one."""
    scale, masked, tensor = 1.0, False, softmax.input[0]
    while True:
        node = index.producer.get(tensor)
        if node is None:
            return NO_SCORE_PRODUCT
        if node.op_type == "MatMul":
            if len(index.dynamic_inputs(node)) != 2:  # a projection of one tensor (a gate, a router): no QK^T
                return NO_SCORE_PRODUCT
            break
        if node.op_type not in SCORE_OPS:
            return f"unexpected {node.op_type} between QK^T and softmax"
        dynamic = index.dynamic_inputs(node)
        if len(dynamic) != 1:
            return f"{node.op_type} between QK^T and softmax mixes two data-dependent tensors"
        if node.op_type in ("Mul", "Div"):
            other = [i for i in node.input if i != dynamic[0]][0]
            value = scalar_value(index, probe, other)
            if value is None:  # a per-element product: a bias-like term we cannot fold into a scale
                return f"scores are multiplied by a non-scalar tensor ({node.op_type} '{node.name}')"
            if node.op_type == "Div" and node.input[0] != dynamic[0]:
                return "scores divide a constant"
            scale *= value if node.op_type == "Mul" else 1.0 / value
        elif node.op_type in ("Where", "Add", "Sub"):
            if node.op_type == "Sub" and node.input[0] != dynamic[0]:
                return "scores are subtracted from a constant"
            masked = True
        tensor = dynamic[0]
    qk = node
    if not axis_is_last(softmax, probe):
        return "softmax is not over the last (key) axis"
    pv = value_product(index, softmax)
    if pv is None:
        return NO_VALUE_PRODUCT
    return SoftmaxCore(softmax, qk, pv, softmax.output[0], scale, masked)


def softmax_nodes(index: GraphIndex):
    return [n for n in index.nodes if n.op_type == "Softmax"]


def relu_squared_nodes(index: GraphIndex) -> list[onnx.NodeProto]:
    """Relu nodes whose output is squared (Mul(x, x) or Pow(x, 2)): FLASH's relu^2 attention weights."""
    return [n for n in index.nodes if n.op_type == "Relu" and _square_of(index, n.output[0]) is not None]


def _square_of(index: GraphIndex, tensor: str) -> str | None:
    for user in index.consumers.get(tensor, []):
        if user.op_type == "Mul" and list(user.input) == [tensor, tensor]:
            return user.output[0]
        if user.op_type == "Pow" and user.input[0] == tensor and index.is_static(user.input[1]):
            return user.output[0]  # the exponent is checked numerically with the rest
    return None


def weights_output(index: GraphIndex, anchor: onnx.NodeProto) -> str:
    """The attention weights an anchor makes: the softmax output, or the square of the relu."""
    return anchor.output[0] if anchor.op_type == "Softmax" else _square_of(index, anchor.output[0])


def value_product(index: GraphIndex, softmax: onnx.NodeProto) -> onnx.NodeProto | None:
    """MatMul(p, v) reading the weights (softmax or relu^2), possibly through the NaN guard of fully masked rows."""
    frontier = [weights_output(index, softmax)]
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
