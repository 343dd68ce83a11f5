"""The plugins' TensorRT-free logic, compiled with the host C++ compiler and driven from here: field parsing and
serialization (plugins_trt/trt/fields.cpp) and, per op, the shape checks, kernel params and output shapes
(plugins_trt/trt/<op>.cpp), compared with the op contracts and their torch references.

Needs a C++17 compiler (c++ / g++ / clang++); skipped without one. The kernel header includes
cuda_runtime_api.h: the real one when a CUDA toolkit is installed, else a two-typedef stand-in.
"""
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from attn_export.ops import OPS
from attn_export.ops.kernelized_attention import STABILIZERS
from attn_export.plugin_contracts import STRING_OPTIONS

ROOT = Path(__file__).resolve().parents[1]
TRT_DIR = ROOT / "plugins_trt" / "trt"
KERNELS_DIR = ROOT / "plugins_trt" / "kernels"
RULE_SOURCES = ["tests/rules_harness.cpp", "fields.cpp", "block_sparse_attention.cpp", "dense_attention.cpp",
                "kernelized_attention.cpp", "disentangled_attention.cpp", "mixture_of_experts.cpp",
                "long_convolution.cpp"]


def cxx() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cuda_include_dirs(tmp: Path) -> list[str]:
    """The CUDA runtime headers, or a stand-in declaring the two types the kernel header uses."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "include" / "cuda_runtime_api.h").is_file():
            return ["-isystem", str(Path(candidate) / "include")]
    stub = tmp / "cuda_stub"
    stub.mkdir(exist_ok=True)
    (stub / "cuda_runtime_api.h").write_text(
        "#pragma once\ntypedef enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1 } cudaError_t;\n"
        "typedef struct CUstream_st* cudaStream_t;\n")
    return ["-isystem", str(stub)]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    compiler = cxx()
    if compiler is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) on PATH")
    tmp = tmp_path_factory.mktemp("rules")
    binary = tmp / "rules_harness"
    command = [compiler, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-I", str(KERNELS_DIR),
               *cuda_include_dirs(tmp), *RULE_SOURCES, "-o", str(binary)]
    result = subprocess.run(command, cwd=TRT_DIR, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    def run(op: str, fields: dict | None = None, shapes: list | None = None) -> dict:
        args = [str(binary), op]
        for name, spec in (fields or {}).items():
            args += ["--field", f"{name}:{spec}"]
        for shape in shapes or []:
            args += ["--shape", "x".join(str(d) for d in shape)]
        out = subprocess.run(args, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
        parsed = {}
        for line in out.stdout.splitlines():
            key, _, value = line.partition(": ")
            parsed[key] = value
        if "params" in parsed:
            parsed["params"] = {k: float(v) for k, v in (item.split("=") for item in parsed["params"].split())}
        return parsed

    return run


def describe_defaults(contract) -> str:
    parts = []
    for a in contract.attributes:
        value = a.default
        if a.kind == "float":
            value = f"{value:.9g}"
        parts.append(f"{a.name}={value}")
    return ",".join(parts)


def parse_describe(text: str) -> dict:
    return dict(item.split("=", 1) for item in text.split(","))


# ------------------------------------------------------------------------------------------------ fields
@pytest.mark.parametrize("op", sorted(OPS))
def test_defaults_are_the_contract_defaults(harness, op):
    contract = OPS[op]
    result = harness(op)
    assert "error" not in result
    got = parse_describe(result["fields"])
    for a in contract.attributes:
        if a.kind == "float":
            assert math.isclose(float(got[a.name]), a.default, rel_tol=1e-6, abs_tol=0.0), a.name
        else:
            assert got[a.name] == str(a.default), a.name
    assert result["roundtrip"] == result["fields"]


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_field_round_trips_through_serialization(harness, op):
    """Non-default values of every field, passed as the ONNX parser passes them (int32, float32, char with NUL),
    come back unchanged from the serialized form a runtime-phase plugin is created from."""
    contract = OPS[op]
    fields, expected = {}, {}
    for i, a in enumerate(contract.attributes):
        if a.kind == "int":
            flags = {"causal": 1, "normalize": 0, "logits_input": 1, "count_repeats": 1, "c2p": 0, "p2c": 0}
            if op == "KernelizedAttention":  # its last stabilizer (projection) is non-causal only; causal=1 is
                flags["causal"] = 0          # round-tripped by test_params_and_output_shape
            value = flags.get(a.name, a.default + 3 + i)  # 0/1 flags flip
            fields[a.name], expected[a.name] = f"int32:{value}", str(value)
        elif a.kind == "float":
            value = 0.375 + i
            fields[a.name], expected[a.name] = f"float32:{value}", f"{value:.9g}"
        elif a.kind == "string":
            value = STRING_OPTIONS[(op, a.name)][-1]
            fields[a.name], expected[a.name] = f"char0:{value}", value
    result = harness(op, fields)
    assert "error" not in result, result
    assert parse_describe(result["fields"]) == expected
    assert result["roundtrip"] == result["fields"]


def test_field_types_the_parser_may_send(harness):
    # ints: any integer width that fits int32; strings with or without the NUL
    assert parse_describe(harness("BlockSparseAttention", {"num_heads": "int8:4"})["fields"])["num_heads"] == "4"
    assert parse_describe(harness("BlockSparseAttention", {"num_heads": "int64:12"})["fields"])["num_heads"] == "12"
    assert parse_describe(harness("MixtureOfExperts", {"activation": "char:gelu"})["fields"])["activation"] == "gelu"
    assert parse_describe(harness("DenseAttention", {"scale": "float64:0.25"})["fields"])["scale"] == "0.25"


@pytest.mark.parametrize("op, field, spec, message", [
    ("BlockSparseAttention", "num_heads", "float32:4", "needs one integer"),
    ("BlockSparseAttention", "num_heads", "int32:4,5", "needs one integer, got 2"),
    ("BlockSparseAttention", "num_heads", "int64:4294967296", "does not fit int32"),
    ("BlockSparseAttention", "scale", "int32:1", "needs one float32"),
    ("BlockSparseAttention", "scale", "float32:inf", "not finite"),
    ("BlockSparseAttention", "heads", "int32:4", "unknown field 'heads'"),
    ("KernelizedAttention", "feature_map", "char0:softmax", "is not one of: favor_positive, elu_plus_one, identity"),
    ("KernelizedAttention", "feature_map", "int32:1", "needs characters"),
    ("KernelizedAttention", "stabilizer", "char0:amax", "is not one of: logits, projection"),
    ("MixtureOfExperts", "activation", "char0:swish", "is not one of: relu, gelu"),
    ("DenseAttention", "score_fn", "char0:relu", "'score_fn' (string) = 'relu' is not one of: softmax, relu_squared"),
    ("DenseAttention", "score_fn", "int32:1", "needs characters"),
    ("DenseAttention", "masked_rows", "char0:uniform", "'masked_rows' (string) = 'uniform' is not one of: zeros, mean"),
    ("DisentangledAttention", "masked_rows", "char0:nan", "is not one of: zeros, mean"),
])
def test_bad_fields_are_refused(harness, op, field, spec, message):
    assert message in harness(op, {field: spec})["error"]


@pytest.mark.parametrize("op, fields, message", [
    ("BlockSparseAttention", {"num_heads": "int32:0"}, "num_heads must be at least 1"),
    ("BlockSparseAttention", {"block_size": "int32:0"}, "block_size must be at least 1"),
    ("BlockSparseAttention", {"global_blocks": "int32:-1"}, "global_blocks must not be negative"),
    ("DenseAttention", {"causal": "int32:2"}, "causal must be 0 or 1"),
    ("DenseAttention", {"logits_input": "int32:2"}, "logits_input must be 0 or 1"),
    ("KernelizedAttention", {"normalize": "int32:-1"}, "normalize must be 0 or 1"),
    ("KernelizedAttention", {"eps": "float32:-1"}, "eps must not be negative"),
    ("KernelizedAttention", {"causal": "int32:1", "stabilizer": "char0:projection"},
     "stabilizer projection is defined for causal=0 only"),
    ("DisentangledAttention", {"span": "int32:0"}, "span must be at least 1"),
    ("DisentangledAttention", {"span": "int32:1"}, "need span >= 2"),
    ("DisentangledAttention", {"max_position": "int32:-2"}, "max_position must not be negative"),
    ("DisentangledAttention", {"c2p": "int32:2"}, "c2p must be 0 or 1"),
    ("DisentangledAttention", {"p2c": "int32:-1"}, "p2c must be 0 or 1"),
    ("BlockSparseAttention", {"count_repeats": "int32:2"}, "count_repeats must be 0 or 1"),
    ("MixtureOfExperts", {"capacity": "int32:-1"}, "capacity must not be negative"),
    ("MixtureOfExperts", {"capacity_factor": "float32:0"}, "capacity_factor must be positive"),
    ("LongConvolution", {"channels": "int32:-1"}, "channels must not be negative"),
])
def test_out_of_range_fields_are_refused(harness, op, fields, message):
    assert message in harness(op, fields)["error"]


# ------------------------------------------------------------------------------------------------ shapes
CASES = {
    # op: (fields for the harness, attrs for the reference, input shapes, expected params)
    "BlockSparseAttention": (
        {"num_heads": "int32:4", "block_size": "int32:8", "global_blocks": "int32:1"},
        dict(num_heads=4, block_size=8, global_blocks=1),
        [(2, 32, 64), (2, 32, 64), (2, 32, 64), (1, 4, 3)],
        dict(batch=2, seq_len=32, head_dim=16, index_heads=1, blocks_per_row=3, num_heads=4, block_size=8,
             global_blocks=1, scale=0)),
    "DenseAttention": (
        {"num_heads": "int32:2", "causal": "int32:1", "score_fn": "char0:relu_squared"},
        dict(num_heads=2, causal=1, score_fn="relu_squared"),
        [(3, 5, 16), (3, 7, 16), (3, 7, 12), (3, 1, 5, 7)],
        dict(batch=3, q_len=5, kv_len=7, head_dim=8, v_head_dim=6, bias_batch=3, bias_heads=1, num_heads=2,
             causal=1, scale=0, score_fn=1, logits_input=0)),
    "KernelizedAttention": (
        {"num_heads": "int32:2", "causal": "int32:1"},
        dict(num_heads=2, causal=1),
        [(2, 9, 16), (2, 9, 16), (2, 9, 20), (6, 8)],
        dict(batch=2, seq_len=9, head_dim=8, v_head_dim=10, num_features=6, num_heads=2, feature_map=0, causal=1,
             normalize=1)),
    "DisentangledAttention": (
        {"num_heads": "int32:2", "span": "int32:4", "max_position": "int32:8"},
        dict(num_heads=2, span=4, max_position=8),
        [(1, 10, 12), (1, 10, 12), (1, 10, 12), (8, 12), (8, 12)],
        dict(batch=1, seq_len=10, head_dim=6, num_heads=2, span=4, max_position=8)),
    "MixtureOfExperts": (
        {"capacity_factor": "float32:1.5", "activation": "char0:gelu"},
        dict(capacity_factor=1.5, activation="gelu"),
        [(2, 6, 8), (8, 4), (4, 8, 16), (4, 16, 8)],
        dict(batch=2, tokens=6, model_dim=8, ffn_dim=16, num_experts=4, capacity=0, capacity_factor=1.5,
             activation=1)),
    "LongConvolution": (
        {"channels": "int32:5"},
        dict(channels=5),
        [(2, 7, 5), (5, 9), (5,), (5, 9)],
        dict(batch=2, seq_len=7, kernel_len=9, channels=5)),
}


def _reference_output_shape(op, attrs, shapes):
    contract = OPS[op]
    tensors = [torch.randn(*s) for s in shapes]
    if op == "BlockSparseAttention":
        nb = shapes[0][1] // attrs["block_size"]
        tensors[3] = torch.randint(-1, nb, shapes[3], dtype=torch.int32)
    return tuple(contract.reference(*tensors, **attrs).shape)


def _kernel_param_fields(struct: str) -> list[str]:
    header = (ROOT / "plugins_trt" / "kernels" / "attn_export_kernels.h").read_text()
    body = re.search(rf"struct {struct} \{{(.*?)\n\}};", header, re.S).group(1)
    return [m.group(1) for m in re.finditer(r"^\s+(?:int32_t|float) (\w+);", body, re.M)]


@pytest.mark.parametrize("op", sorted(CASES))
def test_params_and_output_shape(harness, op):
    fields, attrs, shapes, expected = CASES[op]
    result = harness(op, fields, shapes)
    assert "error" not in result, result.get("error")
    params = result["params"]
    for name, value in expected.items():
        assert params[name] == pytest.approx(value), name
    # the harness prints every non-pointer field of the kernel's params struct
    struct = {"KernelizedAttention": "KernelizedAttentionParams"}.get(op, op + "Params")
    assert list(params) == _kernel_param_fields(struct)
    # output shape: the contract's rule, and what the torch reference produces for these inputs
    output = tuple(int(d) for d in result["output"].split("x"))
    assert output == tuple(OPS[op].output_shapes(shapes, OPS[op].resolve_attrs(attrs))[0])
    assert output == _reference_output_shape(op, attrs, shapes)


def test_optional_inputs_may_be_left_out(harness):
    dense = harness("DenseAttention", {}, [(1, 4, 8), (1, 6, 8), (1, 6, 8)])
    assert dense["params"]["bias_batch"] == 1 and dense["params"]["bias_heads"] == 1
    conv = harness("LongConvolution", {}, [(2, 7, 5), (5, 9), (5,)])
    assert conv["output"] == "2x7x5"
    identity = harness("KernelizedAttention", {"feature_map": "char0:identity"}, [(1, 4, 8), (1, 4, 8), (1, 4, 8)])
    assert identity["params"]["num_features"] == 0
    favor = harness("KernelizedAttention", {}, [(1, 4, 8), (1, 4, 8), (1, 4, 8)])
    assert "needs the projection input" in favor["error"]


@pytest.mark.parametrize("op, fields, shapes, message", [
    ("BlockSparseAttention", {"block_size": "int32:8"}, [(1, 30, 8), (1, 30, 8), (1, 30, 8), (1, 3, 2)],
     "not a multiple of block_size"),
    ("BlockSparseAttention", {"num_heads": "int32:3"}, [(1, 16, 8), (1, 16, 8), (1, 16, 8), (1, 1, 1)],
     "not a multiple of num_heads"),
    ("BlockSparseAttention", {"num_heads": "int32:2", "block_size": "int32:8"},
     [(1, 16, 8), (1, 16, 8), (1, 16, 8), (3, 2, 1)], "first axis must be 1 or num_heads"),
    ("BlockSparseAttention", {"block_size": "int32:8"}, [(1, 16, 8), (1, 16, 8), (1, 16, 8), (1, 3, 1)],
     "second axis must be sequence length / block_size = 2"),
    ("BlockSparseAttention", {}, [(1, 64, 8), (1, 32, 8), (1, 64, 8), (1, 1, 1)], "must have the query's shape"),
    ("BlockSparseAttention", {}, [(1, 64, 8), (1, 64, 8), (1, 64, 8)], "takes 4 to 5 inputs, got 3"),
    ("BlockSparseAttention", {}, [(64, 8), (1, 64, 8), (1, 64, 8), (1, 1, 1)], "must have rank 3"),
    ("DenseAttention", {}, [(1, 4, 8), (1, 6, 4), (1, 6, 8)], "must match the query"),
    ("DenseAttention", {}, [(1, 4, 8), (1, 6, 8), (1, 5, 8)], "must match the key"),
    ("DenseAttention", {"num_heads": "int32:2"}, [(1, 4, 8), (1, 6, 8), (1, 6, 8), (1, 3, 4, 6)], "input 'bias'"),
    ("DenseAttention", {}, [(1, 4, 8), (1, 6, 8), (1, 6, 8), (1, 1, 4, 5)], "input 'bias'"),
    ("KernelizedAttention", {}, [(1, 4, 8), (1, 4, 8), (1, 4, 8), (6, 4)], "input 'projection'"),
    ("DisentangledAttention", {"span": "int32:4"}, [(1, 4, 8), (1, 4, 8), (1, 4, 8), (7, 8), (8, 8)],
     "input 'rel_key'"),
    ("DisentangledAttention", {"span": "int32:4"}, [(1, 4, 8), (1, 4, 8), (1, 4, 8), (8, 8), (8, 6)],
     "input 'rel_query'"),
    ("MixtureOfExperts", {}, [(1, 4, 8), (6, 2), (2, 8, 4), (2, 4, 8)], "input 'router'"),
    ("MixtureOfExperts", {}, [(1, 4, 8), (8, 2), (3, 8, 4), (2, 4, 8)], "input 'expert_in'"),
    ("LongConvolution", {}, [(1, 9, 4), (4, 8), (4,)], "taps >= sequence length 9"),
    ("LongConvolution", {"channels": "int32:3"}, [(1, 4, 4), (4, 8), (4,)], "the channels field says 3"),
    ("LongConvolution", {}, [(1, 4, 4), (4, 8), (4,), (4, 9)], "must have the kernel's shape"),
    ("LongConvolution", {}, [(1, 4, 4), (4, 8), (4,), (4, 8), (4, 8)], "takes 3 to 4 inputs, got 5"),
    ("DenseAttention", {}, [(1, 3000000000, 8), (1, 6, 8), (1, 6, 8)], "outside the kernels' int32 range"),
    ("DenseAttention", {"logits_input": "int32:1"}, [(1, 4, 8), (1, 6, 8), (1, 6, 8)],
     "logits_input=1 needs the logits as the bias input"),
    ("DenseAttention", {"logits_input": "int32:1"}, [(1, 4, 8), (1, 6, 8), (1, 6, 8), (1, 1, 4, 5)],
     "must be [1 or 1, 1 or 1, 4, 6] (the logits)"),
    ("DenseAttention", {"logits_input": "int32:1", "num_heads": "int32:2"},
     [(1, 4, 8), (1, 6, 8), (1, 6, 8), (1, 3, 4, 6)], "input 'bias'"),
    ("DenseAttention", {"logits_input": "int32:1", "num_heads": "int32:2"},
     [(1, 4, 8), (1, 6, 8), (1, 6, 7), (1, 1, 4, 6)], "value width 7 must be a multiple of num_heads 2"),
    ("DenseAttention", {"logits_input": "int32:1"}, [(2, 4, 8), (2, 6, 8), (1, 6, 8), (1, 1, 4, 6)],
     "must match the query 2x4x8 in batch"),
    ("DenseAttention", {"logits_input": "int32:1"}, [(1, 4, 8), (1, 6, 8), (1, 6, 8), (1, 1, 1, 6)],
     "must be [1 or 1, 1 or 1, 4, 6] (the logits)"),
    ("DenseAttention", {}, [(2, 4, 8), (2, 6, 8), (2, 6, 8), (2, 1, 3, 6)], "must be [1 or 2, 1 or 1, 1 or 4, 6]"),
    ("BlockSparseAttention", {"block_size": "int32:8"},
     [(2, 16, 8), (2, 16, 8), (2, 16, 8), (1, 2, 1), (1, 16)], "input 'key_bias'"),
    ("DisentangledAttention", {"span": "int32:4"},
     [(2, 6, 8), (2, 6, 8), (2, 6, 8), (8, 8), (8, 8), (2, 1, 6, 5)], "must be [1 or 2, 1 or 1, 1 or 6, 6]"),
    ("DisentangledAttention", {"span": "int32:4"},
     [(2, 6, 8), (2, 6, 8), (2, 6, 8), (8, 8), (8, 8), (2, 2, 6, 6)], "input 'bias'"),
])
def test_bad_shapes_are_refused(harness, op, fields, shapes, message):
    result = harness(op, fields, shapes)
    assert message in result.get("error", ""), result


def test_bad_shapes_match_what_the_reference_refuses():
    """Shapes the harness refuses for BlockSparseAttention are shapes the torch reference cannot run either."""
    contract = OPS["BlockSparseAttention"]
    q = torch.randn(1, 30, 8)
    with pytest.raises((ValueError, RuntimeError)):
        contract.reference(q, q, q, torch.zeros(1, 3, 2, dtype=torch.int32), block_size=8)


def test_dense_logits_input_reads_only_the_value_and_the_logits(harness):
    """logits_input=1: the keys are the value's rows, the query gives batch and rows only (its width and the key
    are not read, as in the reference), and the output shape is what the reference gives."""
    shapes = [(2, 5, 3), (1, 1, 1), (2, 7, 12), (2, 3, 5, 7)]
    result = harness("DenseAttention", {"num_heads": "int32:3", "logits_input": "int32:1"}, shapes)
    assert "error" not in result, result.get("error")
    params = result["params"]
    assert (params["batch"], params["q_len"], params["kv_len"], params["v_head_dim"]) == (2, 5, 7, 4)
    assert params["head_dim"] == 0 and params["logits_input"] == 1
    assert (params["bias_batch"], params["bias_heads"]) == (2, 3)
    attrs = dict(num_heads=3, logits_input=1)
    assert tuple(int(d) for d in result["output"].split("x")) == _reference_output_shape("DenseAttention", attrs,
                                                                                         shapes) == (2, 5, 12)


@pytest.mark.parametrize("bias_shape", [(3, 1, 1, 7), (1, 1, 1, 7), (3, 2, 1, 7), (1, 2, 5, 7)])
def test_dense_bias_broadcasts_over_query_rows(harness, bias_shape):
    """Issue 14 item 4: the [B, 1, 1, Nk] padding mask the passes emit is accepted, read in place (bias_rows=1), and
    the output shape is the reference's."""
    shapes = [(3, 5, 16), (3, 7, 16), (3, 7, 12), bias_shape]
    result = harness("DenseAttention", {"num_heads": "int32:2", "masked_rows": "char0:mean"}, shapes)
    assert "error" not in result, result.get("error")
    params = result["params"]
    assert (params["bias_batch"], params["bias_heads"], params["bias_rows"]) == bias_shape[:3]
    assert params["masked_rows"] == 1
    assert tuple(int(d) for d in result["output"].split("x")) == _reference_output_shape(
        "DenseAttention", dict(num_heads=2), shapes) == (3, 5, 12)


def test_new_optional_inputs_and_fields_reach_the_params(harness):
    """key_bias for BlockSparseAttention, bias/c2p/p2c/masked_rows for DisentangledAttention: accepted with the
    contract's shapes, and a table whose term is switched off is not shape-checked (the kernel never reads it)."""
    bsa = harness("BlockSparseAttention", {"block_size": "int32:8", "count_repeats": "int32:1"},
                  [(2, 16, 8), (2, 16, 8), (2, 16, 8), (1, 2, 3), (2, 16)])
    assert "error" not in bsa and bsa["params"]["count_repeats"] == 1 and bsa["output"] == "2x16x8"
    dis = harness("DisentangledAttention", {"span": "int32:4", "p2c": "int32:0", "masked_rows": "char0:mean"},
                  [(2, 6, 8), (2, 6, 8), (2, 6, 8), (8, 8), (1, 1), (2, 1, 6, 6)])
    assert "error" not in dis, dis.get("error")
    params = dis["params"]
    assert (params["c2p"], params["p2c"], params["masked_rows"]) == (1, 0, 1)
    assert (params["bias_batch"], params["bias_heads"], params["bias_rows"]) == (2, 1, 6)
    padding = harness("DisentangledAttention", {"span": "int32:4"},
                      [(2, 6, 8), (2, 6, 8), (2, 6, 8), (8, 8), (8, 8), (2, 1, 1, 6)])
    assert "error" not in padding and padding["params"]["bias_rows"] == 1


def test_dense_shared_keys_reach_the_params(harness):
    """shared_key/shared_value [Bs, R, ..]: accepted after a bias that counts R + Nk keys, the params carry their
    batch and length, the output is the reference's; a lone shared key, a batch that does not divide, a width
    that differs or a bias over the own keys only are refused."""
    shapes = [(6, 5, 16), (6, 7, 16), (6, 7, 12), (1, 1, 1, 10), (2, 3, 16), (2, 3, 12)]
    result = harness("DenseAttention", {"num_heads": "int32:2"}, shapes)
    assert "error" not in result, result.get("error")
    params = result["params"]
    assert (params["shared_batch"], params["shared_len"], params["kv_len"]) == (2, 3, 7)
    assert tuple(int(d) for d in result["output"].split("x")) == _reference_output_shape(
        "DenseAttention", dict(num_heads=2), shapes) == (6, 5, 12)
    for bad, message in ((shapes[:5], "shared_key needs shared_value"),
                         ([*shapes[:4], (4, 3, 16), (4, 3, 12)], "batch that divides"),
                         ([*shapes[:5], (2, 3, 8)], "input 'shared_value'"),
                         ([*shapes[:3], (1, 1, 1, 7), *shapes[4:]], "(the shared keys, then the own)")):
        assert message in harness("DenseAttention", {"num_heads": "int32:2"}, bad).get("error", ""), message


def test_kernelized_stabilizer_reaches_the_params(harness):
    """stabilizer projection (performer-pytorch's shift) arrives as its STABILIZERS code; logits is the default."""
    shapes = [(2, 9, 16), (2, 9, 16), (2, 9, 20), (6, 8)]
    projection = harness("KernelizedAttention", {"num_heads": "int32:2", "stabilizer": "char0:projection"}, shapes)
    assert "error" not in projection, projection.get("error")
    assert projection["params"]["stabilizer"] == STABILIZERS.index("projection")
    assert harness("KernelizedAttention", {"num_heads": "int32:2"}, shapes)["params"]["stabilizer"] == 0
