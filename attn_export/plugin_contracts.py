"""The op contracts as a C++ table: plugins_trt/trt/op_contracts.h is generated from attn_export/ops by this module.

The TensorRT plugins read every name, version, field (kind, default, string options), input (rank, element kind,
optional) and output-shape rule from that header, so the C++ side cannot drift from the contracts:
tests/test_plugin_contract.py regenerates it and fails on any difference. Rewrite it with

    python -m attn_export.plugin_contracts

The output-shape rule is read off each contract's `output_shapes` by calling it with symbolic input shapes
("in0.d1", ...): every output dimension must be one input dimension or an integer, which is what the plugins
can express without arithmetic. `contracts_digest()` fingerprints the table; the plugin library embeds it and engine
manifests record it, so an engine built against other contracts is refused before TensorRT reads its fields.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

from .ops import OPS, PLUGIN_NAMESPACE, OpContract

HEADER = Path(__file__).resolve().parents[1] / "plugins_trt" / "trt" / "op_contracts.h"

# The options of every string attribute, in the order the kernels' enums follow (attn_export_kernels.h), as the
# contracts define them.
STRING_OPTIONS: dict[tuple[str, str], tuple[str, ...]] = {
    (op.op_type, a.name): a.options for op in OPS.values() for a in op.attributes if a.kind == "string"}

_FIELD_KINDS = {"int": "kInt", "ints": "kInts", "float": "kFloat", "string": "kString"}
_SYMBOL = re.compile(r"in(\d+)\.d(\d+)$")


class ContractTableError(ValueError):
    """A contract the C++ table cannot express (a bug in the contract or in this generator)."""


def module_name(contract: OpContract) -> str:
    """attn_export/ops/<module>.py defines the op; plugins_trt/trt/<module>.cpp implements its plugin."""
    return contract.reference.__module__.rsplit(".", 1)[-1]


def options_for(contract: OpContract, attribute) -> tuple[str, ...]:
    try:
        options = STRING_OPTIONS[(contract.op_type, attribute.name)]
    except KeyError:
        raise ContractTableError(f"{contract.op_type}.{attribute.name}: a string attribute needs its options in "
                                 "its contract Attribute (options=...)") from None
    if attribute.default not in options:
        raise ContractTableError(f"{contract.op_type}.{attribute.name}: default {attribute.default!r} is not one of "
                                 f"{options}")
    return tuple(options)


def output_rule(contract: OpContract) -> list[tuple[int, int] | int]:
    """Each output dimension as (input index, input dimension), or an int for a constant dimension."""
    symbols = [tuple(f"in{i}.d{d}" for d in range(spec.rank)) for i, spec in enumerate(contract.inputs)]
    defaults = contract.resolve_attrs()
    shapes = contract.output_shapes(symbols, defaults)
    if len(shapes) != len(contract.outputs) or len(contract.outputs) != 1:
        raise ContractTableError(f"{contract.op_type}: the plugins support exactly one output")
    rule: list[tuple[int, int] | int] = []
    for dim in shapes[0]:
        if isinstance(dim, int):
            rule.append(dim)
            continue
        match = _SYMBOL.match(str(dim))
        if not match:
            raise ContractTableError(f"{contract.op_type}: output dimension {dim!r} is neither an input dimension "
                                     "nor an integer")
        rule.append((int(match.group(1)), int(match.group(2))))
    if len(rule) != contract.outputs[0].rank:
        raise ContractTableError(f"{contract.op_type}: output rule has rank {len(rule)}, the contract says "
                                 f"{contract.outputs[0].rank}")
    return rule


def _tensor_kind(contract: OpContract, spec) -> str:
    if set(spec.dtypes) <= {"float32", "float16", "bfloat16"}:
        return "kFloating"
    if tuple(spec.dtypes) == ("int32",):
        return "kInt32"
    raise ContractTableError(f"{contract.op_type}.{spec.name}: dtypes {spec.dtypes} are neither floating nor int32")


def table(contract: OpContract) -> dict:
    """The facts the C++ side needs about one op, as plain data (the digest is taken over this)."""
    optional = [spec.optional for spec in contract.inputs]
    if any(a and not b for a, b in zip(optional, optional[1:])):
        raise ContractTableError(f"{contract.op_type}: optional inputs must come last")
    fields = []
    for a in contract.attributes:
        entry = {"name": a.name, "kind": a.kind, "default": a.default}
        if a.kind == "string":
            entry["options"] = list(options_for(contract, a))
        fields.append(entry)
    return {
        "name": contract.op_type,
        "version": str(contract.version),
        "namespace": PLUGIN_NAMESPACE,
        "module": module_name(contract),
        "fields": fields,
        "inputs": [{"name": s.name, "rank": s.rank, "kind": _tensor_kind(contract, s), "optional": s.optional}
                   for s in contract.inputs],
        "output": {"name": contract.outputs[0].name, "rule": [list(r) if isinstance(r, tuple) else r
                                                              for r in output_rule(contract)]},
    }


def tables() -> list[dict]:
    return [table(OPS[name]) for name in sorted(OPS)]


def contracts_digest() -> str:
    """16 hex digits over every op's table: equal digests mean the plugins read and write the same fields."""
    text = json.dumps(tables(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ C++ rendering
def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _cpp_string(text: str) -> str:
    return json.dumps(text)  # a JSON string of ASCII text is a valid C++ string literal


def _cpp_float(value: float) -> str:
    text = repr(float(value))
    if "e" not in text and "." not in text and "inf" not in text:
        text += ".0"
    return text + "f"


def _render_op(t: dict) -> list[str]:
    ns = t["module"]
    lines = [f"// {t['name']} v{t['version']}: attn_export/ops/{ns}.py", f"namespace {ns} {{",
             f"inline constexpr char kName[] = {_cpp_string(t['name'])};",
             f"inline constexpr char kVersion[] = {_cpp_string(t['version'])};"]
    enumerators = ", ".join(f"k{_camel(f['name'])} = {i}" for i, f in enumerate(t["fields"]))
    lines.append(f"enum Field : int32_t {{ {enumerators} }};")
    for f in t["fields"]:
        if f["kind"] == "string":
            options = ", ".join(_cpp_string(o) for o in f["options"])
            lines.append(f"inline constexpr char const* k{_camel(f['name'])}Options[] = {{{options}}};")
        if f["kind"] == "ints":
            values = ", ".join(str(int(v)) for v in f["default"]) or "0"
            lines.append(f"inline constexpr int32_t k{_camel(f['name'])}Default[] = {{{values}}};")
    lines.append("inline constexpr FieldSpec kFields[] = {")
    for f in t["fields"]:
        kind = _FIELD_KINDS[f["kind"]]
        int_default = int(f["default"]) if f["kind"] == "int" else 0
        float_default = _cpp_float(f["default"]) if f["kind"] == "float" else "0.0f"
        string_default = _cpp_string(f["default"]) if f["kind"] == "string" else '""'
        options, nb_options = (f"k{_camel(f['name'])}Options", len(f["options"])) if f["kind"] == "string" \
            else ("nullptr", 0)
        ints, nb_ints = (f"k{_camel(f['name'])}Default", len(f["default"])) if f["kind"] == "ints" else ("nullptr", 0)
        lines.append(f"    {{{_cpp_string(f['name'])}, FieldKind::{kind}, {int_default}, {float_default}, "
                     f"{string_default}, {options}, {nb_options}, {ints}, {nb_ints}}},")
    lines.append("};")
    lines.append("inline constexpr InputSpec kInputs[] = {")
    for i in t["inputs"]:
        lines.append(f"    {{{_cpp_string(i['name'])}, {i['rank']}, TensorKind::{i['kind']}, "
                     f"{'true' if i['optional'] else 'false'}}},")
    lines.append("};")
    rule = ", ".join(f"{{{r[0]}, {r[1]}, 0}}" if isinstance(r, list) else f"{{-1, 0, {r}}}"
                     for r in t["output"]["rule"])
    lines.append(f"inline constexpr DimSource kOutputDims[] = {{{rule}}};")
    required = sum(not i["optional"] for i in t["inputs"])
    lines.append(f"inline constexpr OpSpec kSpec{{kName, kVersion, kPluginNamespace, kFields, {len(t['fields'])}, "
                 f"kInputs, {len(t['inputs'])}, {required}, kOutputDims, {len(t['output']['rule'])}}};")
    lines.append(f"}}  // namespace {ns}")
    return lines


def render() -> str:
    lines = [
        "// Generated from attn_export/ops by `python -m attn_export.plugin_contracts`. Do not edit:",
        "// tests/test_plugin_contract.py fails when this file and the op contracts disagree.",
        "#pragma once",
        "",
        "#include <cstdint>",
        "",
        '#include "fields.h"',
        "",
        "namespace attn_export {",
        "namespace trt_plugins {",
        "namespace contracts {",
        "",
        f"inline constexpr char kPluginNamespace[] = {_cpp_string(PLUGIN_NAMESPACE)};",
        "// Fingerprint of the tables below (attn_export.plugin_contracts.contracts_digest()), recorded by engine",
        "// manifests.",
        f"#define ATTN_EXPORT_CONTRACTS_DIGEST {_cpp_string(contracts_digest())}",
        "inline constexpr char kContractsDigest[] = ATTN_EXPORT_CONTRACTS_DIGEST;",
        "",
    ]
    for t in tables():
        lines += _render_op(t) + [""]
    lines += ["}  // namespace contracts", "}  // namespace trt_plugins", "}  // namespace attn_export", ""]
    return "\n".join(lines)


def write(path: Path = HEADER) -> Path:
    from .atomic import write_bytes

    write_bytes(path, render().encode())
    return path


if __name__ == "__main__":
    out = write(Path(sys.argv[1]) if len(sys.argv) > 1 else HEADER)
    print(f"wrote {out}")
