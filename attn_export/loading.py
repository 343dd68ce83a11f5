"""Load model.pt safely: attn-export zoo checkpoints and torch.export programs, never arbitrary pickles.

A zoo checkpoint is a plain dict (format tag, architecture name, config values, example sizes, state dict) read
with torch.load(weights_only=True), which refuses any pickled object other than tensors and plain data; the
module is rebuilt from the zoo's own code, first on the meta device under a memory budget so that a config the
weights do not fit (hidden=10**9 in a 1 MB file) is refused before any memory is spent on it. A torch.export
program (.pt2) is checked before and after torch.export.load, because torch.export.load is not safe on its own
(see _vet_pt2_archive).

Every failure is a UserError "<file>: <problem>" on one line.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import io
import json
import math
import operator
import pickle
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sympy
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attn_export.atomic import atomic_path
from attn_export.errors import UserError, one_line
from models import registry

ZOO_FORMAT = "attn-export/zoo-checkpoint"
ZOO_FORMAT_VERSION = 1
EXAMPLE_SEED = 0
MAX_EXAMPLE_BATCH = 1024  # a checkpoint's example batch; larger ones are more likely damage than intent
# a config may ask for at most this much more memory than the checkpoint's own weights (buffers, rounding)
BUILD_SLACK_BYTES = 256 << 20
REFUSED_PICKLE = ("refusing to load: it contains Python objects other than tensors and plain data (pickled code?); "
                  "attn-export reads only zoo checkpoints and torch.export programs")


class _LoadError(Exception):
    """A problem with the file; load_model turns it into UserError("<path>: <problem>")."""


def _user_error(path: Path, problem: Any) -> UserError:
    return UserError(one_line(f"{path}: {problem}"))


@contextlib.contextmanager
def _seeded(seed: int = EXAMPLE_SEED):
    """Deterministic example inputs without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------------------------
# What load_model returns
# --------------------------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A model ready to export and run. Call `module(*inputs.values())` with inputs from example_inputs():
    positions follow input_names (a torch.export program's module takes its inputs by position only)."""

    module: torch.nn.Module  # in eval mode
    arch: str  # zoo name, or "torch.export"
    config: Any | None  # the zoo config dataclass
    entry: registry.ZooEntry | None
    source: Path
    input_names: list[str]  # forward()'s order
    dynamic_axes: dict[str, dict[int, str]]  # {input: {axis: symbol}}
    example_batch: int
    example_seq_len: int | None
    # the program itself, for .pt2 files. Its guards code is dropped (it would be exec'd by .module()); use
    # `module` to run it.
    exported_program: torch.export.ExportedProgram | None = None
    _shapes: _ProgramShapes | None = field(default=None, repr=False)

    def check_seq_len(self, seq_len: int) -> None:
        """UserError naming the file and the rule when the model cannot take this sequence length."""
        if self.entry is not None:
            try:
                self.entry.check_seq_len(self.config, seq_len)
            except UserError as e:
                raise _user_error(self.source, e) from None
        else:
            self._shapes.symbol_values(self.source, seq_len, self.example_batch)

    def example_inputs(self, seq_len: int | None = None, batch: int | None = None) -> dict[str, torch.Tensor]:
        """{input name: tensor} at these sizes (default: the example's), the same on every call."""
        seq_len = self.example_seq_len if seq_len is None else seq_len
        batch = self.example_batch if batch is None else batch
        if batch < 1:
            raise _user_error(self.source, f"batch must be at least 1, got {batch}")
        if self.entry is None:
            return self._shapes.make_inputs(self.source, seq_len, batch)
        self.check_seq_len(seq_len)
        with _seeded():
            return dict(self.entry.example_inputs(self.config, batch, seq_len))

    def parity_seq_lens(self) -> list[int]:
        """Two or more sequence lengths to check parity at (one when the program's sequence axis is fixed)."""
        if self.entry is not None:
            return list(self.entry.parity_seq_lens(self.config))
        return self._shapes.parity_seq_lens()


def load_model(path) -> LoadedModel:
    """Read a zoo checkpoint or a torch.export program; anything else is a one-line UserError."""
    path = Path(path)
    try:
        return _load(path)
    except _LoadError as e:
        raise _user_error(path, e) from None
    except UserError as e:  # from the registry, a config check or a length rule: say which file
        raise _user_error(path, e) from None
    except OSError as e:  # unreadable: permissions, I/O errors
        raise _user_error(path, f"cannot read it: {e.strerror or e}") from None


def _load(path: Path) -> LoadedModel:
    if not path.exists():
        raise _LoadError("no such file")
    if not path.is_file():
        raise _LoadError("not a file")
    if path.stat().st_size == 0:
        raise _LoadError("empty file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK":  # a zip: torch.save's format or a torch.export archive
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise _LoadError(f"truncated or corrupt zip archive ({one_line(e)})") from None
        if any(n.split("/", 1)[-1] == "archive_format" for n in names):
            return _load_pt2(path)
        if any(n.endswith("serialized_exported_program.json") for n in names):
            raise _LoadError("a torch.export program in the pre-2.7 format; re-save it with torch.export.save")
    elif not _parses_as_pickle(path):
        raise _LoadError("not a model file: neither a zip archive nor a pickle")
    return _load_zoo(path, _torch_load_weights_only(path))


def _parses_as_pickle(path: Path) -> bool:
    """Whether the file (or, in a torch.save zip, its data.pkl) starts with a well-formed pickle.
    pickletools only reads opcodes; it runs nothing."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
                stream = io.BytesIO(archive.read(name))
            for _ in pickletools.genops(stream):
                pass
        else:
            with path.open("rb") as stream:
                for _ in pickletools.genops(stream):  # stops at the first pickle's STOP
                    pass
        return True
    except Exception:
        return False


def _torch_load_weights_only(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the pickle-protocol notice for plain pickles
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only reports every refusal this way, damage included: a well-formed pickle means refusal
        raise _LoadError(REFUSED_PICKLE if _parses_as_pickle(path) else "truncated or corrupt checkpoint") from None
    except Exception as e:  # torch reports damage as RuntimeError, EOFError, KeyError, ValueError, ...
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _LoadError(f"truncated or corrupt checkpoint ({first_line[:160]})") from None


# --------------------------------------------------------------------------------------------------------------
# Zoo checkpoints
# --------------------------------------------------------------------------------------------------------------

def _plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def save_zoo_checkpoint(path, arch: str, config, state_dict, batch: int, seq_len: int) -> Path:
    """Write a zoo checkpoint (written under a temporary name, then renamed)."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    if not _plain(values):
        raise ValueError(f"{arch} config holds values that are not plain data: {values!r}")
    if not 1 <= batch <= MAX_EXAMPLE_BATCH:
        raise UserError(f"the example batch must be in [1, {MAX_EXAMPLE_BATCH}], got {batch}")
    payload = {
        "format": ZOO_FORMAT,
        "format_version": ZOO_FORMAT_VERSION,
        "arch": arch,
        "config": values,
        "example": {"batch": int(batch), "seq_len": int(seq_len)},
        "state_dict": {name: tensor.detach().cpu() for name, tensor in state_dict.items()},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _load_zoo(path: Path, obj) -> LoadedModel:
    if not isinstance(obj, dict) or obj.get("format") != ZOO_FORMAT:
        raise _LoadError(f"not an attn-export checkpoint (no '{ZOO_FORMAT}' format tag; "
                         "make one with `attn-export zoo create`)")
    if obj.get("format_version") != ZOO_FORMAT_VERSION:
        raise _LoadError(f"unsupported checkpoint format_version {obj.get('format_version')!r} "
                         f"(this attn-export reads {ZOO_FORMAT_VERSION})")
    arch, values, example, state_dict = obj.get("arch"), obj.get("config"), obj.get("example"), obj.get("state_dict")
    if not isinstance(arch, str) or not isinstance(values, dict):
        raise _LoadError("malformed checkpoint: 'arch' must be a string and 'config' a dict")
    if not (isinstance(example, dict) and all(_positive_int(example.get(k)) for k in ("batch", "seq_len"))):
        raise _LoadError("malformed checkpoint: 'example' must hold positive integers 'batch' and 'seq_len'")
    if example["batch"] > MAX_EXAMPLE_BATCH:
        raise _LoadError(f"malformed checkpoint: example batch {example['batch']} is over {MAX_EXAMPLE_BATCH}")
    if not (isinstance(state_dict, dict) and all(isinstance(v, torch.Tensor) for v in state_dict.values())):
        raise _LoadError("malformed checkpoint: 'state_dict' must map names to tensors")

    entry = registry.get(arch)
    config = registry.config_from_dict(entry.config_cls, values, arch)
    planned = _planned_shapes(entry, config, arch, state_dict)
    if planned is not None:  # the weights must fit the config before any real memory is spent on it
        _check_state_dict(planned, state_dict, arch)
    try:
        module = entry.build(config)
    except ValueError as e:
        raise _LoadError(f"invalid {arch} config: {e}") from None
    except (RuntimeError, MemoryError) as e:  # e.g. an allocation the machine cannot make
        raise _LoadError(f"cannot build {arch} with this config: {one_line(e)[:200]}") from None
    _load_state_dict(module, state_dict, arch)
    module.eval()
    batch, seq_len = example["batch"], example["seq_len"]
    entry.check_seq_len(config, seq_len)
    with _seeded():
        input_names = list(entry.example_inputs(config, 1, seq_len))  # names only: batch 1 is enough
    return LoadedModel(module=module, arch=arch, config=config, entry=entry, source=path,
                       input_names=input_names, dynamic_axes={k: dict(v) for k, v in entry.dynamic_axes.items()},
                       example_batch=batch, example_seq_len=seq_len)


class _OverBudget(Exception):
    pass


class _AllocationBudget(TorchDispatchMode):
    """Adds up the bytes of the new tensors a build creates and stops it once they pass `limit`."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.total = limit, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = getattr(func, "_schema", None)
        if schema is None or not any(r.alias_info for r in schema.returns):  # views, in-place ops: no new memory
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.total += t.numel() * t.element_size()
            if self.total > self.limit:
                raise _OverBudget()
        return out


def _planned_shapes(entry, config, arch: str, state_dict: dict) -> dict[str, tuple] | None:
    """The state dict shapes this config builds, found on the meta device (no memory, no random numbers), with
    a budget: a config that asks for far more memory than the checkpoint holds (a damaged or hostile value such
    as hidden=10**9) is refused before it is built. None when the model code cannot build on the meta device."""
    held = sum(t.numel() * t.element_size() for t in state_dict.values())
    budget = _AllocationBudget(2 * held + BUILD_SLACK_BYTES)
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"), budget:  # leaves the caller's RNG alone
            module = entry.build(config)
    except ValueError as e:
        raise _LoadError(f"invalid {arch} config: {e}") from None
    except _OverBudget:
        raise _LoadError(f"the {arch} config asks for more than {budget.limit / 2**20:,.0f} MiB of weights and "
                         f"buffers, while the checkpoint holds {held / 2**20:,.1f} MiB: config and weights do not "
                         "match") from None
    except Exception:
        return None  # model code that needs real tensors to build: the real build and its checks decide
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def _few(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_state_dict(expected: dict[str, tuple], state_dict: dict, arch: str) -> None:
    """Names and shapes of the checkpoint's tensors against those the config builds."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    reshaped = [f"{k} {tuple(state_dict[k].shape)} vs {expected[k]}"
                for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if reshaped:
        problems.append(f"shape {_few(reshaped)}")
    if problems:
        raise _LoadError(f"state dict does not match {arch} with this config: {'; '.join(problems)}")


def _load_state_dict(module: torch.nn.Module, state_dict: dict, arch: str) -> None:
    _check_state_dict({k: tuple(v.shape) for k, v in module.state_dict().items()}, state_dict, arch)
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise _LoadError(f"state dict does not match {arch}: {e}") from None


# --------------------------------------------------------------------------------------------------------------
# torch.export programs: vetting
#
# torch.export.load (torch 2.13) can run code from the file in all of these ways, so we check first:
#  1. weights or constants whose config says use_pickle go through torch.load(weights_only=False);
#  2. constants named custom_obj_* (torchbind) and opaque_obj_* go through pickle.loads;
#  3. the sample inputs (and legacy data/weights/<model>.pt blobs) go through deserialize_torch_artifact, which
#     retries with torch.load(weights_only=False) when the safe load fails;
#  4. data/aotinductor/ entries make it load a compiled shared library;
#  5. every SymExpr string is parsed with sympy.sympify, which evals it;
#  6. treespecs may name an enum's module ("__enum__") or a defaultdict factory, which it imports;
#  7. node targets resolve to any callable reachable from `torch`, `operator` or `math` (torch.os.system...);
#  8. names are pasted into Python source that FX compiles: graph input names (and the attribute names of
#     subgraphs) while loading, parameter paths, forward() argument names and kwarg keys in .module(); and
#     .module() execs the program's guards_code strings.
# So, before loading, we accept only archives made of JSON and raw tensor bytes (1, 2, 4), sample inputs that
# load with weights_only (3), sympy expressions built from numbers, shape symbols and known functions (5),
# plain treespecs (6), node targets that name torch ops (7) and names that are dotted identifiers (8). After
# loading, we check the graph's targets and attribute names again (7, 8) and build the module without the
# guards (8). Checked against torch 2.13's sources.
# --------------------------------------------------------------------------------------------------------------

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


def _refuse(what: str) -> _LoadError:
    return _LoadError(f"refusing to load: {what}; attn-export reads only plain torch.export programs "
                      "(no pickled objects, no compiled code)")


def _vet_pt2_archive(archive: zipfile.ZipFile) -> None:
    """The checks made before torch.export.load sees the archive (1-8 above)."""
    names = [n for n in archive.namelist() if not n.endswith("/")]
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise _LoadError("not a torch.export archive (its entries must sit under one folder)")
    root = roots.pop()
    for name in names:
        if not _PT2_ENTRIES.fullmatch(name[len(root) + 1:]):
            raise _refuse(f"unexpected entry '{name[len(root) + 1:]}' in the archive")

    def read(relative: str) -> bytes:
        try:
            return archive.read(f"{root}/{relative}")
        except KeyError:
            raise _LoadError(f"not a complete torch.export archive (no {relative})") from None

    if read("archive_format").strip() != b"pt2" or read("archive_version").strip() != b"0":
        raise _LoadError("unsupported torch.export archive format or version (this torch reads pt2 version 0)")
    for relative, prefix in (("data/weights/model_weights_config.json", "weight_"),
                             ("data/constants/model_constants_config.json", "tensor_")):
        for fqn, payload in json.loads(read(relative)).get("config", {}).items():
            if payload.get("use_pickle") or not str(payload.get("path_name", "")).startswith(prefix):
                raise _refuse(f"'{fqn}' is stored as a pickled object")
    try:
        torch.load(io.BytesIO(read("data/sample_inputs/model.pt")), map_location="cpu", weights_only=True)
    except Exception:
        raise _refuse("its sample inputs hold Python objects other than tensors") from None
    _vet_program_json(json.loads(read("models/model.json")))


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
                _vet_treespec(value)
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


def _vet_treespec(text: str) -> None:
    """Input/output structure: tuples, lists and dicts keyed by identifiers only (no imports, no enums)."""
    try:
        _protocol, spec = json.loads(text)
    except (ValueError, TypeError):
        raise _refuse("an input/output structure is not a plain treespec") from None

    def walk(spec) -> None:
        if not isinstance(spec, dict) or spec.get("type") not in _TREESPEC_TYPES:
            kind = spec.get("type") if isinstance(spec, dict) else type(spec).__name__
            raise _refuse(f"inputs/outputs use the Python type {kind}")
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


def _vet_program(ep: torch.export.ExportedProgram) -> None:
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
                raise _LoadError(f"the program was exported in training mode (node '{node.name}' has train=True); "
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


# --------------------------------------------------------------------------------------------------------------
# torch.export programs: loading, shapes and example inputs
# --------------------------------------------------------------------------------------------------------------

def _load_pt2(path: Path) -> LoadedModel:
    try:
        with zipfile.ZipFile(path) as archive:
            _vet_pt2_archive(archive)
    except _LoadError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as e:  # damaged entries show up as we read them
        raise _LoadError(f"truncated or corrupt torch.export archive ({one_line(e)})") from None
    except Exception as e:  # JSON that is not what torch writes
        raise _LoadError(f"malformed torch.export archive ({type(e).__name__}: {one_line(e)[:160]})") from None
    try:
        with warnings.catch_warnings(), path.open("rb") as f:
            warnings.simplefilter("ignore")
            ep = torch.export.load(f)
    except Exception as e:
        raise _LoadError(f"cannot read this torch.export program: {type(e).__name__}: "
                         f"{one_line(str(e).strip().splitlines()[0] if str(e).strip() else '')[:200]}") from None
    _vet_program(ep)
    if hasattr(ep, "_guards_code"):
        ep._guards_code = []  # strings that ExportedProgram.module() would exec (check 8)
    # recent torch builds a guards function unless told not to; older versions take no such argument
    takes_check_guards = "check_guards" in inspect.signature(ep.module).parameters
    module = ep.module(check_guards=False) if takes_check_guards else ep.module()
    # The graph's train/eval behaviour was fixed at export (training graphs were refused above); torch forbids
    # .eval() on it, so only the flag is set, with nn.Module's own train().
    torch.nn.Module.train(module, False)
    shapes = _ProgramShapes.from_program(ep)
    return LoadedModel(module=module, arch="torch.export", config=None, entry=None, source=path,
                       input_names=shapes.names, dynamic_axes=shapes.dynamic_axes(),
                       example_batch=shapes.example_batch, example_seq_len=shapes.example_seq_len,
                       exported_program=ep, _shapes=shapes)


def _finite_int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None  # unbounded (torch's int_oo)


@dataclass
class _ProgramShapes:
    """The program's inputs as sizes: each axis an int (static) or a sympy expression of shape symbols.

    The sequence axis is axis 1 of the first input (batch, seq, ...) and the batch axis its axis 0: the layout
    every zoo model and most transformer programs use.
    """
    names: list[str]
    examples: list[torch.Tensor]
    dims: list[list[Any]]
    ranges: dict[sympy.Symbol, tuple[int, int | None]]
    example_values: dict[sympy.Symbol, int]

    @classmethod
    def from_program(cls, ep) -> _ProgramShapes:
        if ep.example_inputs and ep.example_inputs[1]:
            # the program's module then needs (args, kwargs) split exactly as at export; we pass inputs by position
            raise _LoadError("programs exported with keyword inputs are not supported; export with positional "
                             "inputs only: torch.export.export(model, args)")
        placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        user_inputs = [placeholders[name] for name in ep.graph_signature.user_inputs]
        examples = torch.utils._pytree.tree_leaves(ep.example_inputs) if ep.example_inputs else []
        if len(examples) != len(user_inputs) or not all(isinstance(t, torch.Tensor) for t in examples):
            raise _LoadError("only programs whose inputs are plain tensors (with saved example inputs) are supported")
        signature = ep.module_call_graph[0].signature
        names = list(signature.forward_arg_names or []) if signature else []
        if len(names) != len(user_inputs):
            names = [node.name for node in user_inputs]
        dims = [[d.node.expr if isinstance(d, torch.SymInt) else int(d) for d in node.meta["val"].shape]
                for node in user_inputs]
        ranges = {}
        for key, value_range in ep.range_constraints.items():
            if isinstance(key, sympy.Symbol):
                ranges[key] = (_finite_int(value_range.lower) or 0, _finite_int(value_range.upper))
        shapes = cls(names, [t.detach().clone() for t in examples], dims, ranges, {})
        shapes.example_values = shapes._solve_examples()
        if shapes.examples and shapes.examples[0].dim() >= 2 and len(shapes._free(shapes.dims[0][1])) > 1:
            raise _LoadError(f"the sequence axis size {shapes.dims[0][1]} depends on several symbols; "
                             "attn-export needs one sequence symbol")
        return shapes

    @staticmethod
    def _free(dim) -> set:
        return dim.free_symbols if isinstance(dim, sympy.Expr) else set()

    def _solve_examples(self) -> dict[sympy.Symbol, int]:
        """Each shape symbol's value in the example inputs (plain symbols first, then e.g. 64*s0 = 256)."""
        values: dict[sympy.Symbol, int] = {}
        pending = [(dim, example.shape[axis]) for example, dims in zip(self.examples, self.dims)
                   for axis, dim in enumerate(dims) if self._free(dim)]
        for _ in range(len(pending) + 1):
            for dim, size in pending:
                unknown = self._free(dim) - set(values)
                if len(unknown) == 1:
                    symbol = unknown.pop()
                    solved = _solve_for(dim.subs(values), symbol, int(size))
                    if solved is not None:
                        values[symbol] = solved
        return values

    # The sequence and batch axes: (expression or int) of the first input.
    def _axis(self, axis: int):
        return self.dims[0][axis] if self.examples and self.examples[0].dim() > axis else None

    @property
    def example_batch(self) -> int:
        return int(self.examples[0].shape[0]) if self._axis(0) is not None else 1

    @property
    def example_seq_len(self) -> int | None:
        return int(self.examples[0].shape[1]) if self._axis(1) is not None else None

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        seq, batch = self._axis(1), self._axis(0)
        axes: dict[str, dict[int, str]] = {}
        for name, dims in zip(self.names, self.dims):
            for axis, dim in enumerate(dims):
                if not self._free(dim):
                    continue
                label = "seq" if dim == seq else "batch" if dim == batch else re.sub(r"\W+", "_", str(dim)).strip("_")
                axes.setdefault(name, {})[axis] = label
        return axes

    def _range(self, symbol) -> tuple[int, int | None]:
        return self.ranges.get(symbol, (0, None))

    def symbol_values(self, source: Path, seq_len: int | None, batch: int) -> dict[sympy.Symbol, int]:
        """Symbol values giving this sequence length and batch; UserError when the program cannot take them."""
        values = dict(self.example_values)
        for axis, size, what in ((1, seq_len, "sequence length"), (0, batch, "batch")):
            dim = self._axis(axis)
            if dim is None or size is None:
                continue
            if not self._free(dim):
                if size != dim:
                    raise _user_error(source, f"{what} {size} is not possible: the program was exported with a "
                                              f"fixed {what} of {dim}")
                continue
            (symbol,) = self._free(dim)
            value = _solve_for(dim, symbol, size)
            lo, hi = self._range(symbol)
            if value is None or value < lo or (hi is not None and value > hi):
                allowed = f"{dim} with {symbol} in [{lo}, {'inf' if hi is None else hi}]"
                raise _user_error(source, f"{what} {size} is not possible: the program allows {allowed}")
            values[symbol] = value
        return values

    def make_inputs(self, source: Path, seq_len: int | None, batch: int) -> dict[str, torch.Tensor]:
        values = self.symbol_values(source, seq_len, batch)
        inputs = {}
        for index, (name, example, dims) in enumerate(zip(self.names, self.examples, self.dims)):
            sized = [d.subs(values) if self._free(d) else d for d in dims]
            if any(self._free(d) for d in sized):
                raise _user_error(source, f"cannot size input '{name}' {dims} from the example inputs")
            shape = tuple(int(d) for d in sized)
            if shape == tuple(example.shape):
                inputs[name] = example.clone()
            else:
                inputs[name] = _random_like(example, shape, seed=EXAMPLE_SEED + index)
        return inputs

    def parity_seq_lens(self) -> list[int]:
        dim = self._axis(1)
        if dim is None:
            return []
        if not self._free(dim):
            return [int(dim)]
        (symbol,) = self._free(dim)
        current = self.example_values.get(symbol)
        if current is None:
            return [int(self.examples[0].shape[1])]
        lo, hi = self._range(symbol)
        lo = max(lo, 2)  # torch specializes sizes 0 and 1, so stay clear of them
        others = [v for v in (2 * current, current // 2, lo, hi) if v is not None and lo <= v and
                  (hi is None or v <= hi) and v != current]
        values = [current] + others[:1]
        return sorted({int(dim.subs(symbol, v)) for v in values})


def _solve_for(expr, symbol, target: int) -> int | None:
    """The integer value of `symbol` making `expr` equal `target`, if there is one."""
    if expr == symbol:
        return target
    try:
        solutions = sympy.solve(sympy.Eq(expr, target), symbol)
    except Exception:
        return None
    for solution in solutions:
        if solution.is_integer and int(expr.subs(symbol, solution)) == target:
            return int(solution)
    return None


def _random_like(example: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A new input of another shape, same dtype: floats ~ N(0, 1), integers within the example's range
    (token ids stay inside the vocabulary, masks stay 0/1)."""
    generator = torch.Generator().manual_seed(seed)
    if example.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if example.dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(example.dtype)
    low, high = (int(example.min()), int(example.max())) if example.numel() else (0, 1)
    return torch.randint(low, high + 1, shape, generator=generator, dtype=example.dtype)
