"""The TensorRT backend: build an engine from a fused ONNX model with our plugin library, and run it.

TensorRT is an optional extra that cannot be installed on every machine, so `tensorrt` is imported only inside
the functions that need it; without it every entry point raises one UserError line saying why. The code
targets the TensorRT 10.3 Python API (JetPack 6.1/6.2, the oldest release with IPluginV3) and newer.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from attn_export.atomic import write_bytes, write_json
from attn_export.errors import UserError, one_line

from . import engine_manifest, tensorrt_precision, tensorrt_profiles

PLUGIN_LIB_ENV = "ATTN_EXPORT_PLUGIN_LIB"
PLUGIN_LIB_NAME = "libattn_export_plugins.so"
MIN_VERSION = (10, 3)
_REPO_ROOT = Path(__file__).resolve().parents[2]
# where a CMake build of plugins_trt/ leaves the library, relative to the repository root
_PLUGIN_BUILD_PATHS = (Path("plugins_trt/build") / PLUGIN_LIB_NAME, Path("build/plugins_trt") / PLUGIN_LIB_NAME)
NOT_INSTALLED = "TensorRT is not installed (pip install 'attn-export[gpu]' on a machine with an NVIDIA GPU)"

# Plugin libraries already loaded in this process: loadLibrary fails when a library's creators are registered
# a second time, and the handle must stay alive while engines use the plugins.
_loaded_plugin_libraries: dict[Path, object] = {}


def importable_tensorrt():
    """(the tensorrt module, "") when it imports and is new enough for our plugins, else (None, one-line reason).
    A GPU is not needed for this much (e.g. to list plugin creators)."""
    try:
        import tensorrt as trt
    except ImportError:
        return None, NOT_INSTALLED
    except Exception as e:  # e.g. the wheel is there but libnvinfer cannot be loaded
        return None, one_line(f"TensorRT cannot be imported: {e}")
    version = str(getattr(trt, "__version__", "unknown"))
    try:
        major_minor = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        major_minor = (0, 0)
    if major_minor < MIN_VERSION:
        return None, f"TensorRT {version} is too old: attn-export needs 10.3 or newer (IPluginV3 plugins)"
    return trt, ""


def tensorrt_status() -> tuple[bool, str]:
    """(True, "TensorRT 10.x.y") when engines can be built here, else (False, one-line reason)."""
    trt, why = importable_tensorrt()
    if trt is None:
        return False, why
    version = getattr(trt, "__version__", "unknown")
    try:
        import torch
        gpu = torch.cuda.is_available()
    except ImportError:  # an edge device without PyTorch builds engines too: ask the driver
        gpu = engine_manifest.driver_device() is not None
    except Exception:
        gpu = False
    if not gpu:
        return False, (f"TensorRT {version} is installed but torch sees no CUDA GPU (a CUDA build of torch and an "
                       "NVIDIA GPU are needed)")
    return True, f"TensorRT {version}"


def _require_tensorrt():
    ok, reason = tensorrt_status()
    if not ok:
        raise UserError(reason)
    import tensorrt as trt

    return trt


def find_plugin_library() -> Path | None:
    """The plugin library: $ATTN_EXPORT_PLUGIN_LIB if set, else a CMake build inside this checkout, else None."""
    env = os.environ.get(PLUGIN_LIB_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise UserError(f"{PLUGIN_LIB_ENV}={env}: no such file")
        return path.resolve()
    for relative in _PLUGIN_BUILD_PATHS:
        candidate = _REPO_ROOT / relative
        if candidate.is_file():
            return candidate
    return None


def _load_plugin_library(trt, library: Path) -> None:
    library = Path(library).resolve()
    if library in _loaded_plugin_libraries:
        return
    if not library.is_file():
        raise UserError(f"{library}: plugin library not found")
    # load_library (IPluginRegistry::loadLibrary) calls the library's getCreators and setLoggerFinder
    handle = trt.get_plugin_registry().load_library(str(library))
    if handle is None:
        raise UserError(f"{library}: TensorRT could not load the plugin library "
                        "(it must export getCreators and setLoggerFinder, and its plugins must not be registered yet)")
    _loaded_plugin_libraries[library] = handle


def _make_logger(trt):
    """A logger that prints warnings as TensorRT's does and keeps errors, so a failure can quote them."""

    class CollectingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            errors = (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR)
            if severity in errors:
                self.errors.append(one_line(msg))
            if severity in errors or severity == trt.ILogger.Severity.WARNING:
                print(f"[TensorRT] {msg}", file=sys.stderr, flush=True)

    return CollectingLogger()


def _parser_errors(parser) -> str:
    messages = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        where = []
        node_name = getattr(error, "node_name", None)
        operator = getattr(error, "node_operator", None)
        if node_name and node_name():
            where.append(f"node {node_name()}")
        elif error.node() >= 0:
            where.append(f"node #{error.node()}")
        if operator and operator():
            where.append(f"({operator()})")
        messages.append(" ".join(where + [error.desc()]))
    return one_line("; ".join(messages))


def _check_profiles(network, profiles) -> None:
    """Every dynamic input needs a min/opt/max shape in every profile, of the right rank and ordered."""
    dynamic = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if any(d < 0 for d in tensor.shape):
            dynamic[tensor.name] = tuple(tensor.shape)
    if dynamic and not profiles:
        raise UserError(f"the model has dynamic inputs ({', '.join(dynamic)}) but no optimization profile was given")
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    for index, profile in enumerate(profiles):
        for name in dynamic:
            if name not in profile:
                raise UserError(f"optimization profile {index} has no shape for dynamic input '{name}'")
        for name, (lo, opt, hi) in profile.items():
            if name not in inputs:
                raise UserError(f"optimization profile {index} names '{name}', which is not a model input "
                                f"(inputs: {', '.join(inputs)})")
            rank = len(inputs[name])
            if not len(lo) == len(opt) == len(hi) == rank:
                raise UserError(f"optimization profile {index}: '{name}' needs rank-{rank} shapes, "
                                f"got {lo}, {opt}, {hi}")
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise UserError(f"optimization profile {index}: '{name}' needs min <= opt <= max, "
                                f"got {lo}, {opt}, {hi}")


# the doctor reads the driver version through this name
_cuda_driver_version = engine_manifest.cuda_driver_version


def build_engine(
    fused_onnx: Path,
    engine_path: Path,
    *,
    plugin_library: Path | None,
    profiles: list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]],
    fp16: bool = False,
    workspace_mb: int = 4096,
    precision: str | None = None,
    timing_cache: Path | bool | None = True,
) -> Path:
    """Parse the fused ONNX model (plugins from `plugin_library`), build a serialized engine with one
    optimization profile per dict {input: (min, opt, max)}, and write it plus a JSON manifest beside it
    (engine_manifest.py). `precision` is fp32, fp16 or bf16 (`fp16=True` means fp16); TensorRT 11 has no precision
    flags and follows the graph's types. `timing_cache`: True for the per-user cache of this TensorRT and SM, a
    path, or None for none."""
    precision = precision or ("fp16" if fp16 else "fp32")
    trt = _require_tensorrt()
    fused_onnx, engine_path = Path(fused_onnx), Path(engine_path)
    if plugin_library is not None:
        _load_plugin_library(trt, plugin_library)

    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    # 10.15+: let a registered plugin win over a builtin op or a local function of the same name
    override = getattr(getattr(trt, "OnnxParserFlag", None), "ENABLE_PLUGIN_OVERRIDE", None)
    if override is not None:
        parser.set_flag(override)
    if not parser.parse_from_file(str(fused_onnx)):
        hint = "" if plugin_library else (" (no plugin library loaded: run `attn-export plugins build` or set "
                                          f"{PLUGIN_LIB_ENV})")
        raise UserError(f"{fused_onnx}: TensorRT could not parse the model: {_parser_errors(parser)}{hint}")

    _check_profiles(network, profiles)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb * (1 << 20))
    for flag in _precision_flags(trt, precision, fused_onnx):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 (on by default) would miss float32 parity tolerances
    machine = engine_manifest.machine_facts()
    cache_path = (engine_manifest.timing_cache_path(trt.__version__, machine["compute_capability"])
                  if timing_cache is True else Path(timing_cache) if timing_cache else None)
    cache = _attach_timing_cache(config, cache_path)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "; ".join(logger.errors[-3:]) or "see the TensorRT log above"
        raise UserError(f"{fused_onnx}: TensorRT failed to build the engine: {detail}")

    if cache is not None and cache_path is not None:
        try:
            write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
        except UserError as e:  # a cache that cannot be saved costs time next build, nothing else
            print(f"[attn-export] timing cache not saved: {e}", file=sys.stderr)
    details = engine_manifest.build_manifest(
        engine_path=engine_path, onnx_path=fused_onnx, tensorrt_version=trt.__version__, machine=machine,
        plugin_library=engine_manifest.plugin_library_facts(plugin_library), precision=precision,
        profiles_json=tensorrt_profiles.profiles_to_json(profiles), timing_cache=cache_path,
        workspace_mb=workspace_mb)
    for key in ("engine", "engine_sha256"):  # _write_engine records the engine itself
        details.pop(key)
    _write_engine(engine_path, bytes(memoryview(serialized)), details)
    return engine_path


def _precision_flags(trt, precision: str, fused_onnx: Path) -> list[str]:
    available = {name for name in ("FP16", "BF16") if hasattr(trt.BuilderFlag, name)}
    graph_types: set[str] = set()
    if precision != "fp32" and not available:  # strongly typed: only then do the graph's types matter
        import onnx

        graph_types = tensorrt_precision.graph_float_types(onnx.load(str(fused_onnx), load_external_data=False))
    return tensorrt_precision.builder_flags(precision, tensorrt_version=trt.__version__, available_flags=available,
                                            graph_types=graph_types)


def _attach_timing_cache(config, path: Path | None):
    """Start from the saved timing cache when there is one (a stale or foreign one is dropped, not fatal)."""
    if path is None:
        return None
    data = b""
    try:
        data = path.read_bytes() if path.is_file() else b""
    except OSError:
        pass
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # TensorRT raises on a corrupt buffer in some versions, returns None in others
        cache = None
    if cache is None and data:
        print(f"[attn-export] ignoring unreadable timing cache {path}", file=sys.stderr)
        cache = config.create_timing_cache(b"")
    if cache is not None and not config.set_timing_cache(cache, ignore_mismatch=False):
        print(f"[attn-export] timing cache {path} is from another device or version; starting a new one",
              file=sys.stderr)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def manifest_path(engine_path: Path) -> Path:
    return Path(engine_path).with_suffix(".json")


def _write_engine(engine_path: Path, engine: bytes, details: dict) -> None:
    """The engine, then its manifest, each written atomically. The old manifest goes first and the new one
    records the engine's size and sha256, so a run killed in between never leaves a manifest describing
    another engine: a manifest that exists matches the engine beside it."""
    try:
        manifest_path(engine_path).unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"{manifest_path(engine_path)}: cannot replace it: {e.strerror or e}") from None
    write_bytes(engine_path, engine)
    write_json(manifest_path(engine_path), {"engine": engine_path.name, "engine_bytes": len(engine),
                                            "engine_sha256": hashlib.sha256(engine).hexdigest(), **details})


def _torch_dtype(trt, data_type):
    import torch

    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}
    for name, dtype in table.items():
        if getattr(trt.DataType, name, None) == data_type:
            return dtype
    raise UserError(f"TensorRT tensor type {data_type} is not supported by the runner")


class TensorRTRunner:
    """Runs a serialized engine on the current CUDA device, with torch tensors as device buffers."""

    name = "tensorrt"

    def __init__(self, engine_path: Path, plugin_library: Path | None = None, profile_index: int = 0):
        trt = _require_tensorrt()
        import torch

        self._trt = trt
        self.engine_path = Path(engine_path)
        self.label = self.engine_path.name  # as the other runners: which graph it runs, for parity tables
        if plugin_library is None:  # the library this process already loaded, else the one a build left here
            plugin_library = next(iter(_loaded_plugin_libraries), None) or find_plugin_library()
        # an engine from another TensorRT, GPU or plugin library is refused in one line before TensorRT reads it
        manifest = engine_manifest.check_engine(
            self.engine_path, tensorrt_version=trt.__version__, machine=engine_manifest.machine_facts(),
            plugin_library=engine_manifest.plugin_library_facts(plugin_library))
        self.profiles = tensorrt_profiles.profiles_from_json((manifest or {}).get("profiles") or [])
        if plugin_library is not None:
            _load_plugin_library(trt, plugin_library)  # the plugins must be registered before deserializing
        self._logger = _make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise UserError(f"{self.engine_path}: TensorRT could not deserialize the engine (built by another "
                            "TensorRT version or for another GPU, or its plugin library is not loaded)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._profile = profile_index
        if profile_index:
            self.context.set_optimization_profile_async(profile_index, self.stream.cuda_stream)

    def _use_profile_for(self, inputs: dict[str, np.ndarray]) -> None:
        """Switch to the optimization profile whose ranges hold these input shapes (--seq-lens buckets)."""
        if len(self.profiles) < 2:
            return
        shapes = {name: tuple(np.shape(inputs[name])) for name in self.input_names}
        index = tensorrt_profiles.select_profile(self.profiles, shapes)
        if index is None:
            given = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in shapes.items())
            raise UserError(f"{self.engine_path}: inputs {given} fit none of the engine's optimization profiles "
                            f"({tensorrt_profiles.describe_profiles(self.profiles)})")
        if index != self._profile:
            self.context.set_optimization_profile_async(index, self.stream.cuda_stream)
            self._profile = index

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in, host arrays out (the copies included, as trtexec's end-to-end Latency)."""
        import torch

        buffers = self.bind(inputs)
        self.execute()
        # numpy has no bfloat16: such outputs come back as float32
        return {name: (buffers[name].float() if buffers[name].dtype == torch.bfloat16 else buffers[name]).cpu().numpy()
                for name in self.output_names}

    def execute(self) -> None:
        """One inference on the bound device buffers, synchronised."""
        self.enqueue()
        self.stream.synchronize()

    def enqueue(self) -> None:
        """One inference on the bound device buffers, queued on self.stream (not synchronised)."""
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            detail = "; ".join(self._logger.errors[-3:])
            raise UserError(one_line(f"{self.engine_path}: TensorRT execution failed {detail}"))

    def bind(self, inputs: dict[str, np.ndarray]) -> dict:
        """Copy the inputs to the device, allocate the outputs there and give TensorRT their addresses; the
        buffers stay bound (and referenced here) until the next bind, so enqueue() can run on them again."""
        import torch

        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise UserError(f"{self.engine_path}: missing input(s) {', '.join(missing)}")
        self._use_profile_for(inputs)
        # Keep every device tensor referenced until the stream is synchronized.
        buffers: dict[str, torch.Tensor] = {}
        for name in self.input_names:
            dtype = _torch_dtype(self._trt, self.engine.get_tensor_dtype(name))
            tensor = torch.from_numpy(np.ascontiguousarray(inputs[name])).to(device="cuda", dtype=dtype)
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise UserError(f"{self.engine_path}: input '{name}' shape {tuple(tensor.shape)} is outside the "
                                "engine's optimization profile")
            self.context.set_tensor_address(name, tensor.data_ptr())
            buffers[name] = tensor
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))  # known once every input shape is set
            if any(d < 0 for d in shape):
                raise UserError(f"{self.engine_path}: output '{name}' has a data-dependent shape {shape}")
            dtype = _torch_dtype(self._trt, self.engine.get_tensor_dtype(name))
            buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, buffers[name].data_ptr())

        # the input copies ran on torch's current stream; the engine runs on ours
        self.stream.wait_stream(torch.cuda.current_stream())
        self._bound = buffers
        return buffers
