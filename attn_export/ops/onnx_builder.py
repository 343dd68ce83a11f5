"""A small emitter of standard ONNX nodes, used to write each op's decomposition (its function body).

Function bodies cannot hold initializers, so constants become Constant nodes. Reductions are written for the
opset of the model they will run in (ReduceMax/ReduceSum took their axes as an attribute before opset 18/13)."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


class OnnxBuilder:
    def __init__(self, prefix: str, opset: int):
        self.prefix = prefix
        self.opset = opset
        self.nodes = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: list[str] | None = None, n_out: int = 1, **attrs):
        outs = outputs or [self._name(op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self._name(op_type + "_node"), **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        array = np.asarray(value, dtype=dtype)
        out = self._name("const")
        self.nodes.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(array, out)))
        return out

    def branch(self, build, elem_type: int = TensorProto.FLOAT):
        """A subgraph (a branch of an If) holding the nodes `build()` writes through this builder; `build` returns
        the branch's one output."""
        outer, self.nodes = self.nodes, []
        try:
            result = build()
            nodes = self.nodes
        finally:
            self.nodes = outer
        return helper.make_graph(nodes, self._name("branch"), [], [helper.make_tensor_value_info(result, elem_type,
                                                                                                  None)])

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int = 1) -> str:
        new_style = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if new_style:
            return self.op(op_type, x, self.const(axes), keepdims=keepdims)
        return self.op(op_type, x, axes=axes, keepdims=keepdims)

    def unsqueeze(self, x: str, axes: list[int]) -> str:
        return self.op("Unsqueeze", x, self.const(axes))

    def dim(self, shape: str, index: int) -> str:
        """One dimension of a Shape output as a 1-D int64 tensor."""
        return self.op("Slice", shape, self.const([index]), self.const([index + 1]))

    def split_heads(self, x: str, num_heads: int) -> str:
        """[B, N, H*D] -> [B, H, N, D]."""
        if num_heads == 1:  # no data to move: a copy-free view
            return self.unsqueeze(x, [1])
        return self.op("Transpose", self.op("Reshape", x, self.const([0, 0, num_heads, -1])), perm=[0, 2, 1, 3])

    def merge_heads(self, x: str, output: str, num_heads: int = 0) -> str:
        """[B, H, N, D] -> [B, N, H*D]."""
        if num_heads == 1:
            return self.op("Squeeze", x, self.const([1]), outputs=[output])
        return self.op("Reshape", self.op("Transpose", x, perm=[0, 2, 1, 3]), self.const([0, 0, -1]), outputs=[output])

    def transpose_last(self, x: str, rank: int) -> str:
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        return self.op("Transpose", x, perm=perm)
