"""Whether a score tensor is finite wherever the graph's inputs are.

A softmax row of finite scores always has a visible key, so a pass that proves the scores finite needs no
masked-row check (DenseAttention's masked_rows "none"), and a query-side bias term proved finite is one the softmax
ignores (separable_bias). The proof walks the producers: no op on the way may make inf or NaN out of finite numbers
(overflow aside, which the graph being replaced suffers alike) and no weight, constant or shape-computed tensor read
may hold one.
"""
from __future__ import annotations

import numpy as np
import onnx

from .framework import Rewrite
from .graph import GraphIndex
from .probe import Probe

# ops that can make inf or NaN out of finite inputs (overflow aside); Div is safe by a static divisor without zeros
NOT_FINITE_SAFE = {"Log", "Div", "Reciprocal", "Sqrt", "Pow"}


class FiniteCheck:
    """Whether a tensor is finite wherever the graph's inputs are: no op on its way from them makes inf or NaN out
    of finite numbers, and no weight, constant or shape-computed tensor it reads holds one. Conservative: a layer
    after one whose bias may hold -inf is refused, though the model may clean its output."""

    def __init__(self, index: GraphIndex, probe: Probe, trial: Rewrite | None = None, half: bool = False):
        trial = trial or Rewrite()
        self.index, self.probe, self.half = index, probe, half
        self.producer = {**index.producer, **{o: n for n in trial.nodes for o in n.output}}
        self.constants = {**index.initializers, **{t.name: t for t in trial.initializers}}
        self.safe: set[str] = set()

    def __call__(self, tensor: str) -> bool:
        todo, seen = [tensor], set()
        while todo:
            name = todo.pop()
            if not name or name in seen or name in self.safe:
                continue
            seen.add(name)
            if name in self.constants:
                if not self._finite(onnx.numpy_helper.to_array(self.constants[name])):
                    return False
                continue
            if self.index.is_static(name):  # computed from weights and shapes alone: read its values
                if not all(self._finite(run[name]) for run in self.probe.runs):
                    return False
                continue
            node = self.producer.get(name)
            if node is None or node.op_type in ("Shape", "Size"):  # a graph input, or sizes only
                continue
            if node.op_type in NOT_FINITE_SAFE and not (node.op_type == "Div" and self._nonzero_static(node.input[1])):
                return False
            todo.extend(node.input)
        self.safe |= seen
        return True

    def _nonzero_static(self, tensor: str) -> bool:
        return self.index.is_static(tensor) and all(np.all(run[tensor] != 0) for run in self.probe.runs)

    def _finite(self, values) -> bool:
        values = np.asarray(values)
        if self.half and values.dtype.kind == "f":  # an fp16 engine holds it in half: finfo(float32).min is -inf
            with np.errstate(over="ignore"):
                values = values.astype(np.float16)
        return bool(np.isfinite(values).all()) if values.dtype.kind in "fc" else True
