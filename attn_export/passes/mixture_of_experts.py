"""Fuse a top-1 routed mixture of experts (Switch Transformer) into MixtureOfExperts.

Anchor: a Softmax over a product of the tokens with a constant [d, E] router matrix whose probabilities are
reduced to one expert per token (ArgMax). The layer runs from the tokens to the first tensor of their shape
downstream (the combined expert output); its two stacked expert matrices are the constant 3-D operands of its
products. The capacity rule is read off the graph: at a fixed length the capacity itself, at a dynamic length the
simplest capacity factor giving the per-expert slot count seen at every probe length. As always, the op's reference
must then reproduce the graph at every probe before anything is replaced.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx

from ..ops import MIXTURE_OF_EXPERTS
from .framework import (FamilyPass, Match, NotFused, closed_region, find_output, has_dynamic_shapes, register,
                        verify_numerically, walk_to_boundary)
from .graph import GraphIndex
from .probe import Probe
from .softmax_core import softmax_nodes

OP = MIXTURE_OF_EXPERTS


def _router_product(index: GraphIndex, probe: Probe, softmax: onnx.NodeProto) -> onnx.NodeProto | None:
    node = index.producer.get(softmax.input[0])
    if node is None or node.op_type != "MatMul" or not index.is_static(node.input[1]):
        return None
    return node if np.ndim(probe.runs[0].get(node.input[1])) == 2 else None


def candidates(index: GraphIndex, probe: Probe):
    for softmax in softmax_nodes(index):
        users = [u for t in softmax.output for u in index.consumers.get(t, [])]
        if _router_product(index, probe, softmax) is not None and any(u.op_type == "ArgMax" for u in users):
            yield softmax


def match(index: GraphIndex, probe: Probe, softmax: onnx.NodeProto, name: str) -> Match:
    router_product = _router_product(index, probe, softmax)
    x, _, _ = walk_to_boundary(index, probe, router_product.input[0])
    router = router_product.input[1]
    output = find_output(index, probe, [softmax.output[0]], like=x)
    if output is None:
        raise NotFused("no output shaped like the tokens downstream of the router")
    nodes = closed_region(index, [x], output, what="layer")

    experts = probe.runs[0][router].shape[1]
    stacked = [i for n in nodes if n.op_type == "MatMul" for i in n.input
               if index.is_static(i) and np.ndim(probe.runs[0].get(i)) == 3]
    if len(stacked) != 2:
        raise NotFused(f"expected two stacked [E, ., .] expert matrices, found {len(stacked)}")
    expert_in, expert_out = stacked
    slots = _slots_per_expert(probe, nodes, experts)
    tokens = [probe.runs[run][x].shape[1] for run in range(len(probe.runs))]
    if has_dynamic_shapes(index.model):
        factor = _simplest_factor(tokens, slots, experts)
        if factor is None:
            raise NotFused(f"no capacity factor gives {slots} slots for {tokens} tokens and {experts} experts")
        capacity_attrs = {"capacity": 0, "capacity_factor": factor}
    else:
        capacity_attrs = {"capacity": slots[0], "capacity_factor": 1.0}
    why = ""
    for activation in ("relu", "gelu"):
        attrs = {**capacity_attrs, "activation": activation}
        why = verify_numerically(OP, probe, [x, router, expert_in, expert_out], output, attrs)
        if not why:
            return Match(OP, name, [x, router, expert_in, expert_out], output, attrs, nodes)
    raise NotFused(f"the op's reference does not reproduce the graph: {why}")


def _slots_per_expert(probe: Probe, nodes: list, experts: int) -> list[int]:
    """C at every probe: the expert inputs are the product whose output is [.., E, C, d] (or [.., E*C, d])."""
    for node in nodes:
        if node.op_type != "MatMul":
            continue
        shapes = [probe.runs[run][node.output[0]].shape for run in range(len(probe.runs))]
        if all(len(s) == 4 and s[1] == experts for s in shapes):
            return [s[2] for s in shapes]
    raise NotFused("cannot find the per-expert inputs [B, E, C, d]")


def _simplest_factor(tokens: list[int], slots: list[int], experts: int) -> float | None:
    """The capacity factor with the fewest decimals such that ceil(T * f / E) = C at every probe."""
    low = max(Fraction(c - 1) * experts / t for t, c in zip(tokens, slots))
    high = min(Fraction(c) * experts / t for t, c in zip(tokens, slots))
    for decimals in range(5):
        step = Fraction(1, 10 ** decimals)
        candidate = (low // step + 1) * step  # the first multiple of step above low
        if candidate <= high:
            return float(candidate)
    return None


FAMILY = register(FamilyPass("mixture_of_experts", 30, OP, candidates, match))
