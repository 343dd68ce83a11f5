"""`attn-export plugins check`: the plugin library's own C++ rules on every custom node of a fused graph, with no
GPU and no TensorRT.

Per node, in the order TensorRT's ONNX parser, builder and runtime call them (plugins_trt/trt/tests/
rules_harness.cpp --check): creator lookup by name, plugin_version and plugin_namespace; createPlugin with the
node's attributes as the parser passes them (INT as int32, FLOAT as float32, STRING as char); the output shape
rule, onShapeChange's shape checks and kernel params at the profile's min, opt and max shapes;
supportsFormatCombination with the element types the graph feeds at the chosen precision; the launch limits and
workspace the kernel library states on the host (plugins_trt/kernels/launch_plan.h).

The rules are compiled once per source hash with the host C++ compiler and cached (ATTN_EXPORT_CACHE, else
~/.cache/attn-export). Without a compiler the check cannot run and says so: it never passes silently.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .errors import UserError
from .ops import DOMAIN, OPS

ROOT = Path(__file__).resolve().parents[1]
TRT_DIR = ROOT / "plugins_trt" / "trt"
KERNELS_DIR = ROOT / "plugins_trt" / "kernels"
RULE_SOURCES = ("tests/rules_harness.cpp", "fields.cpp", "block_sparse_attention.cpp", "dense_attention.cpp",
                "kernelized_attention.cpp", "disentangled_attention.cpp", "mixture_of_experts.cpp",
                "long_convolution.cpp")
FLAGS = ("-std=c++17", "-O1")
PRECISIONS = ("fp32", "fp16", "bf16")
_PRECISION_TYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_CUDA_STUB = ("#pragma once\ntypedef enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1, "
              "cudaErrorInvalidConfiguration = 9 } cudaError_t;\ntypedef struct CUstream_st* cudaStream_t;\n")


@dataclass
class NodeResult:
    name: str
    op_type: str
    accepted: bool
    detail: str  # "workspace=... output=..." or why the node is refused


# ------------------------------------------------------------------------------------------------ the harness
def find_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cuda_include() -> Path | None:
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "include" / "cuda_runtime_api.h").is_file():
            return Path(candidate) / "include"
    return None


def _sources() -> list[Path]:
    """Everything the harness is built from: its sources and every header they may include."""
    files = [TRT_DIR / s for s in RULE_SOURCES]
    files += sorted(TRT_DIR.glob("*.h")) + sorted((TRT_DIR / "tests").glob("*.h"))
    files += [KERNELS_DIR / "attn_export_kernels.h", KERNELS_DIR / "launch_plan.h"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"plugins check: the plugin sources are not here ({missing[0]} missing)")
    return files


def cache_dir() -> Path:
    return Path(os.environ.get("ATTN_EXPORT_CACHE") or Path.home() / ".cache" / "attn-export") / "plugin-rules"


def harness_binary() -> Path:
    """The compiled rules harness for the current sources, built on first use (UserError when it cannot be)."""
    compiler = find_compiler()
    if compiler is None:
        raise UserError("plugins check needs a C++17 compiler (c++, g++ or clang++, or CXX) to run the plugin rules")
    cuda = _cuda_include()
    digest = hashlib.sha256()
    for part in (compiler, *FLAGS, str(cuda)):
        digest.update(part.encode() + b"\0")
    for f in _sources():
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    target = cache_dir() / digest.hexdigest()[:16] / "rules_harness"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        include = ["-isystem", str(cuda)] if cuda else []
        if cuda is None:  # the kernel header needs only two CUDA types
            (Path(tmp) / "cuda_runtime_api.h").write_text(_CUDA_STUB)
            include = ["-isystem", tmp]
        out = Path(tmp) / "rules_harness"
        command = [compiler, *FLAGS, "-I", str(KERNELS_DIR), *include, *RULE_SOURCES, "-o", str(out)]
        try:
            result = subprocess.run(command, cwd=TRT_DIR, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise UserError(f"plugins check: compiling the plugin rules failed ({e})") from None
        if result.returncode != 0:
            first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
            raise UserError(f"plugins check: compiling the plugin rules failed: {first[:300]}")
        os.replace(out, target)  # atomic: a concurrent run sees the old state or the whole binary
    return target


# ------------------------------------------------------------------------------------------------ the graph
def _field_lines(node: onnx.NodeProto) -> list[str]:
    """The node's attributes as the ONNX parser hands them to createPlugin (plugin_version and plugin_namespace
    pick the creator and are not fields)."""
    lines = []
    for attr in node.attribute:
        if attr.name in ("plugin_version", "plugin_namespace"):
            continue
        value = helper.get_attribute_value(attr)
        if attr.type == onnx.AttributeProto.INT:
            lines.append(f"field {attr.name}:int32:{int(value)}")
        elif attr.type == onnx.AttributeProto.INTS:
            lines.append(f"field {attr.name}:int32:{','.join(str(int(v)) for v in value)}")
        elif attr.type == onnx.AttributeProto.FLOAT:
            lines.append(f"field {attr.name}:float32:{float(value)!r}")
        elif attr.type == onnx.AttributeProto.STRING:
            text = value.decode(errors="replace")
            if any(c.isspace() for c in text):
                lines.append(f"field {attr.name}:int64:")  # a string the creator cannot hold: refused as a type
            else:
                lines.append(f"field {attr.name}:char:{text}")
        else:  # TensorRT's parser drops tensor and graph attributes; the creator then sees no such field
            lines.append(f"field {attr.name}:int64:")
    return lines


def _attr_string(node: onnx.NodeProto, name: str) -> str:
    for attr in node.attribute:
        if attr.name == name:
            value = helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def custom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN]


def profile_points(model: onnx.ModelProto, min_shapes=None, opt_shapes=None, max_shapes=None) -> list[dict]:
    """Input shapes at the profile's min, opt and max: given trtexec-style, else the shapes recorded at export
    (the ones the build's parity check and its default profile use), spanned per dimension."""
    from .backends.tensorrt_profiles import (ProfileRequest, covering_profile, model_inputs)
    from .passes.probe import probe_shapes

    request = ProfileRequest.from_options(min_shapes, opt_shapes, max_shapes)
    inputs = model_inputs(model)
    profiles = request.resolve(inputs)
    if profiles:
        profile = profiles[0]
    else:
        profile = covering_profile([{k: tuple(v) for k, v in s.items()} for s in probe_shapes(model)])
    for name, dims in inputs.items():
        if name not in profile:
            if any(not isinstance(d, int) for d in dims):
                raise UserError(f"plugins check: no shape for dynamic input '{name}' (give --opt-shapes)")
            profile[name] = (tuple(dims),) * 3
    return [{name: shapes[i] for name, shapes in profile.items()} for i in range(3)]


def shape_stand_ins(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with each custom node replaced by zeros of the shape its contract's output rule gives and input
    0's type: shapes and types flow as TensorRT sees them, and a node the plugins would refuse (a width its
    num_heads cannot split) needs not run to be judged."""
    from .plugin_contracts import output_rule

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    nodes = []
    for node in copy.graph.node:
        contract = OPS.get(node.op_type) if node.domain == DOMAIN else None
        if contract is None:
            nodes.append(node)
            continue
        tag, dims = f"{node.name or node.output[0]}/stand_in", []
        for k, source in enumerate(output_rule(contract)):
            if isinstance(source, int):
                nodes.append(helper.make_node("Constant", [], [f"{tag}/d{k}"],
                                              value=onnx.numpy_helper.from_array(np.array([source], np.int64))))
            else:
                i, d = source
                nodes.append(helper.make_node("Shape", [node.input[i]], [f"{tag}/d{k}"], start=d, end=d + 1))
            dims.append(f"{tag}/d{k}")
        nodes.append(helper.make_node("Concat", dims, [f"{tag}/shape"], axis=0))
        nodes.append(helper.make_node("ConstantOfShape", [f"{tag}/shape"], [f"{tag}/zeros"]))
        nodes.append(helper.make_node("CastLike", [f"{tag}/zeros", node.input[0]], [node.output[0]]))
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    del copy.functions[:]
    default = next((o for o in copy.opset_import if o.domain in ("", "ai.onnx")), None)
    if default is not None and default.version < 15:  # CastLike and Shape(start, end) are opset 15
        default.version = 15
    return copy


def _node_tensors(model: onnx.ModelProto, point: dict) -> dict[str, np.ndarray]:
    """Every custom node's input at these graph-input shapes: the graph run on onnxruntime with the custom nodes
    as shape stand-ins (only shapes and element types are read)."""
    from .passes.probe import random_inputs, run_all_tensors

    feeds = random_inputs(model, {k: list(v) for k, v in point.items()}, seed=0)
    try:
        return run_all_tensors(shape_stand_ins(model), feeds)
    except Exception as e:  # onnxruntime's own message, as one line
        raise UserError(f"plugins check: cannot run the graph at {point}: {str(e).splitlines()[0]}") from None


def _element(value: np.ndarray, precision: str) -> str:
    """The element type TensorRT gives this plugin input: the graph's own type, except that float32 tensors of a
    graph built at fp16/bf16 take that precision (TensorRT 10's weak typing; TensorRT 11 needs a graph in that
    type, which then feeds it directly)."""
    name = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
            np.dtype(np.int32): "int32"}.get(np.asarray(value).dtype, "other")
    return _PRECISION_TYPE[precision] if name == "float32" else name


def _shape_text(shape) -> str:
    return "x".join(str(int(d)) for d in shape) if len(shape) else "s"


def check_model(model: onnx.ModelProto, precision: str = "fp32", *, min_shapes=None, opt_shapes=None,
                max_shapes=None) -> list[NodeResult]:
    """One result per custom node (empty when the graph has none)."""
    return check_model_at(model, (precision,), min_shapes=min_shapes, opt_shapes=opt_shapes,
                          max_shapes=max_shapes)[precision]


def check_model_at(model: onnx.ModelProto, precisions=("fp32", "fp16"), *, min_shapes=None, opt_shapes=None,
                   max_shapes=None) -> dict[str, list[NodeResult]]:
    """check_model at several precisions, the graph run once per profile point."""
    for precision in precisions:
        if precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    nodes = custom_nodes(model)
    if not nodes:
        return {p: [] for p in precisions}
    binary = harness_binary()
    points = profile_points(model, min_shapes, opt_shapes, max_shapes)
    runs, seen = [], {}
    for point in points:  # min and opt are often the same shapes: run those once
        key = repr(sorted(point.items()))
        if key not in seen:
            seen[key] = _node_tensors(model, point)
        runs.append(seen[key])
    return {p: _judge(binary, nodes, runs, p) for p in precisions}


def _judge(binary: Path, nodes: list[onnx.NodeProto], runs: list[dict], precision: str) -> list[NodeResult]:
    lines = []
    for node in nodes:
        ns = _attr_string(node, "plugin_namespace") or "-"
        lines.append(f"node {node.name or node.output[0]} {node.op_type} {_attr_string(node, 'plugin_version')} {ns}")
        lines += _field_lines(node)
        for name in node.input:
            if not name:
                break  # an omitted optional input ends the list TensorRT passes
            values = [r.get(name) for r in runs]
            if any(v is None for v in values):
                raise UserError(f"plugins check: node '{node.name}' reads '{name}', which the graph never computes")
            shapes = " ".join(_shape_text(np.shape(v)) for v in values)
            lines.append(f"input {_element(values[0], precision)} {shapes}")
        lines.append("end")
    try:
        result = subprocess.run([str(binary), "--check"], input="\n".join(lines) + "\n", capture_output=True,
                                text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"plugins check: the rules harness did not run ({e})") from None
    if result.returncode not in (0, 1):
        raise UserError(f"plugins check: the rules harness failed: {result.stderr.strip()[:300]}")
    results = []
    for node, line in zip(nodes, result.stdout.splitlines()):
        verdict, _, rest = line.partition(" ")
        name, _, detail = rest.partition(": " if verdict == "refused" else " ")
        results.append(NodeResult(name, node.op_type, verdict == "ok", detail))
    if len(results) != len(nodes):
        raise UserError(f"plugins check: the rules harness answered for {len(results)} of {len(nodes)} nodes")
    return results


def check_file(path: Path, precision: str = "fp32", **shapes) -> list[NodeResult]:
    from .export import load_onnx

    return check_model(load_onnx(path), precision, **shapes)
