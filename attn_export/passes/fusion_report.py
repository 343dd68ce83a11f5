"""The fusion report: one row per model layer (the module scope the exporter recorded), each made of the parts the
passes found in it (a fused node, or a region left as it is and why)."""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

import onnx


@dataclass
class LayerResult:
    """One part of a layer: a fused custom node, or attention the passes left in the graph (with the reason)."""
    name: str
    op: str
    status: str  # "fused" or "not fused"
    reason: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self):
        return {"name": self.name, "op": self.op, "status": self.status, "reason": self.reason,
                "attributes": self.attributes}


@dataclass
class ModelLayer:
    """A model layer: fused only when every part of it is (FLASH's layer holds a local and a global op)."""
    name: str
    parts: list[LayerResult]

    @property
    def status(self) -> str:
        return "fused" if all(p.status == "fused" for p in self.parts) else "not fused"

    @property
    def op(self) -> str:
        return " + ".join(dict.fromkeys(p.op for p in self.parts if p.op))

    @property
    def reason(self) -> str:
        return "; ".join(dict.fromkeys(p.reason for p in self.parts if p.status != "fused"))

    @property
    def attributes(self) -> dict[str, Any]:
        """The attributes of the layer's op; for a layer of several ops, per op type."""
        fused = [p for p in self.parts if p.status == "fused"]
        if len(fused) == 1:
            return fused[0].attributes
        return {p.op: p.attributes for p in fused}

    def as_dict(self):
        row = {"name": self.name, "op": self.op, "status": self.status, "reason": self.reason,
               "attributes": self.attributes}
        if len(self.parts) > 1:
            row["parts"] = [p.as_dict() for p in self.parts]
        return row


@dataclass
class FusionReport:
    parts: list[LayerResult] = field(default_factory=list)

    @property
    def layers(self) -> list[ModelLayer]:
        grouped: dict[str, list[LayerResult]] = {}
        for part in self.parts:
            grouped.setdefault(part.name, []).append(part)
        return [ModelLayer(name, parts) for name, parts in grouped.items()]

    @property
    def attention_layers(self) -> int:
        return len(self.layers)

    @property
    def fused(self) -> int:
        return sum(layer.status == "fused" for layer in self.layers)

    @property
    def all_fused(self) -> bool:
        return self.fused == self.attention_layers

    def as_dict(self):
        return {"attention_layers": self.attention_layers, "fused": self.fused,
                "layers": [layer.as_dict() for layer in self.layers]}


def layer_name(node: onnx.NodeProto) -> str:
    """The module path the exporter recorded for a node (dynamo metadata or TorchScript's /a/b/Op name)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in ast.literal_eval(prop.value) if s]
            # the module; the last scope is the op itself, and an op with no module above it is the model's own
            return scopes[-2] if len(scopes) > 1 else TOP_LEVEL
    if node.name.startswith("/"):
        return node.name.rsplit("/", 1)[0].strip("/").replace("/", ".") or TOP_LEVEL
    return node.name or node.op_type  # a graph from another tool: no module scopes, so one row per region


TOP_LEVEL = "(model)"  # attention written in the exported module's own forward
