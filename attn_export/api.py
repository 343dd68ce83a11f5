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
from .backends.tensorrt_profiles import (ProfileRequest, covering_profile, model_inputs, profiles_to_json,
                                         select_profile)
from .build_folder import (FILE_ROLES, FUSED_GRAPH, PARITY_DATA, PORTABLE_GRAPH, REFERENCE_GRAPH,
                           save_parity_data)
from .check import OutputComparison, compare_outputs
from .errors import UserError
from .export import export_onnx, load_onnx, save_onnx
from .ops.functions import with_function_bodies
from .passes import FusionReport, fuse_graph
from .passes.fusion import fusion_probe
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
    notes: list[str] = field(default_factory=list)  # e.g. an exporter fallback

    @property
    def ok(self) -> bool:
        return self.fusion.all_fused and all(p.passed for p in self.parity)

    def as_dict(self) -> dict:
        return {"files": FILE_ROLES, "fusion": self.fusion.as_dict(),
                "parity": [row for p in self.parity for row in p.as_dicts()], "engine": self.engine,
                "notes": self.notes}


class _RecordingRunner(Runner):
    """Runs the reference once per input set and keeps its outputs, so parity.npz holds exactly the values
    both graphs were compared with."""

    def __init__(self, runner: Runner):
        super().__init__(runner.label)
        self.name, self._runner = runner.name, runner
        self.records: list[tuple[dict, dict]] = []  # (feeds, outputs); feeds kept alive so id() stays unique

    def run(self, feeds):
        for seen, outputs in self.records:
            if seen is feeds:
                return outputs
        outputs = self._runner.run(feeds)
        self.records.append((feeds, outputs))
        return outputs


def export(module: torch.nn.Module, example_inputs: dict[str, torch.Tensor], path: str | Path, *,
           dynamic_axes: dict[str, dict[int, str]] | None = None, exporter: str = "dynamo",
           probe_shapes: list[dict[str, list[int]]] | None = None, output_names: list[str] | None = None,
           notes: list[str] | None = None, prefer: tuple[str, str] | None = None) -> onnx.ModelProto:
    """Export to `path` (written atomically) and return the graph. exporter="auto" tries dynamo, then TorchScript;
    a fallback is said in one line appended to `notes`."""
    model = export_auto(module, example_inputs, dynamic_axes=dynamic_axes, exporter=exporter,
                        probe_shapes=probe_shapes, output_names=output_names, notes=notes, prefer=prefer)
    save_onnx(model, path)
    return model


def export_auto(module: torch.nn.Module, example_inputs: dict[str, torch.Tensor], *, exporter: str = "auto",
                notes: list[str] | None = None, prefer: tuple[str, str] | None = None, **options) -> onnx.ModelProto:
    """export_onnx with `exporter` "dynamo", "torchscript" or "auto": dynamo first, TorchScript when dynamo
    fails. `prefer` = (exporter, why) puts the loader's choice for this model first (HF BigBird: dynamo fails on
    it). Under "auto" a choice other than dynamo is said in one line appended to `notes`."""
    if exporter != "auto":
        return export_onnx(module, example_inputs, exporter=exporter, **options)
    first, why = prefer or ("dynamo", "")
    second = "torchscript" if first == "dynamo" else "dynamo"
    try:
        model = export_onnx(module, example_inputs, exporter=first, **options)
        note = f"used the {_EXPORTER_NAMES[first]} exporter: {why}" if first != "dynamo" else None
    except UserError as e:
        try:
            model = export_onnx(module, example_inputs, exporter=second, **options)
        except UserError as e2:
            raise UserError(f"{e}; and {e2}") from None
        note = f"used the {_EXPORTER_NAMES[second]} exporter: {e}"
    if note and notes is not None:
        notes.append(note[:300])
    return model


_EXPORTER_NAMES = {"dynamo": "dynamo", "torchscript": "TorchScript"}


def fuse(model: onnx.ModelProto | str | Path, output: str | Path | None = None) -> tuple[onnx.ModelProto, FusionReport]:
    """Fuse attention into custom ops. The fused graph is compared with the original on random inputs at the
    probe shapes before it is returned or written; a mismatch is refused."""
    if not isinstance(model, onnx.ModelProto):
        model = load_onnx(model)
    probe = fusion_probe(model)
    fused, report = fuse_graph(model, probe)
    if report.fused:
        feeds = [random_inputs(model, shapes, seed=100 + i) for i, shapes in enumerate(probe_shapes(model))]
        # inputs that are all ids and masks do not depend on the seed: a probe ran the reference on them already
        known = [probe.outputs(f) for f in feeds]
        del probe  # its values (GBs for a long sequence) are not needed for the fused graph's run
        _refuse_wrong_fusion(model, fused, feeds, known)
    if output is not None:
        save_onnx(fused, output)
    return fused, report


def _refuse_wrong_fusion(original: onnx.ModelProto, fused: onnx.ModelProto, feed_sets: list[dict],
                         known: list[dict | None]) -> None:
    """`known[i]`: the reference graph's outputs at `feed_sets[i]` where already computed, else None."""
    candidate, reference = OnnxRuntimeRunner(fused, "fused graph"), None
    for feeds, expected in zip(feed_sets, known):
        if expected is None:
            reference = reference or OnnxRuntimeRunner(original, "reference graph")
            expected = reference.run(feeds)
        for c in compare_outputs(expected, candidate.run(feeds)):
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
          precision: str = "fp32", profiles: ProfileRequest | None = None, output_names: list[str] | None = None,
          prefer_exporter: tuple[str, str] | None = None,
          progress: Callable[[str], None] = lambda message: None) -> BuildResult:
    """export -> fuse -> parity (torch vs both graphs on onnxruntime) -> TensorRT engine where TensorRT exists,
    and its parity against torch. Writes out_dir/model.onnx, model.fused.onnx (for TensorRT),
    model.fused.portable.onnx (function bodies inside), parity.npz, report.json (and model.plan with model.json,
    its manifest). `precision` is the engine's (fp32, fp16, bf16); `profiles` the optimization profiles
    asked for (trtexec-style shapes or --seq-lens buckets; default: one spanning the parity inputs)."""
    out_dir = Path(out_dir)
    parity_inputs = parity_inputs or [("example", example_inputs)]
    shapes = [{name: list(t.shape) for name, t in inputs.items()} for _, inputs in parity_inputs]
    if len(shapes) < 2:
        shapes = shapes * 2  # a fixed-shape graph is probed twice at its one shape (different random values)
    progress("exporting to ONNX")
    notes: list[str] = []
    reference = export(module, example_inputs, out_dir / "model.onnx", dynamic_axes=dynamic_axes,
                       exporter=exporter, probe_shapes=shapes, output_names=output_names, notes=notes,
                       prefer=prefer_exporter)
    # checked against the graph's inputs now, so a wrong --opt-shapes fails before fusing and parity
    engine_profiles = profiles.resolve(model_inputs(reference), dynamic_axes) if profiles else None
    progress("fusing attention")
    fused, report = fuse(reference, out_dir / FUSED_GRAPH)
    portable = with_function_bodies(fused)
    save_onnx(portable, out_dir / PORTABLE_GRAPH)
    result = BuildResult(out_dir, report, notes=notes)

    progress("checking parity against torch")
    names = list(example_inputs)
    feeds = [(label, {n: t.numpy() for n, t in inputs.items()}) for label, inputs in parity_inputs]
    # the fused graph's parity row runs the portable file's graph: the TensorRT file only differs in lacking bodies
    runners = [OnnxRuntimeRunner(reference, REFERENCE_GRAPH), OnnxRuntimeRunner(portable, FUSED_GRAPH)]
    torch_runner = _RecordingRunner(TorchRunner(module, "torch eager", names, output_names=output_names))
    result.parity = check(torch_runner, runners, feeds, atol=atol, rtol=rtol)
    save_parity_data(out_dir / PARITY_DATA, [label for label, _ in feeds], torch_runner.records)

    if engine:
        progress("building the TensorRT engine")
        result.engine, engine_parity = _engine(out_dir, parity_inputs, engine_profiles, precision, torch_runner,
                                               atol, rtol)
        result.parity += engine_parity
    else:
        result.engine = {"path": None, "reason": "engine build skipped (--no-engine)"}
    progress("writing report")
    write_json(out_dir / "report.json", result.as_dict())
    return result


def _engine(out_dir: Path, parity_inputs, profiles, precision: str, reference: Runner, atol, rtol
            ) -> tuple[dict, list[ParityResult]]:
    """Build model.plan where TensorRT and a GPU exist and check it against torch at the parity inputs its
    profiles hold. A failure is recorded in the report (the graphs are still worth having), never raised."""
    from .backends import tensorrt_runner
    from .backends.tensorrt_precision import parity_tolerances

    available, reason = tensorrt_runner.tensorrt_status()
    if not available:
        return {"path": None, "reason": reason}, []
    shape_sets = [{n: tuple(t.shape) for n, t in inputs.items()} for _, inputs in parity_inputs]
    profiles = profiles or [covering_profile(shape_sets)]
    engine = {"path": None, "reason": "", "precision": precision, "profiles": profiles_to_json(profiles)}
    try:
        library = tensorrt_runner.find_plugin_library()
        path = tensorrt_runner.build_engine(out_dir / FUSED_GRAPH, out_dir / "model.plan",
                                            plugin_library=library, profiles=profiles, precision=precision)
    except UserError as e:  # e.g. no plugin library yet
        engine["reason"] = f"engine build failed: {e}"
        return engine, []
    engine["path"], engine["manifest"] = str(path), str(tensorrt_runner.manifest_path(path))

    feeds = [(label, {n: t.numpy() for n, t in inputs.items()})
             for (label, inputs), shapes in zip(parity_inputs, shape_sets)
             if select_profile(profiles, shapes) is not None]
    if len(feeds) < len(parity_inputs):
        engine["parity_note"] = (f"{len(parity_inputs) - len(feeds)} of {len(parity_inputs)} parity input sets lie "
                                 "outside the engine's optimization profiles and were not run on it")
    if not feeds:
        return engine, []
    # a reduced-precision engine is held to its compute dtype's tolerances, unless the user set them
    default_atol, default_rtol = (None, None) if precision == "fp32" else parity_tolerances(precision)
    try:
        runner = tensorrt_runner.TensorRTRunner(path, plugin_library=library)
        parity = check(reference, [runner], feeds, atol=default_atol if atol is None else atol,
                       rtol=default_rtol if rtol is None else rtol)
    except UserError as e:
        engine["reason"] = f"engine built; its parity could not be checked: {e}"
        return engine, []
    return engine, parity
