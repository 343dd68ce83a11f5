"""Engine precision, decided without TensorRT.

TensorRT 10 is weakly typed: an fp32 graph becomes an fp16 or bf16 engine through the builder flags FP16/BF16,
and every plugin offers fp32/fp16/bf16 so TensorRT may pick the fastest. TensorRT 11 is strongly typed and has
no such flags: the engine computes in the graph's own types, so an fp16 engine needs an fp16 graph.
"""
from __future__ import annotations

import onnx

from ..errors import UserError

PRECISIONS = ("fp32", "fp16", "bf16")
_FLAG = {"fp16": "FP16", "bf16": "BF16"}
_ONNX_NAME = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.DOUBLE: "float64"}


def graph_float_types(model: onnx.ModelProto) -> set[str]:
    """Floating element types of the graph's inputs and initializers ("float32", "float16", ...)."""
    types = {_FLOAT_TYPES.get(v.type.tensor_type.elem_type) for v in model.graph.input}
    types |= {_FLOAT_TYPES.get(t.data_type) for t in model.graph.initializer}
    return {t for t in types if t}


def builder_flags(precision: str, *, tensorrt_version: str, available_flags: set[str],
                  graph_types: set[str]) -> list[str]:
    """The BuilderFlag names to set for `precision` ("FP16", "BF16"), or a one-line UserError when this TensorRT
    cannot give that precision for this graph."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if precision == "fp32":
        return []
    flag = _FLAG[precision]
    if flag in available_flags:
        return [flag]
    wanted = _ONNX_NAME[precision]
    if wanted in graph_types:
        return []  # strongly typed and the graph already is in that precision
    have = ", ".join(sorted(graph_types)) or "no floating tensors"
    raise UserError(f"TensorRT {tensorrt_version} is strongly typed (no {flag} builder flag), so the engine computes "
                    f"in the graph's types ({have}): export the model in {wanted} for a {precision} engine")


def parity_tolerances(precision: str) -> tuple[float, float]:
    """(atol, rtol) for comparing an engine of this precision with float32 torch: those of its compute dtype."""
    from ..check import default_tolerances

    return default_tolerances(_ONNX_NAME[precision])
