"""Attach each custom node's decomposition as a model-local function, in memory, so any ONNX runtime runs it.

The file on disk keeps custom nodes only (TensorRT 10.3 would inline a function instead of calling the plugin).
A function body cannot branch on attribute values, so every distinct attribute set gets its own function,
named `<OpType>__<n>`, and the node in the in-memory copy is renamed to call it."""
from __future__ import annotations

import onnx
from onnx import helper

from . import OPS
from .contract import DOMAIN
from .onnx_builder import OnnxBuilder


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 20)


def with_function_bodies(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = default_opset(out)
    variants: dict[tuple, str] = {}
    for node in _all_nodes(out.graph):
        contract = OPS.get(node.op_type) if node.domain == DOMAIN else None
        if contract is None:
            continue
        attrs = contract.node_attrs(node)
        key = (node.op_type, len(node.input), len(node.output), tuple(sorted(attrs.items())))
        if key not in variants:
            name = f"{node.op_type}__{len(variants)}"
            variants[key] = name
            out.functions.append(_function(contract, name, len(node.input), len(node.output), attrs, opset))
        node.op_type = variants[key]
    if variants and not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return out


def _function(contract, name, n_in, n_out, attrs, opset) -> onnx.FunctionProto:
    inputs = [f"in{i}" for i in range(n_in)]
    outputs = [f"out{i}" for i in range(n_out)]
    builder = OnnxBuilder(name, opset)
    contract.decompose(builder, inputs, outputs, attrs)
    return helper.make_function(DOMAIN, name, inputs, outputs, builder.nodes,
                                opset_imports=[helper.make_opsetid("", opset)])


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
