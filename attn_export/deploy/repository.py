"""`attn-export deploy`: a Triton model repository from a build folder.

Two models, each <repo>/<model>/config.pbtxt plus <repo>/<model>/1/<file>:
  <name>_onnxruntime  platform onnxruntime_onnx, the portable fused graph (hosts without the plugin: CPU, or a
                      GPU without TensorRT); always written.
  <name>_tensorrt     platform tensorrt_plan, the engine, I/O from its manifest's optimization profiles and the
                      fused graph; written only when the build folder holds an engine. Triton loads plugin
                      libraries for the whole server before any model, so the library is copied beside the
                      repository (<repo>_plugins/) and deploy.json gives the exact launch line that loads it.
Everything is staged in a temporary folder beside the repository, every config is parsed back with Triton's
protobuf and checked against its model file, and only then renamed into place: nothing is half-written.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..backends.engine_manifest import load_manifest
from ..backends.tensorrt_profiles import profiles_from_json
from ..build_folder import FUSED_GRAPH, PORTABLE_GRAPH
from ..errors import UserError, one_line
from . import triton_config
from .triton_config import TensorSpec

ENGINE = "model.plan"
PLUGIN_LIBRARY = "libattn_export_plugins.so"
PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")


@dataclass
class DeployResult:
    repository: Path
    models: dict[str, str] = field(default_factory=dict)  # model name -> platform or backend
    skipped: dict[str, str] = field(default_factory=dict)  # model name -> why it was not written
    plugin_library: Path | None = None
    launch: list[str] = field(default_factory=list)  # shell lines that start a server on this repository

    def as_dict(self) -> dict:
        return {"repository": str(self.repository), "models": self.models, "skipped": self.skipped,
                "plugin_library": str(self.plugin_library) if self.plugin_library else None, "launch": self.launch}


def default_name(out_dir: Path) -> str:
    name = Path(out_dir).resolve().name.replace(" ", "_")
    try:
        return triton_config.check_model_name(name)
    except UserError:
        return "model"


def plugins_folder(repository: Path) -> Path:
    """Beside the repository, not inside it: Triton would take every folder in the repository for a model."""
    return repository.parent / f"{repository.name}_plugins"


def portable_graph(out_dir: Path) -> tuple[Path, onnx.ModelProto]:
    """The build folder's portable fused graph (its weights not loaded: only the I/O is read)."""
    path = Path(out_dir) / PORTABLE_GRAPH
    if not path.is_file():
        hint = (f"{FUSED_GRAPH} is there but not {PORTABLE_GRAPH} (an older build: run `attn-export build` again)"
                if (Path(out_dir) / FUSED_GRAPH).is_file() else "run `attn-export build` first")
        raise UserError(f"{out_dir}: no fused graph to deploy; {hint}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UserError(one_line(f"{path}: unreadable ONNX graph ({e})")) from None
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise UserError(f"{path}: weights stored outside the file (over 2 GiB) are not deployable yet")
    return path, model


def check_model_options(out_dir: Path, name: str, max_batch_size: int, instances: int) -> None:
    """What deploy and serve both refuse before writing anything."""
    if not Path(out_dir).is_dir():
        raise UserError(f"{out_dir}: no such build folder")
    triton_config.check_model_name(name)
    if max_batch_size < 0:
        raise UserError(f"--max-batch-size must be 0 (no batching) or more, got {max_batch_size}")
    if instances < 1:
        raise UserError(f"--instances must be at least 1, got {instances}")


def onnxruntime_model(folder: Path, name: str, graph_path: Path, graph: onnx.ModelProto, *, max_batch_size: int,
                      instances: int, python_backend: bool = False, parameters: dict[str, str] | None = None) -> str:
    """<folder>/<name>/ for the portable graph: platform onnxruntime_onnx, or (python_backend) Triton's Python
    backend running it on onnxruntime, for servers without the onnxruntime backend. Returns the platform."""
    inputs, outputs = triton_config.onnx_specs(graph)
    platform, backend = ("", "python") if python_backend else ("onnxruntime_onnx", "")
    # a CPU-only host has no GPU for KIND_AUTO to pick; the Python backend runs onnxruntime on the CPU
    kind = "KIND_CPU" if python_backend else "KIND_AUTO"
    text = triton_config.make_config(
        name=name, platform=platform, backend=backend, inputs=inputs, outputs=outputs,
        max_batch_size=max_batch_size, dynamic_batching=max_batch_size > 1,
        instance_groups=[{"count": instances, "kind": kind}], parameters=parameters)
    version = folder / name / "1"
    version.mkdir(parents=True)
    shutil.copyfile(graph_path, version / "model.onnx")
    if python_backend:
        shutil.copyfile(PYTHON_MODEL, version / "model.py")
    (folder / name / "config.pbtxt").write_text(text)
    triton_config.validate(folder / name / "config.pbtxt", inputs, outputs, str(graph_path))
    return backend or platform


def engine_specs(out_dir: Path, manifest: dict) -> tuple[list[TensorSpec], list[TensorSpec], list[dict]]:
    """Engine I/O: input dims from the optimization profiles (-1 where any profile lets an axis vary), data
    types and outputs from the fused graph the engine was built from."""
    profiles = profiles_from_json(manifest.get("profiles") or [])
    if not profiles:
        raise UserError(f"{out_dir / 'model.json'}: the engine manifest records no optimization profile")
    fused = onnx.load(str(Path(out_dir) / FUSED_GRAPH), load_external_data=False)
    graph_inputs, outputs = triton_config.onnx_specs(fused)
    inputs = []
    for spec in graph_inputs:
        ranges = [p.get(spec.name) for p in profiles]
        if any(r is None for r in ranges):  # a static input needs no profile entry
            inputs.append(spec)
            continue
        if any(len(r[0]) != len(spec.dims) for r in ranges):
            raise UserError(f"the engine's profiles give '{spec.name}' another rank than the fused graph's "
                            f"{len(spec.dims)}")
        first_min = ranges[0][0]
        dims = tuple(first_min[i] if all(lo[i] == hi[i] == first_min[i] for lo, _, hi in ranges) else -1
                     for i in range(len(spec.dims)))
        inputs.append(TensorSpec(spec.name, spec.data_type, dims))
    return inputs, outputs, profiles


def tensorrt_model(folder: Path, name: str, out_dir: Path, manifest: dict, *, max_batch_size: int,
                   instances: int) -> None:
    inputs, outputs, profiles = engine_specs(out_dir, manifest)
    if max_batch_size > 0:
        short = [i for i, p in enumerate(profiles) if any(hi[0] < max_batch_size for _, _, hi in p.values())]
        if short:
            raise UserError(f"--max-batch-size {max_batch_size}: optimization profile(s) "
                            f"{', '.join(map(str, short))} of the engine stop at a smaller batch; rebuild the "
                            "engine with a larger batch in --max-shapes or lower --max-batch-size")
    # one instance group per optimization profile, so each instance owns the profile its shapes need
    groups = [{"count": instances, "kind": "KIND_GPU", "profile": [i]} for i in range(len(profiles))]
    text = triton_config.make_config(name=name, platform="tensorrt_plan", inputs=inputs, outputs=outputs,
                                     max_batch_size=max_batch_size, dynamic_batching=max_batch_size > 1,
                                     instance_groups=groups)
    version = folder / name / "1"
    version.mkdir(parents=True)
    shutil.copyfile(Path(out_dir) / ENGINE, version / "model.plan")
    (folder / name / "config.pbtxt").write_text(text)
    triton_config.validate(folder / name / "config.pbtxt", inputs, outputs, str(Path(out_dir) / ENGINE))


def engine_skip_reason(out_dir: Path) -> str:
    """Why the build folder has no engine, in the words its report used."""
    try:
        reason = json.loads((Path(out_dir) / "report.json").read_text())["engine"]["reason"]
    except (OSError, ValueError, KeyError, TypeError):
        reason = ""
    return f"no engine in {out_dir}" + (f" ({reason})" if reason else "")


def plugin_library_of(manifest: dict) -> Path | None:
    """The library the engine was built with, else the one this checkout built or $ATTN_EXPORT_PLUGIN_LIB."""
    recorded = (manifest.get("plugin_library") or {}).get("path")
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    from ..backends.tensorrt_runner import find_plugin_library

    return find_plugin_library()


def deploy(out_dir: str | os.PathLike, repository: str | os.PathLike, *, name: str | None = None,
           max_batch_size: int = 0, instances: int = 1) -> DeployResult:
    out_dir, repository = Path(out_dir), Path(repository).absolute()
    name = name or default_name(out_dir)
    check_model_options(out_dir, name, max_batch_size, instances)
    if repository.exists() and not repository.is_dir():
        raise UserError(f"{repository}: exists and is not a folder (a Triton model repository is a folder)")
    graph_path, graph = portable_graph(out_dir)
    result = DeployResult(repository)
    try:
        repository.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{repository.name}.stage-", dir=repository.parent))
    except OSError as e:
        raise UserError(one_line(f"{repository}: cannot write beside it: {e.strerror or e}")) from None
    try:
        models = stage / "repository"
        models.mkdir()
        ort_name, trt_name = f"{name}_onnxruntime", f"{name}_tensorrt"
        result.models[ort_name] = onnxruntime_model(models, ort_name, graph_path, graph,
                                                    max_batch_size=max_batch_size, instances=instances)
        manifest = load_manifest(out_dir / ENGINE) if (out_dir / ENGINE).is_file() else None
        library = plugin_library_of(manifest) if manifest else None
        if manifest is None:
            result.skipped[trt_name] = engine_skip_reason(out_dir)
        elif library is None and (manifest.get("plugin_library") or {}).get("contracts"):
            result.skipped[trt_name] = ("the engine uses the attn_export plugins and their library is not here "
                                        "(build it with `attn-export plugins build`)")
        else:
            tensorrt_model(models, trt_name, out_dir, manifest, max_batch_size=max_batch_size, instances=instances)
            result.models[trt_name] = "tensorrt_plan"
        result.launch = launch_lines(repository, plugins_folder(repository) / PLUGIN_LIBRARY if library else None)
        if library:
            (stage / "plugins").mkdir()
            shutil.copyfile(library, stage / "plugins" / PLUGIN_LIBRARY)
            result.plugin_library = plugins_folder(repository) / PLUGIN_LIBRARY
        (models / "deploy.json").write_text(json.dumps(result.as_dict(), indent=2) + "\n")
        _commit(stage, repository)
    except OSError as e:
        raise UserError(one_line(f"{repository}: cannot write the repository: {e.strerror or e}")) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return result


def launch_lines(repository: Path, library: Path | None) -> list[str]:
    repo = shlex.quote(str(repository))
    if library is None:
        return [f"tritonserver --model-repository={repo}"]
    lib = shlex.quote(str(library))
    # both load the plugins for the whole server before any model; the library must match the server's TensorRT
    return [f"LD_PRELOAD={lib}${{LD_PRELOAD:+:$LD_PRELOAD}} tritonserver --model-repository={repo}",
            f"tritonserver --model-repository={repo} --backend-config=tensorrt,plugins={lib}"]


def _commit(stage: Path, repository: Path) -> None:
    """Move the staged models (and plugins) into place by rename, each replacing an older one of its name."""
    staged = stage / "repository"
    if not repository.exists():
        staged.rename(repository)
    else:
        for entry in sorted(staged.iterdir()):
            _replace(entry, repository / entry.name, stage)
    if (stage / "plugins").is_dir():
        folder = plugins_folder(repository)
        if not folder.exists():
            (stage / "plugins").rename(folder)
        else:
            _replace(stage / "plugins" / PLUGIN_LIBRARY, folder / PLUGIN_LIBRARY, stage)


def _replace(new: Path, final: Path, stage: Path) -> None:
    if final.is_dir() and not final.is_symlink():
        old = stage / f"old-{final.name}"
        final.rename(old)  # the old one leaves with the stage folder
    new.replace(final)
