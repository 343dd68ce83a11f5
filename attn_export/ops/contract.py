"""The custom-op contract: what a fused node is, stated once and read by the passes, the backends, the tests
and (through a test) the C++ plugin creators."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import onnx
from onnx import helper

DOMAIN = "attn_export"
PLUGIN_NAMESPACE = "attn_export"

# ONNX attribute kinds that survive the TensorRT parser (INT arrives as int32, FLOAT as float32, STRING as char[]).
ATTRIBUTE_KINDS = ("int", "ints", "float", "string")


def split_heads(x, num_heads: int):
    """Every op takes q/k/v as [B, N, H*D]; references work per head on [B, H, N, D]."""
    b, n, _ = x.shape
    return x.reshape(b, n, num_heads, -1).transpose(1, 2)


def shape_of_first_input(input_shapes, attrs):
    """Output shape rule: the output is shaped like input 0."""
    return [tuple(input_shapes[0])]


def query_rows_value_width(input_shapes, attrs):
    """Output shape rule for attention: [B, N, H*Dv], rows of the query (input 0), width of the value (input 2)."""
    (batch, n, _), (_, _, value_width) = input_shapes[0], input_shapes[2]
    return [(batch, n, value_width)]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    rank: int
    dtypes: tuple[str, ...]
    doc: str
    optional: bool = False


@dataclass(frozen=True)
class Attribute:
    name: str
    kind: str
    default: Any
    doc: str
    # a string attribute's values, in the order of the kernels' enum codes (attn_export_kernels.h): the one list
    # the passes, the C++ field table (plugin_contracts) and the torch extension all read
    options: tuple[str, ...] = ()

    def __post_init__(self):
        assert self.kind in ATTRIBUTE_KINDS, self.kind
        assert (self.kind == "string") == bool(self.options), f"{self.name}: options go with string attributes"
        assert self.kind != "string" or self.default in self.options, f"{self.name}: default not an option"


@dataclass(frozen=True)
class OpContract:
    op_type: str
    version: int
    doc: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attributes: tuple[Attribute, ...]
    # reference(*torch tensors, **attrs) -> torch tensor (or tuple): the numerical truth for this op
    reference: Callable[..., Any]
    # decompose(builder, input names, output names, attrs): emits standard-ONNX nodes computing the op
    decompose: Callable[..., None]
    # output_shapes(input shapes, attrs) -> output shapes (shapes may hold symbols as strings)
    output_shapes: Callable[..., list[tuple]]
    domain: str = DOMAIN
    extra: dict = field(default_factory=dict)

    def resolve_attrs(self, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults filled in; unknown names rejected (a pass bug, not user input)."""
        attrs = dict(attrs or {})
        unknown = set(attrs) - {a.name for a in self.attributes}
        if unknown:
            raise KeyError(f"{self.op_type} has no attribute(s) {sorted(unknown)}")
        return {a.name: attrs.get(a.name, a.default) for a in self.attributes}

    def make_node(self, inputs: list[str], outputs: list[str], name: str, attrs: dict[str, Any]) -> onnx.NodeProto:
        """The node a pass inserts: every contract attribute written out, plus TensorRT's plugin lookup keys."""
        resolved = self.resolve_attrs(attrs)
        return helper.make_node(
            self.op_type, inputs, outputs, name=name, domain=self.domain,
            plugin_version=str(self.version), plugin_namespace=PLUGIN_NAMESPACE, **resolved,
        )

    def node_attrs(self, node: onnx.NodeProto) -> dict[str, Any]:
        """Attributes of a node of this op, with defaults for the missing ones (as TensorRT's parser does)."""
        names = {a.name for a in self.attributes}
        present = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in names}
        present = {k: v.decode() if isinstance(v, bytes) else v for k, v in present.items()}
        return self.resolve_attrs(present)
