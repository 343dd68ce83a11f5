"""What every model source returns (LoadedModel), the load error type, and the memory budget the sources use to
refuse a config that asks for far more memory than its weights file holds, before anything real is allocated."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attn_export.errors import UserError, one_line

EXAMPLE_SEED = 0
# a config may ask for at most this much more memory than the file's own weights (buffers, rounding)
BUILD_SLACK_BYTES = 256 << 20


class LoadError(Exception):
    """A problem with the file; load_model turns it into UserError("<path>: <problem>")."""


def user_error(path: Path, problem: Any) -> UserError:
    return UserError(one_line(f"{path}: {problem}"))


@contextlib.contextmanager
def seeded(seed: int = EXAMPLE_SEED):
    """Deterministic example inputs without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class InputSpec(Protocol):
    """How one source makes inputs of a given size. Errors are UserErrors without the file name."""

    def check_seq_len(self, seq_len: int) -> None: ...

    def make(self, seq_len: int | None, batch: int) -> dict[str, torch.Tensor]: ...

    def parity_seq_lens(self) -> list[int]: ...


@dataclass
class LoadedModel:
    """A model ready to export and run. Call `module(*inputs.values())` with inputs from example_inputs():
    positions follow input_names (a torch.export program's module takes its inputs by position only)."""

    module: torch.nn.Module  # in eval mode
    arch: str  # zoo name, "torch.export", or the Hugging Face class name
    config: Any | None  # the zoo config dataclass or the transformers config
    entry: Any | None  # the zoo registry entry
    source: Path
    input_names: list[str]  # forward()'s order
    dynamic_axes: dict[str, dict[int, str]]  # {input: {axis: symbol}}
    example_batch: int
    example_seq_len: int | None  # None: no sequence axis (vision)
    spec: InputSpec
    output_names: list[str] | None = None  # as the model names them; None: the exporter's defaults
    exporter_hint: tuple[str, str] | None = None  # (exporter, why) to try first under --exporter auto
    # the program itself, for .pt2 files. Its guards code is dropped (it would be exec'd by .module()); use
    # `module` to run it.
    exported_program: torch.export.ExportedProgram | None = None

    def check_seq_len(self, seq_len: int) -> None:
        """UserError naming the file and the rule when the model cannot take this sequence length."""
        try:
            self.spec.check_seq_len(seq_len)
        except UserError as e:
            raise user_error(self.source, e) from None

    def example_inputs(self, seq_len: int | None = None, batch: int | None = None) -> dict[str, torch.Tensor]:
        """{input name: tensor} at these sizes (default: the example's), the same on every call."""
        seq_len = self.example_seq_len if seq_len is None else seq_len
        batch = self.example_batch if batch is None else batch
        if batch < 1:
            raise user_error(self.source, f"batch must be at least 1, got {batch}")
        try:
            return self.spec.make(seq_len, batch)
        except UserError as e:
            raise user_error(self.source, e) from None

    def parity_seq_lens(self) -> list[int]:
        """Two or more sequence lengths to check parity at (one when the sequence axis is fixed, none when the
        model has no sequence axis)."""
        return list(self.spec.parity_seq_lens())

    def parity_inputs(self, static: bool = False) -> list[tuple[str, dict[str, torch.Tensor]]]:
        """Labelled input sets to check parity with: the parity lengths; or, where the sequence is fixed or absent
        (a length-specialised graph, vision), two batch sizes when the batch is dynamic; only the example when
        `static`."""
        if static:
            return [(self._label(None, None), self.example_inputs())]
        lengths = self.parity_seq_lens()
        if len(lengths) >= 2:
            return [(f"seq_len={n}", self.example_inputs(seq_len=n)) for n in lengths]
        seq_len = lengths[0] if lengths else None
        batch_dynamic = any(0 in axes for axes in self.dynamic_axes.values())
        batches = sorted({1, self.example_batch, 2})[:2] if batch_dynamic else [self.example_batch]
        return [(self._label(seq_len, b), self.example_inputs(seq_len=seq_len, batch=b)) for b in batches]

    @property
    def seq_axis_dynamic(self) -> bool:
        return any(1 in axes for axes in self.dynamic_axes.values()) and self.example_seq_len is not None

    def _label(self, seq_len, batch) -> str:
        batch = f"batch={batch or self.example_batch}"
        if self.example_seq_len is None:
            return batch
        return f"seq_len={seq_len or self.example_seq_len}" + ("" if self.seq_axis_dynamic else f" {batch}")


class OverBudget(Exception):
    pass


class AllocationBudget(TorchDispatchMode):
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
                raise OverBudget()
        return out


def few(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
