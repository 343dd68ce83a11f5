"""Triton config.pbtxt: written with Triton's own model_config protobuf (tritonclient ships it), read back and
checked against the model file it describes (names, data types, dims).

A TensorSpec is one model input or output as the model file states it: name, Triton data type, full dims
(-1 where dynamic). With max_batch_size > 0 Triton's dims leave out the first (batch) axis.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..errors import UserError, one_line

SERVE_EXTRA = "pip install 'attn-export[serve]'"
# Triton takes the model name from its folder; keep to names every file system and URL path accept
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

_ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT16: "TYPE_INT16", onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32", onnx.TensorProto.UINT64: "TYPE_UINT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton's name, e.g. TYPE_FP32
    dims: tuple[int, ...]  # every axis, -1 where dynamic


def model_config_pb2():
    """tritonclient's generated model_config module (the serve extra), or one line saying how to get it."""
    try:
        from tritonclient.grpc import model_config_pb2
    except Exception as e:  # ImportError, or a protobuf runtime too old for the generated code
        raise UserError(one_line(f"writing Triton configs needs tritonclient ({SERVE_EXTRA}): {e}")) from None
    return model_config_pb2


def check_model_name(name: str) -> str:
    if not _MODEL_NAME.match(name or ""):
        raise UserError(f"model name '{name}' is not one Triton accepts as a folder: use letters, digits, '_', '-' "
                        "or '.', at most 128, not starting with '.' or '-'")
    return name


def onnx_specs(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's real inputs (initializers excluded) and outputs."""
    initializers = {i.name for i in model.graph.initializer}

    def spec(value) -> TensorSpec:
        tensor = value.type.tensor_type
        if tensor.elem_type not in _ONNX_TO_TRITON:
            raise UserError(f"'{value.name}': ONNX type {onnx.TensorProto.DataType.Name(tensor.elem_type)} has no "
                            "Triton data type")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        return TensorSpec(value.name, _ONNX_TO_TRITON[tensor.elem_type], dims)

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in model.graph.output]


def batch_dims(specs: list[TensorSpec], max_batch_size: int, what: str) -> list[tuple[int, ...]]:
    """Dims as config.pbtxt states them: without the batch axis when max_batch_size > 0, which needs every
    tensor's first axis to be dynamic."""
    if max_batch_size <= 0:
        return [s.dims for s in specs]
    fixed = [s.name for s in specs if not s.dims or s.dims[0] != -1]
    if fixed:
        raise UserError(f"--max-batch-size {max_batch_size}: {what} has no dynamic batch axis on "
                        f"{', '.join(fixed)}; use --max-batch-size 0")
    return [s.dims[1:] for s in specs]


def make_config(*, name: str, platform: str = "", backend: str = "", inputs: list[TensorSpec],
                outputs: list[TensorSpec], max_batch_size: int, dynamic_batching: bool,
                instance_groups: list[dict], parameters: dict[str, str] | None = None) -> str:
    """config.pbtxt text, built as Triton's ModelConfig message. instance_groups: [{"count", "kind", "profile"}]."""
    pb = model_config_pb2()
    config = pb.ModelConfig(name=name, platform=platform, backend=backend, max_batch_size=max_batch_size)
    for spec, dims in zip(inputs, batch_dims(inputs, max_batch_size, "an input")):
        config.input.add(name=spec.name, data_type=pb.DataType.Value(spec.data_type), dims=list(dims))
    for spec, dims in zip(outputs, batch_dims(outputs, max_batch_size, "an output")):
        config.output.add(name=spec.name, data_type=pb.DataType.Value(spec.data_type), dims=list(dims))
    if dynamic_batching:
        config.dynamic_batching.SetInParent()
    for group in instance_groups:
        config.instance_group.add(count=group["count"], kind=pb.ModelInstanceGroup.Kind.Value(group["kind"]),
                                  profile=[str(p) for p in group.get("profile", [])])
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse_config(path: Path):
    """Parse config.pbtxt with Triton's protobuf; a file it rejects is a UserError naming it."""
    from google.protobuf import text_format

    pb = model_config_pb2()
    try:
        return text_format.Parse(Path(path).read_text(), pb.ModelConfig())
    except (OSError, text_format.ParseError) as e:
        raise UserError(one_line(f"{path}: not a Triton model config: {e}")) from None


def config_problems(config, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> list[str]:
    """Where a parsed config disagrees with the model file's tensors (empty when it matches)."""
    pb = model_config_pb2()
    problems = []
    for kind, declared, specs in (("input", config.input, inputs), ("output", config.output, outputs)):
        if [d.name for d in declared] != [s.name for s in specs]:
            problems.append(f"{kind} names {[d.name for d in declared]} vs the model's {[s.name for s in specs]}")
            continue
        try:
            want_dims = batch_dims(specs, config.max_batch_size, f"an {kind}")
        except UserError as e:
            problems.append(str(e))
            continue
        for d, s, dims in zip(declared, specs, want_dims):
            if pb.DataType.Name(d.data_type) != s.data_type:
                problems.append(f"{kind} '{s.name}': {pb.DataType.Name(d.data_type)} vs the model's {s.data_type}")
            if tuple(d.dims) != tuple(dims):
                problems.append(f"{kind} '{s.name}': dims {list(d.dims)} vs the model's {list(dims)}")
    return problems


def validate(path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], model_file: str) -> None:
    config = parse_config(path)
    problems = config_problems(config, inputs, outputs)
    if problems:
        raise UserError(f"{path} does not match {model_file}: {'; '.join(problems)}")
