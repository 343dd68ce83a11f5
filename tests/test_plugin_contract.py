"""The TensorRT plugins' C++ side against the op contracts (attn_export/ops), without compiling anything.

plugins_trt/trt/op_contracts.h is generated from the contracts; these tests fail when it is stale, and also parse
it on their own (not through the generator) so a generator bug cannot hide a drift. They also check that each
op's plugin source reads every field, that creators.cpp registers every op, and that the nodes the passes emit
carry the plugin name, version and namespace the creators answer to.
"""
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from attn_export import plugin_contracts
from attn_export.ops import OPS, PLUGIN_NAMESPACE

TRT_DIR = Path(__file__).resolve().parents[1] / "plugins_trt" / "trt"
HEADER_TEXT = (TRT_DIR / "op_contracts.h").read_text()


def _op_block(module: str) -> str:
    match = re.search(rf"namespace {module} {{\n(.*?)\n}}  // namespace {module}", HEADER_TEXT, re.S)
    assert match, f"op_contracts.h has no namespace {module}"
    return match.group(1)


def _c_string(text: str) -> str:
    return re.fullmatch(r'"(.*)"', text.strip()).group(1)


def parse_header_op(module: str) -> dict:
    """Name, version, fields, inputs and output rule of one op, read from op_contracts.h text."""
    block = _op_block(module)
    name = re.search(r'kName\[\] = "([^"]*)"', block).group(1)
    version = re.search(r'kVersion\[\] = "([^"]*)"', block).group(1)
    options = {m.group(1): re.findall(r'"([^"]*)"', m.group(2))
               for m in re.finditer(r"k(\w+)Options\[\] = \{([^}]*)\}", block)}
    fields = []
    body = re.search(r"kFields\[\] = \{\n(.*?)\n\};", block, re.S).group(1)
    for line in body.splitlines():
        m = re.fullmatch(r'\s*\{"(\w+)", FieldKind::k(\w+), (-?\d+), ([^,]+), ("[^"]*"), (\w+), (\d+), (\w+), (\d+)\},',
                         line)
        assert m, line
        fname, kind, int_default, float_default, string_default, opts, nb_opts = m.groups()[:7]
        kind = kind.lower()
        default = {"int": int(int_default), "float": float(float_default.rstrip("f")),
                   "string": _c_string(string_default)}.get(kind)
        field = {"name": fname, "kind": kind, "default": default}
        if kind == "string":
            field["options"] = options[opts[1:-len("Options")]]
            assert len(field["options"]) == int(nb_opts)
        fields.append(field)
    enum = re.search(r"enum Field : int32_t \{ (.*) \};", block).group(1)
    enumerators = [e.split(" = ") for e in enum.split(", ")]
    inputs = []
    body = re.search(r"kInputs\[\] = \{\n(.*?)\n\};", block, re.S).group(1)
    for line in body.splitlines():
        m = re.fullmatch(r'\s*\{"(\w+)", (\d+), TensorKind::k(\w+), (true|false)\},', line)
        assert m, line
        inputs.append({"name": m.group(1), "rank": int(m.group(2)), "kind": m.group(3),
                       "optional": m.group(4) == "true"})
    dims = re.search(r"kOutputDims\[\] = \{(.*)\};", block).group(1)
    rule = [tuple(int(x) for x in d.split(", ")) for d in re.findall(r"\{(-?\d+, -?\d+, -?\d+)\}", dims)]
    spec = re.search(r"kSpec\{kName, kVersion, kPluginNamespace, kFields, (\d+), kInputs, (\d+), (\d+), kOutputDims, "
                     r"(\d+)\};", block)
    return {"name": name, "version": version, "fields": fields, "enumerators": enumerators, "inputs": inputs,
            "rule": rule, "counts": tuple(int(g) for g in spec.groups())}


CONTRACTS = sorted(OPS.values(), key=lambda c: c.op_type)


def test_header_is_generated_from_the_contracts():
    assert plugin_contracts.render() == HEADER_TEXT, \
        "plugins_trt/trt/op_contracts.h is stale: run `python -m attn_export.plugin_contracts`"


def test_header_namespace_and_digest():
    assert re.search(r'kPluginNamespace\[\] = "([^"]*)"', HEADER_TEXT).group(1) == PLUGIN_NAMESPACE == "attn_export"
    digest = re.search(r'#define ATTN_EXPORT_CONTRACTS_DIGEST "([0-9a-f]{16})"', HEADER_TEXT).group(1)
    assert digest == plugin_contracts.contracts_digest()


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.op_type)
def test_header_fields_match_contract(contract):
    parsed = parse_header_op(plugin_contracts.module_name(contract))
    assert parsed["name"] == contract.op_type
    assert parsed["version"] == str(contract.version) == "1"
    assert [f["name"] for f in parsed["fields"]] == [a.name for a in contract.attributes]
    for field, attribute in zip(parsed["fields"], contract.attributes):
        assert field["kind"] == attribute.kind, attribute.name
        if attribute.kind == "float":
            assert math.isclose(field["default"], attribute.default, rel_tol=1e-6), attribute.name
        else:
            assert field["default"] == attribute.default, attribute.name
        if attribute.kind == "string":
            assert attribute.default in field["options"]
            assert tuple(field["options"]) == plugin_contracts.STRING_OPTIONS[(contract.op_type, attribute.name)]
    # the Field enumerators index kFields in order, named after the attributes
    assert [name for name, _ in parsed["enumerators"]] == \
        ["k" + "".join(p.capitalize() for p in a.name.split("_")) for a in contract.attributes]
    assert [int(value) for _, value in parsed["enumerators"]] == list(range(len(contract.attributes)))
    assert parsed["counts"][0] == len(contract.attributes)


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.op_type)
def test_header_inputs_and_output_rule_match_contract(contract):
    parsed = parse_header_op(plugin_contracts.module_name(contract))
    assert [i["name"] for i in parsed["inputs"]] == [s.name for s in contract.inputs]
    assert [i["rank"] for i in parsed["inputs"]] == [s.rank for s in contract.inputs]
    assert [i["optional"] for i in parsed["inputs"]] == [s.optional for s in contract.inputs]
    assert [i["kind"] == "Int32" for i in parsed["inputs"]] == [s.dtypes == ("int32",) for s in contract.inputs]
    nb_fields, nb_inputs, nb_required, rank = parsed["counts"]
    assert nb_inputs == len(contract.inputs) and nb_required == sum(not s.optional for s in contract.inputs)
    assert rank == contract.outputs[0].rank == len(parsed["rule"])
    # the rule, applied to random concrete shapes, gives what the contract's output_shapes gives
    rng = np.random.default_rng(0)
    for _ in range(5):
        shapes = [tuple(int(d) for d in rng.integers(1, 50, size=s.rank)) for s in contract.inputs]
        expected = contract.output_shapes(shapes, contract.resolve_attrs())[0]
        got = tuple(c if i < 0 else shapes[i][d] for i, d, c in parsed["rule"])
        assert got == tuple(expected)


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.op_type)
def test_each_op_has_a_plugin_source_reading_every_field(contract):
    module = plugin_contracts.module_name(contract)
    source = (TRT_DIR / f"{module}.cpp").read_text()
    assert f"namespace c = contracts::{module};" in source
    for name, _ in parse_header_op(module)["enumerators"]:
        assert re.search(rf"\bc::{name}\b", source), f"{module}.cpp never reads field {name}"
    ops_h = (TRT_DIR / "ops.h").read_text()
    assert f"return contracts::{module}::kSpec;" in ops_h


def test_creators_register_every_op():
    ops_h = (TRT_DIR / "ops.h").read_text()
    creators = (TRT_DIR / "creators.cpp").read_text()
    op_types = re.findall(r"struct (\w+)Op \{", ops_h)
    specs = re.findall(r"return contracts::(\w+)::kSpec;", ops_h)
    assert sorted(specs) == sorted(plugin_contracts.module_name(c) for c in CONTRACTS)
    registered = re.findall(r"static AttnPluginCreator<(\w+)Op> (\w+);", creators)
    assert sorted(t for t, _ in registered) == sorted(op_types)
    listed = re.search(r"creators\[\] = \{(.*?)\};", creators, re.S).group(1)
    assert sorted(n.strip("& \n") for n in listed.split(",") if n.strip()) == sorted(n for _, n in registered)
    cmake = (TRT_DIR / "CMakeLists.txt").read_text()
    for contract in CONTRACTS:
        assert f"{plugin_contracts.module_name(contract)}.cpp" in cmake


def test_kernel_enums_follow_the_option_order():
    """The generated option index is the code the kernels' enums give (attn_export_kernels.h); an op may offer the
    first options of an enum another op shares in full (DisentangledAttention's masked_rows, DenseAttention's)."""
    header = (TRT_DIR.parent / "kernels" / "attn_export_kernels.h").read_text()
    for (op_type, attribute), options in plugin_contracts.STRING_OPTIONS.items():
        enum_name = "".join(p.capitalize() for p in attribute.split("_"))
        body = re.search(rf"enum class {enum_name} : int32_t \{{([^}}]*)\}}", header).group(1)
        names = [item.split("=")[0].strip() for item in body.split(",") if item.strip()]
        assert names[:len(options)] == ["k" + "".join(p.capitalize() for p in o.split("_")) for o in options], \
            (op_type, attribute)


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.op_type)
def test_fused_nodes_carry_the_creator_lookup_keys(contract):
    """The parser looks a creator up by (op_type, plugin_version, plugin_namespace) and loads only the
    creator's field names from the node's attributes."""
    node = contract.make_node([s.name for s in contract.inputs if not s.optional], ["y"], "n", {})
    attrs = {a.name: a for a in node.attribute}
    parsed = parse_header_op(plugin_contracts.module_name(contract))
    assert node.op_type == parsed["name"]
    assert attrs["plugin_version"].s.decode() == parsed["version"]
    assert attrs["plugin_namespace"].s.decode() == PLUGIN_NAMESPACE
    for field in parsed["fields"]:
        assert field["name"] in attrs, f"{contract.op_type} nodes must write {field['name']} (TensorRT needs it)"
    kinds = {1: "float", 2: "int", 3: "string", 7: "ints"}  # onnx AttributeProto types
    for field in parsed["fields"]:
        assert kinds[attrs[field["name"]].type] == field["kind"]


def test_string_attributes_all_have_options():
    for contract in CONTRACTS:
        for attribute in contract.attributes:
            if attribute.kind == "string":
                assert (contract.op_type, attribute.name) in plugin_contracts.STRING_OPTIONS


def test_output_rule_follows_value_width_for_kernelized_attention():
    """KernelizedAttention outputs [B, N, H*Dv]: the value's width, which may differ from the query's."""
    contract = OPS["KernelizedAttention"]
    q, k, v = torch.randn(1, 6, 8), torch.randn(1, 6, 8), torch.randn(1, 6, 12)
    out = contract.reference(q, k, v, None, num_heads=2, feature_map="elu_plus_one")
    assert tuple(out.shape) == tuple(contract.output_shapes([q.shape, k.shape, v.shape], {})[0]) == (1, 6, 12)


def test_output_rule_rejects_expressions():
    """A rule the plugins cannot express (arithmetic on dimensions) is refused by the generator."""
    contract = OPS["DenseAttention"]
    broken = type(contract)(**{**contract.__dict__, "output_shapes": lambda shapes, attrs: [(shapes[0][0], "N*2", 3)]})
    with pytest.raises(plugin_contracts.ContractTableError, match="neither an input dimension"):
        plugin_contracts.output_rule(broken)
