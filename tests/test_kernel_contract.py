"""The CUDA side cannot drift from the op contracts: the kernel header, the torch extension and cuda_ops are
parsed and checked against attn_export/ops (no GPU or compiler needed)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from attn_export.backends import cuda_ops
from attn_export.ops import OPS

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "plugins_trt" / "kernels" / "attn_export_kernels.h"
EXTENSION = ROOT / "plugins_trt" / "torch_ext" / "attn_export_ext.cpp"

FIELD = re.compile(r"^\s*(const\s+)?([\w:]+)\s*(\*)?\s*(\w+);\s*(?://\s*(.*))?$")


def snake(op_type: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", op_type).lower()


def enum_member(option: str) -> str:
    return "k" + "".join(part.capitalize() for part in option.split("_"))


def parse_header(text: str):
    structs = {}
    for name, body in re.findall(r"struct (\w+) \{(.*?)\};", text, re.S):
        fields = {}
        for line in body.splitlines():
            m = FIELD.match(line)
            if m:
                const, ctype, pointer, field, comment = m.groups()
                fields[field] = {"type": ctype, "pointer": bool(pointer), "const": bool(const),
                                 "comment": comment or ""}
        structs[name] = fields
    enums = {}
    for name, body in re.findall(r"enum class (\w+) : int32_t \{([^}]*)\};", text):
        enums[name] = {member: int(value) for member, value in re.findall(r"(k\w+) = (\d+)", body)}
    launchers = dict(re.findall(
        r"cudaError_t launch_(\w+)\(const (\w+)& params, DataType dtype, void\* workspace,\s*cudaStream_t stream\);",
        text))
    workspaces = dict(re.findall(r"size_t (\w+)_workspace_size\(const (\w+)& params\);", text))
    return structs, enums, launchers, workspaces


HEADER_INFO = parse_header(HEADER.read_text())
CONTRACTS = sorted(OPS.values(), key=lambda c: c.op_type)


def options_of(contract, attribute) -> tuple[str, ...]:
    """The option list of a string attribute, as its contract defines it."""
    assert attribute.options and attribute.default in attribute.options, f"{contract.op_type}.{attribute.name}"
    return attribute.options


def test_header_parses():
    structs, enums, launchers, workspaces = HEADER_INFO
    assert len(structs) >= len(OPS) and enums and launchers and workspaces


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.op_type)
def test_each_op_has_params_launcher_and_workspace_size(contract):
    structs, _, launchers, workspaces = HEADER_INFO
    params = f"{contract.op_type}Params"
    assert params in structs, f"no struct {params} in {HEADER.name}"
    assert launchers.get(snake(contract.op_type)) == params, f"no launch_{snake(contract.op_type)}({params}&, ...)"
    assert workspaces.get(snake(contract.op_type)) == params, f"no {snake(contract.op_type)}_workspace_size"


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.op_type)
def test_params_hold_every_input_and_the_output(contract):
    fields = HEADER_INFO[0][f"{contract.op_type}Params"]
    for spec in contract.inputs:
        field = fields.get(spec.name)
        assert field is not None, f"{contract.op_type}Params has no field for input {spec.name!r}"
        assert field["pointer"] and field["const"], f"input {spec.name!r} must be a const pointer"
        expected = "int32_t" if spec.dtypes == ("int32",) else "void"
        assert field["type"] == expected, f"input {spec.name!r} ({spec.dtypes}) must point to {expected}"
    assert len(contract.outputs) == 1
    out = fields.get("output")
    assert out and out["pointer"] and not out["const"] and out["type"] == "void"


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.op_type)
def test_params_hold_every_attribute_with_its_type(contract):
    _, enums, _, _ = HEADER_INFO
    fields = HEADER_INFO[0][f"{contract.op_type}Params"]
    for attribute in contract.attributes:
        field = fields.get(attribute.name)
        assert field is not None, f"{contract.op_type}Params has no field for attribute {attribute.name!r}"
        assert not field["pointer"]
        if attribute.kind == "int":
            assert field["type"] == "int32_t", f"{attribute.name}: int attributes arrive as int32"
        elif attribute.kind == "float":
            assert field["type"] == "float", f"{attribute.name}: float attributes arrive as float32"
        elif attribute.kind == "string":
            assert field["type"] == "int32_t", f"{attribute.name}: string attributes are int32 enum codes"
            m = re.search(r"enum (\w+)", field["comment"])
            assert m, f"{attribute.name}: the field's comment must name its enum ('// enum Name')"
            assert m.group(1) in enums, f"enum {m.group(1)} is not declared"
            expected = {enum_member(option): code for code, option in enumerate(options_of(contract, attribute))}
            listed = dict(list(enums[m.group(1)].items())[:len(expected)])  # an op may offer an enum's first codes
            assert listed == expected, f"enum {m.group(1)} must list {expected} first (contract order)"
        else:
            pytest.fail(f"{attribute.name}: no header convention for attribute kind {attribute.kind!r} yet")


def test_torch_extension_runs_every_op_through_the_plugins_rules():
    """One generic entry point: attributes by name into the plugins' FieldValues, shapes and params from each op's
    makeParams (the plugins' own code), so the extension cannot re-derive them differently."""
    text = EXTENSION.read_text()
    assert re.findall(r'm\.def\("(\w+)"', text) == ["run_op"]
    for op in ("BlockSparseAttention", "DenseAttention", "KernelizedAttention", "DisentangledAttention",
               "MixtureOfExperts", "LongConvolution"):
        assert f"run<{op}Op>(inputs, attrs)" in text, op
    assert "Op::makeParams(fields, shapes, nb, params)" in text and "Op::checkFields(fields)" in text
    assert set(cuda_ops.PLUGIN_RULES) >= {p.name for p in (ROOT / "plugins_trt" / "trt").glob("*.cpp")} - {
        "creators.cpp", "plugin_base.cpp"}


def test_cuda_ops_passes_attributes_by_contract_name(monkeypatch):
    """Every contract attribute (defaults filled in, strings as the contract spells them) reaches the extension
    by name; the tensors go in contract order with trailing omitted inputs dropped."""
    calls = []

    class FakeExtension:
        def run_op(self, op_type, tensors, attrs):
            calls.append((op_type, tensors, attrs))
            return "out"

    monkeypatch.setattr(cuda_ops, "load_extension", lambda: FakeExtension())
    monkeypatch.setattr(cuda_ops, "on_cuda", lambda tensors: True)
    q = torch.zeros(1, 4, 8)
    assert cuda_ops.run_op("KernelizedAttention", q, q, q, None, num_heads=2, feature_map="elu_plus_one") == "out"
    op_type, tensors, attrs = calls[-1]
    assert op_type == "KernelizedAttention" and len(tensors) == 3
    assert attrs == OPS["KernelizedAttention"].resolve_attrs({"num_heads": 2, "feature_map": "elu_plus_one"})
    assert attrs["feature_map"] == "elu_plus_one"  # the string itself: the C++ fields map it to its code
    for contract in OPS.values():
        cuda_ops.run_op(contract.op_type, q, q, q)
        assert set(calls[-1][2]) == {a.name for a in contract.attributes}


def test_string_options_are_defined_once_in_the_contracts():
    from attn_export.plugin_contracts import STRING_OPTIONS

    for contract in OPS.values():
        for a in contract.attributes:
            if a.kind == "string":
                assert STRING_OPTIONS[(contract.op_type, a.name)] is a.options and a.default in a.options
    assert not hasattr(cuda_ops, "_code")


def test_run_op_uses_the_reference_off_cuda():
    q, k, v = (torch.randn(2, 9, 8) for _ in range(3))
    out = cuda_ops.run_op("DenseAttention", q, k, v, None, num_heads=2, causal=1)
    torch.testing.assert_close(out, OPS["DenseAttention"].reference(q, k, v, num_heads=2, causal=1))
    with pytest.raises(KeyError):
        cuda_ops.run_op("DenseAttention", q, k, v, heads=2)


def test_loading_without_cuda_says_why_in_one_line():
    reason = cuda_ops.unavailable_reason()
    if reason is None:
        pytest.skip("CUDA kernels are available here")
    assert "\n" not in reason
    with pytest.raises(cuda_ops.CudaKernelsUnavailable, match="unavailable"):
        cuda_ops.load_extension()
