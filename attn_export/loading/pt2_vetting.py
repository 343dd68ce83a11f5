"""Security vetting of torch.export archives (.pt2): torch.export.load is not safe on its own.

torch.export.load (torch 2.13) can run code from the file in all of these ways, so we check first:
 1. weights or constants whose config says use_pickle go through torch.load(weights_only=False);
 2. constants named custom_obj_* (torchbind) and opaque_obj_* go through pickle.loads;
 3. the sample inputs (and legacy data/weights/<model>.pt blobs) go through deserialize_torch_artifact, which
    retries with torch.load(weights_only=False) when the safe load fails;
 4. data/aotinductor/ entries make it load a compiled shared library;
 5. every SymExpr string is parsed with sympy.sympify, which evals it;
 6. treespecs may name an enum's module ("__enum__") or a defaultdict factory, which it imports;
 7. node targets resolve to any callable reachable from `torch`, `operator` or `math` (torch.os.system...);
 8. names are pasted into Python source that FX compiles: graph input names (and the attribute names of
    subgraphs) while loading, parameter paths, forward() argument names and kwarg keys in .module(); and
    .module() execs the program's guards_code strings.
So, before loading, we accept only archives made of JSON and raw tensor bytes (1, 2, 4), sample inputs that
load with weights_only (3), sympy expressions built from numbers, shape symbols and known functions (5),
plain treespecs (6), node targets that name torch ops (7) and names that are dotted identifiers (8). After
loading, we check the graph's targets and attribute names again (7, 8) and build the module without the
guards (8). Checked against torch 2.13's sources.
"""
from __future__ import annotations

import ast
import io
import json
import math
import operator
import re
import zipfile
from dataclasses import dataclass

import torch

from .common import LoadError

_PT2_ENTRIES = re.compile(
    r"archive_format|archive_version|byteorder|\.data/[^/]+|models/model\.json|extra/[^/]+"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
    r"|data/sample_inputs/model\.pt"
)
# JSON keys whose values are names (of graph inputs and nodes, parameters, buffers, constants, submodules)
_NAME_KEYS = frozenset({"name", "as_name", "parameter_name", "buffer_name", "tensor_constant_name",
                        "custom_obj_name", "user_input_name", "input_name", "fqn"})
_SAFE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")  # a parameter path such as layers.0.weight
_SYMBOL_NAME = re.compile(r"[a-z]+\d+")  # the shape symbols torch creates: s0, u1, ...
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# sympy classes and torch.utils._sympy functions that torch's serializer writes (srepr form)
_SYMPY_CALLS = frozenset({
    "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "Integer", "Rational", "Float", "Symbol",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan", "StrictGreaterThan",
    "LessThan", "GreaterThan", "And", "Or", "Not", "Piecewise", "ExprCondPair", "floor", "ceiling", "sqrt",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
    "Identity",
})
_SYMPY_NAMES = frozenset({"true", "false", "oo", "zoo", "nan", "int_oo"})
_SYMPY_STRING_ARG = {"Symbol": _SYMBOL_NAME, "Float": _NUMBER}  # the only calls that may take a string
_EXPR_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Load, ast.operator,
               ast.unaryop, ast.boolop, ast.cmpop, ast.keyword)
_TYPE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")  # a dotted class name
_TREESPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"})
# builtins an exported graph may call besides registered torch ops (symbolic-shape arithmetic, tuple indexing)
_ALLOWED_FUNCTIONS = frozenset(f for f in (
    operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
    operator.pow, operator.neg, operator.pos, operator.abs, operator.eq, operator.ne, operator.lt, operator.le,
    operator.gt, operator.ge, operator.and_, operator.or_, operator.not_, math.ceil, math.floor, math.sqrt,
    math.trunc, *(getattr(torch, n, None) for n in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not",
                                                     "sym_ite", "sym_sqrt", "sym_sum")),
) if f is not None)

_ALLOWED_FUNCTION_NAMES = frozenset(f"{f.__module__}.{f.__name__}" for f in _ALLOWED_FUNCTIONS)
_OP_NAME = re.compile(r"torch\.ops\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")


def _refuse(what: str) -> LoadError:
    return LoadError(f"refusing to load: {what}; attn-export reads only plain torch.export programs "
                      "(no pickled objects, no compiled code)")


@dataclass
class VettedArchive:
    """What vetting found: the program's output names when its outputs were a library's container, flattened
    to a tuple in `program_json` (the models/model.json to load instead of the archive's own)."""
    root: str
    output_names: list[str] | None = None
    program_json: bytes | None = None


def vet_archive(archive: zipfile.ZipFile) -> VettedArchive:
    """The checks made before torch.export.load sees the archive (1-8 above)."""
    names = [n for n in archive.namelist() if not n.endswith("/")]
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise LoadError("not a torch.export archive (its entries must sit under one folder)")
    root = roots.pop()
    for name in names:
        if not _PT2_ENTRIES.fullmatch(name[len(root) + 1:]):
            raise _refuse(f"unexpected entry '{name[len(root) + 1:]}' in the archive")

    def read(relative: str) -> bytes:
        try:
            return archive.read(f"{root}/{relative}")
        except KeyError:
            raise LoadError(f"not a complete torch.export archive (no {relative})") from None

    if read("archive_format").strip() != b"pt2" or read("archive_version").strip() != b"0":
        raise LoadError("unsupported torch.export archive format or version (this torch reads pt2 version 0)")
    for relative, prefix in (("data/weights/model_weights_config.json", "weight_"),
                             ("data/constants/model_constants_config.json", "tensor_")):
        for fqn, payload in json.loads(read(relative)).get("config", {}).items():
            if payload.get("use_pickle") or not str(payload.get("path_name", "")).startswith(prefix):
                raise _refuse(f"'{fqn}' is stored as a pickled object")
    try:
        torch.load(io.BytesIO(read("data/sample_inputs/model.pt")), map_location="cpu", weights_only=True)
    except Exception:
        raise _refuse("its sample inputs hold Python objects other than tensors") from None
    program = json.loads(read("models/model.json"))
    output_names = _flatten_library_outputs(program)
    _vet_program_json(program)
    return VettedArchive(root, output_names, json.dumps(program).encode() if output_names else None)


def _flatten_library_outputs(program) -> list[str] | None:
    """A program whose forward returns a library's key-value container (a transformers ModelOutput: a type name,
    its keys as context, one tensor per key) gets a plain tuple out_spec instead, in place, and the keys become the
    output names. The type is only a name in the JSON here: it is never imported. None when there is nothing to
    flatten (or it is not that simple shape, which _vet_treespec then judges)."""
    try:
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        protocol, spec = json.loads(signature["out_spec"])
        kind, children = spec["type"], spec["children_spec"]
        keys = json.loads(spec["context"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    leaf = {"type": None, "context": None, "children_spec": []}
    if (kind in _TREESPEC_TYPES or not isinstance(kind, str) or not _TYPE_NAME.fullmatch(kind)
            or not isinstance(keys, list) or not all(isinstance(k, str) and k.isidentifier() for k in keys)
            or not isinstance(children, list) or len(children) != len(keys) or any(c != leaf for c in children)):
        return None
    signature["out_spec"] = json.dumps([protocol, {"type": "builtins.tuple", "context": "null",
                                                   "children_spec": children}])
    return list(keys)


def _vet_program_json(node) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr_str":
                _vet_sym_expr(value)
            elif key == "as_operator" or (key == "target" and "inputs" in node and "outputs" in node):
                _vet_target_name(value)
            elif key in _NAME_KEYS and isinstance(value, str):
                _vet_name(value)
            elif key == "forward_arg_names" and isinstance(value, list):
                for name in value:
                    _vet_name(name)
            elif key in ("in_spec", "out_spec") and isinstance(value, str):
                _vet_treespec(value, "inputs" if key == "in_spec" else "outputs")
            _vet_program_json(value)
    elif isinstance(node, list):
        for value in node:
            _vet_program_json(value)


def _vet_name(name) -> None:
    """Graph input, node, attribute and argument names end up in Python source that FX compiles."""
    if not (isinstance(name, str) and (name == "" or _SAFE_NAME.fullmatch(name))):
        raise _refuse(f"the program holds the name {name!r}, which is not a plain identifier")


def _vet_target_name(name) -> None:
    """A graph node may call a registered torch op (torch.ops.<namespace>.<op>.<overload>) or a shape builtin."""
    if not (isinstance(name, str) and (_OP_NAME.fullmatch(name) or name in _ALLOWED_FUNCTION_NAMES)):
        raise _refuse(f"graph node calls {name!r}, which is not a torch op")


def _vet_sym_expr(text) -> None:
    """A shape expression must be numbers, shape symbols and known sympy/torch functions: nothing to eval."""
    try:
        tree = ast.parse(str(text), mode="eval")
    except SyntaxError:
        raise _refuse(f"shape expression '{text}' is not an expression") from None
    vetted_strings = set()  # ids of string constants already checked as Symbol('s0') / Float('1.5') arguments
    for node in ast.walk(tree):  # breadth first: a call is seen before its arguments
        if isinstance(node, ast.Call):
            func = node.func.id if isinstance(node.func, ast.Name) else None
            if func not in _SYMPY_CALLS:
                raise _refuse(f"shape expression '{text}' calls something other than a sympy function")
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    pattern = _SYMPY_STRING_ARG.get(func)
                    if pattern is None or not pattern.fullmatch(arg.value):
                        raise _refuse(f"shape expression '{text}' holds an unexpected string")
                    vetted_strings.add(id(arg))
            if any(not isinstance(k.value, ast.Constant) or isinstance(k.value.value, str) for k in node.keywords):
                raise _refuse(f"shape expression '{text}' holds an unexpected keyword argument")
        elif isinstance(node, ast.Name):
            if not (_SYMBOL_NAME.fullmatch(node.id) or node.id in _SYMPY_NAMES or node.id in _SYMPY_CALLS):
                raise _refuse(f"shape expression '{text}' names '{node.id}'")
        elif isinstance(node, ast.Constant):
            if not (isinstance(node.value, (bool, int, float)) or id(node) in vetted_strings):
                raise _refuse(f"shape expression '{text}' holds an unexpected constant")
        elif not isinstance(node, _EXPR_NODES):
            raise _refuse(f"shape expression '{text}' holds Python syntax ({type(node).__name__})")


def _vet_treespec(text: str, which: str) -> None:
    """Input/output structure: tuples, lists and dicts keyed by identifiers only (no imports, no enums). A
    library's own container (a transformers ModelOutput) is refused with what to do instead: rebuilding it would
    import that library's class by the name the file gives."""
    try:
        _protocol, spec = json.loads(text)
    except (ValueError, TypeError):
        raise _refuse("an input/output structure is not a plain treespec") from None

    def walk(spec) -> None:
        if not isinstance(spec, dict) or spec.get("type") not in _TREESPEC_TYPES:
            kind = spec.get("type") if isinstance(spec, dict) else type(spec).__name__
            if isinstance(kind, str) and _TYPE_NAME.fullmatch(kind):
                raise LoadError(f"the program's {which} use the Python type {kind}; export the model so that it "
                                "takes and returns plain tensors (transformers: pass return_dict=False, or wrap "
                                "the model in a module that returns a tuple) and save it again")
            raise _refuse(f"{which} use an unnamed Python type")
        context = spec.get("context")
        if spec["type"] in ("builtins.dict", "collections.OrderedDict"):
            keys = json.loads(context) if isinstance(context, str) else None
            if not (isinstance(keys, list) and all(isinstance(k, str) and k.isidentifier() for k in keys)):
                raise _refuse("an input/output dict has keys that are not identifiers")
        elif context not in (None, "null"):
            raise _refuse("an input/output structure carries unexpected context")
        for child in spec.get("children_spec", []):
            walk(child)

    walk(spec)


def vet_program(ep: torch.export.ExportedProgram) -> None:
    """The checks made on the loaded program, before its module is built (7, 8 above)."""
    for gm in ep.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output"):  # their names were checked in the JSON
                continue
            if node.op == "get_attr":
                if not _SAFE_NAME.fullmatch(str(node.target)):
                    raise _refuse(f"graph attribute name '{node.target}'")
                continue
            if node.op != "call_function":
                raise _refuse(f"graph node '{node.name}' is a {node.op}")
            if not _is_op(node.target) and node.target not in _ALLOWED_FUNCTIONS:
                raise _refuse(f"graph node '{node.name}' calls {node.target!r}, which is not a torch op")
            for value in torch.utils._pytree.tree_leaves((node.args, node.kwargs)):
                if callable(value) and not _is_op(value) and not isinstance(value, torch.fx.Node):
                    raise _refuse(f"graph node '{node.name}' passes the callable {value!r}")
            if _in_training_mode(node):
                raise LoadError(f"the program was exported in training mode (node '{node.name}' has train=True); "
                                 "export it again after model.eval()")
    names = [*ep.state_dict, *ep.constants]
    names += [spec.target for spec in ep.graph_signature.input_specs if spec.target is not None]
    for name in names:
        if not _SAFE_NAME.fullmatch(str(name)):
            raise _refuse(f"parameter or constant name '{name}'")
    for name, value in ep.constants.items():
        if not isinstance(value, torch.Tensor):
            raise _refuse(f"constant '{name}' is a {type(value).__name__}, not a tensor")


def _is_op(target) -> bool:
    return isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator))


def _in_training_mode(node: torch.fx.Node) -> bool:
    """Dropout and batch norm say in their schema whether they train; a trained graph is not deterministic."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return False
    for index, argument in enumerate(schema.arguments):
        if argument.name in ("train", "training"):
            value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
            return value is True
    return False
