"""Find softmax attention cores:
MatMul(q, k^T) -> [scale, mask] -> Softmax(last axis) -> [NaN guard] -> MatMul(p, v);
and the weights' value product, for softmax and for FLASH's relu^2 weights alike. The walk from the softmax back to
QK^T is score_chain's, the one every pass uses."""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from .graph import GraphIndex
from .probe import Probe
from .score_chain import NO_SCORE_PRODUCT, ScoreChain, score_chain

GUARD_OPS = {"Where", "Cast", "IsNaN", "Not"}

# with either reason a softmax is not attention at all (a gate, a classifier head): not reported
NO_VALUE_PRODUCT = "softmax output does not feed a product with V"
__all__ = ["NO_SCORE_PRODUCT", "NO_VALUE_PRODUCT", "SoftmaxCore", "find_core", "softmax_nodes", "value_product"]


@dataclass
class SoftmaxCore:
    softmax: onnx.NodeProto
    chain: ScoreChain  # QK^T product -> scale, mask -> softmax input
    pv: onnx.NodeProto  # MatMul(probs, v_side)

    @property
    def qk(self) -> onnx.NodeProto:
        return self.chain.qk

    @property
    def score_scale(self) -> float:
        return self.chain.scale

    @property
    def probs(self) -> str:
        return self.softmax.output[0]

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
    chain = score_chain(index, probe, softmax.input[0])
    if isinstance(chain, str):
        return chain
    if not axis_is_last(softmax, probe):
        return "softmax is not over the last (key) axis"
    pv = value_product(index, softmax)
    if pv is None:
        return NO_VALUE_PRODUCT
    return SoftmaxCore(softmax, chain, pv)


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
