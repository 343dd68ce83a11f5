"""The Python API: export, fuse, check and build, on any nn.Module with example inputs. The CLI is a thin layer
over these functions."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from .atomic import write_json
from .backends import OnnxRuntimeRunner, Runner, TorchRunner
from .check import OutputComparison, compare_outputs
from .errors import UserError
from .export import export_onnx, load_onnx, save_onnx
from .passes import FusionReport, fuse_graph
from .passes.probe import probe_shapes, random_inputs


@dataclass
class ParityResult:
    backend: str
    graph: str
    feeds: str  # which inputs, e.g. "seq_len=512"
    comparisons: list[OutputComparison]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def as_dicts(self) -> list[dict]:
        return [{"backend": self.backend, "graph": self.graph, "inputs": self.feeds, "output": c.name,
                 "max_abs_err": c.max_abs_err, "mean_abs_err": c.mean_abs_err, "max_rel_err": c.max_rel_err,
                 "mean_rel_err": c.mean_rel_err, "atol": c.atol, "rtol": c.rtol, "passed": c.passed,
                 "reason": c.reason} for c in self.comparisons]


@dataclass
class BuildResult:
    out_dir: Path
    fusion: FusionReport
    parity: list[ParityResult] = field(default_factory=list)
    engine: dict = field(default_factory=lambda: {"path": None, "reason": ""})

    @property
    def ok(self) -> bool:
        return self.fusion.all_fused and all(p.passed for p in self.parity)

    def as_dict(self) -> dict:
        return {"fusion": self.fusion.as_dict(), "parity": [row for p in self.parity for row in p.as_dicts()],
                "engine": self.engine}


def export(module: torch.nn.Module, example_inputs: dict[str, torch.Tensor], path: str | Path, *,
           dynamic_axes: dict[str, dict[int, str]] | None = None, exporter: str = "dynamo",
           probe_shapes: list[dict[str, list[int]]] | None = None) -> onnx.ModelProto:
    """Export to `path` (written atomically) and return the graph."""
    model = export_onnx(module, example_inputs, dynamic_axes=dynamic_axes, exporter=exporter,
                        probe_shapes=probe_shapes)
    save_onnx(model, path)
    return model


def fuse(model: onnx.ModelProto | str | Path, output: str | Path | None = None) -> tuple[onnx.ModelProto, FusionReport]:
    """Fuse attention into custom ops. The fused graph is compared with the original on random inputs at the
    probe shapes before it is returned or written; a mismatch is refused."""
    if not isinstance(model, onnx.ModelProto):
        model = load_onnx(model)
    fused, report = fuse_graph(model)
    if report.fused:
        _refuse_wrong_fusion(model, fused)
    if output is not None:
        save_onnx(fused, output)
    return fused, report


def _refuse_wrong_fusion(original: onnx.ModelProto, fused: onnx.ModelProto) -> None:
    reference, candidate = OnnxRuntimeRunner(original, "reference graph"), OnnxRuntimeRunner(fused, "fused graph")
    for i, shapes in enumerate(probe_shapes(original)):
        feeds = random_inputs(original, shapes, seed=100 + i)
        for c in compare_outputs(reference.run(feeds), candidate.run(feeds)):
            if not c.passed:
                raise UserError(f"refusing to write the fused graph: output '{c.name}' differs from the reference "
                                f"graph ({c.reason})")


def check(reference: Runner, candidates: list[Runner], feeds: list[tuple[str, dict[str, np.ndarray]]], *,
          atol: float | None = None, rtol: float | None = None) -> list[ParityResult]:
    """Run every candidate on every input set and compare it with the reference, output by output in order."""
    results = []
    for label, inputs in feeds:
        expected = reference.run(inputs)
        for runner in candidates:
            got = runner.run(inputs)
            comparisons = compare_outputs(expected, got, atol, rtol, pair_by_position=True)
            results.append(ParityResult(runner.name, runner.label, label, comparisons))
    return results


def build(module: torch.nn.Module, example_inputs: dict[str, torch.Tensor], out_dir: str | Path, *,
          dynamic_axes: dict[str, dict[int, str]] | None = None,
          parity_inputs: list[tuple[str, dict[str, torch.Tensor]]] | None = None, exporter: str = "dynamo",
          atol: float | None = None, rtol: float | None = None, engine: bool = True,
          progress: Callable[[str], None] = lambda message: None) -> BuildResult:
    """export -> fuse -> parity (torch vs both graphs on onnxruntime) -> TensorRT engine where TensorRT exists.
    Writes out_dir/model.onnx, model.fused.onnx and report.json."""
    out_dir = Path(out_dir)
    parity_inputs = parity_inputs or [("example", example_inputs)]
    shapes = [{name: list(t.shape) for name, t in inputs.items()} for _, inputs in parity_inputs]
    if len(shapes) < 2:
        shapes = shapes * 2  # a fixed-shape graph is probed twice at its one shape (different random values)
    progress("exporting to ONNX")
    reference = export(module, example_inputs, out_dir / "model.onnx", dynamic_axes=dynamic_axes,
                       exporter=exporter, probe_shapes=shapes)
    progress("fusing attention")
    fused, report = fuse(reference, out_dir / "model.fused.onnx")
    result = BuildResult(out_dir, report)

    progress("checking parity against torch")
    names = list(example_inputs)
    feeds = [(label, {n: t.numpy() for n, t in inputs.items()}) for label, inputs in parity_inputs]
    runners = [OnnxRuntimeRunner(reference, "model.onnx"), OnnxRuntimeRunner(fused, "model.fused.onnx")]
    result.parity = check(TorchRunner(module, "torch eager", names), runners, feeds, atol=atol, rtol=rtol)

    result.engine = _engine(out_dir, fused, parity_inputs, dynamic_axes) if engine else \
        {"path": None, "reason": "engine build skipped (--no-engine)"}
    progress("writing report")
    write_json(out_dir / "report.json", result.as_dict())
    return result


def _engine(out_dir: Path, fused: onnx.ModelProto, parity_inputs, dynamic_axes) -> dict:
    from .backends import tensorrt_runner

    available, reason = tensorrt_runner.tensorrt_status()
    if not available:
        return {"path": None, "reason": reason}
    shapes = [{n: tuple(t.shape) for n, t in inputs.items()} for _, inputs in parity_inputs]
    profile = {name: (min(s[name] for s in shapes), shapes[0][name], max(s[name] for s in shapes))
               for name in shapes[0]}
    try:
        path = tensorrt_runner.build_engine(out_dir / "model.fused.onnx", out_dir / "model.plan",
                                            plugin_library=tensorrt_runner.find_plugin_library(), profiles=[profile])
    except UserError as e:  # e.g. no plugin library yet: the graphs and the report are still worth having
        return {"path": None, "reason": f"engine build failed: {e}"}
    return {"path": str(path), "reason": ""}
