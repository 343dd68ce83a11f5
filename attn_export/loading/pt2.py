"""torch.export programs (.pt2): vetted (pt2_vetting) before and after torch.export.load, then their input
shapes read from the program's symbols and ranges so that inputs of other lengths and batches can be made."""
from __future__ import annotations

import contextlib
import inspect
import re
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sympy
import torch

from attn_export.errors import UserError, one_line

from .common import EXAMPLE_SEED, LoadedModel, LoadError
from .pt2_vetting import VettedArchive, vet_archive, vet_program


def load_program(path: Path) -> LoadedModel:
    try:
        with zipfile.ZipFile(path) as archive:
            vetted = vet_archive(archive)
    except LoadError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as e:  # damaged entries show up as we read them
        raise LoadError(f"truncated or corrupt torch.export archive ({one_line(e)})") from None
    except Exception as e:  # JSON that is not what torch writes
        raise LoadError(f"malformed torch.export archive ({type(e).__name__}: {one_line(e)[:160]})") from None
    try:
        with warnings.catch_warnings(), _program_file(path, vetted) as f:
            warnings.simplefilter("ignore")
            ep = torch.export.load(f)
    except Exception as e:
        raise LoadError(f"cannot read this torch.export program: {type(e).__name__}: "
                         f"{one_line(str(e).strip().splitlines()[0] if str(e).strip() else '')[:200]}") from None
    vet_program(ep)
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
                       spec=shapes, output_names=vetted.output_names or _output_names(ep), exported_program=ep)


@contextlib.contextmanager
def _program_file(path: Path, vetted: VettedArchive):
    """The archive as torch.export.load should read it: the file itself, or, when vetting flattened its outputs,
    a temporary copy holding the rewritten program (entries streamed, so large weights do not sit in memory)."""
    if vetted.program_json is None:
        with path.open("rb") as f:
            yield f
        return
    program = f"{vetted.root}/models/model.json"
    with tempfile.TemporaryFile() as copy:
        with zipfile.ZipFile(path) as source, zipfile.ZipFile(copy, "w", zipfile.ZIP_STORED) as target:
            for info in source.infolist():
                if info.filename == program:
                    target.writestr(info, vetted.program_json)
                    continue
                with source.open(info) as entry, target.open(info, "w") as out:
                    shutil.copyfileobj(entry, out, 1 << 20)
        copy.seek(0)
        yield copy


def _output_names(ep) -> list[str] | None:
    """The keys of a program that returns a flat dict of tensors (their order is the flattened order)."""
    spec = ep.call_spec.out_spec
    if spec is None or spec.type is not dict or any(not child.is_leaf() for child in spec.children_specs):
        return None
    return [str(key) for key in spec.context]


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
            raise LoadError("programs exported with keyword inputs are not supported; export with positional "
                             "inputs only: torch.export.export(model, args)")
        placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        user_inputs = [placeholders[name] for name in ep.graph_signature.user_inputs]
        examples = torch.utils._pytree.tree_leaves(ep.example_inputs) if ep.example_inputs else []
        if len(examples) != len(user_inputs) or not all(isinstance(t, torch.Tensor) for t in examples):
            raise LoadError("only programs whose inputs are plain tensors (with saved example inputs) are supported")
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
            raise LoadError(f"the sequence axis size {shapes.dims[0][1]} depends on several symbols; "
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

    def symbol_values(self, seq_len: int | None, batch: int) -> dict[sympy.Symbol, int]:
        """Symbol values giving this sequence length and batch; UserError when the program cannot take them."""
        values = dict(self.example_values)
        for axis, size, what in ((1, seq_len, "sequence length"), (0, batch, "batch")):
            dim = self._axis(axis)
            if dim is None or size is None:
                continue
            if not self._free(dim):
                if size != dim:
                    raise UserError(f"{what} {size} is not possible: the program was exported with a "
                                    f"fixed {what} of {dim}")
                continue
            (symbol,) = self._free(dim)
            value = _solve_for(dim, symbol, size)
            lo, hi = self._range(symbol)
            if value is None or value < lo or (hi is not None and value > hi):
                allowed = f"{dim} with {symbol} in [{lo}, {'inf' if hi is None else hi}]"
                raise UserError(f"{what} {size} is not possible: the program allows {allowed}")
            values[symbol] = value
        return values

    def check_seq_len(self, seq_len: int) -> None:
        self.symbol_values(seq_len, self.example_batch)

    def make(self, seq_len: int | None, batch: int) -> dict[str, torch.Tensor]:
        values = self.symbol_values(seq_len, batch)
        inputs = {}
        for index, (name, example, dims) in enumerate(zip(self.names, self.examples, self.dims)):
            sized = [d.subs(values) if self._free(d) else d for d in dims]
            if any(self._free(d) for d in sized):
                raise UserError(f"cannot size input '{name}' {dims} from the example inputs")
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
