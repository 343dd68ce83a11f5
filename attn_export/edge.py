"""The edge path: build a TensorRT engine from a build folder's fused graph on the device itself (a Jetson with
TensorRT and no PyTorch) and check it against the parity data `build` saved (parity.npz: the inputs and torch's
outputs). Nothing here imports torch: device buffers come from the CUDA runtime through ctypes, the GPU is
found through the driver, and the op-contract digest comes from the plugin library's own tag.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import write_json
from .backends import engine_manifest, tensorrt_profiles, tensorrt_runner
from .backends.tensorrt_precision import parity_tolerances
from .build_folder import FUSED_GRAPH, PARITY_DATA, PORTABLE_GRAPH, load_parity_data
from .check import OutputComparison, compare_outputs
from .errors import UserError, one_line

EDGE_REPORT = "edge_report.json"
_CUDART_NAMES = ("libcudart.so", "libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0")
_H2D, _D2H = 1, 2  # cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost


@dataclass
class EdgeCheck:
    runner: str  # "onnxruntime: model.fused.portable.onnx" or "tensorrt: model.plan"
    inputs: str  # the parity set's label
    comparisons: list[OutputComparison]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)


@dataclass
class EdgeResult:
    engine: Path | None = None
    checks: list[EdgeCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def as_dict(self) -> dict:
        return {"engine": str(self.engine) if self.engine else None, "passed": self.passed,
                "checks": [{"runner": c.runner, "inputs": c.inputs, "output": x.name, "max_abs_err": x.max_abs_err,
                            "atol": x.atol, "rtol": x.rtol, "passed": x.passed, "reason": x.reason}
                           for c in self.checks for x in c.comparisons]}


def read_build_folder(out_dir: Path) -> list[tuple[str, dict, dict]]:
    if not (out_dir / FUSED_GRAPH).is_file():
        raise UserError(f"{out_dir}: no {FUSED_GRAPH} (copy the whole build folder made by `attn-export build`)")
    return load_parity_data(out_dir / PARITY_DATA)


def check_onnxruntime(out_dir: Path, parity) -> list[EdgeCheck]:
    """The portable graph on plain onnxruntime against torch's saved outputs: the folder travelled intact."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("--onnxruntime needs onnxruntime (pip install onnxruntime)") from None
    session = ort.InferenceSession(str(out_dir / PORTABLE_GRAPH), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    checks = []
    for label, inputs, expected in parity:
        got = dict(zip(names, session.run(names, {i.name: inputs[i.name] for i in session.get_inputs()})))
        checks.append(EdgeCheck(f"onnxruntime: {PORTABLE_GRAPH}", label,
                                compare_outputs(expected, got, pair_by_position=True)))
    return checks


def build_and_check(out_dir: str | os.PathLike, *, engine_path: str | os.PathLike | None = None,
                    plugin_library: str | os.PathLike | None = None, precision: str = "fp32",
                    onnxruntime: bool = False, atol: float | None = None, rtol: float | None = None,
                    runner_factory=None, on_checks=lambda checks: None) -> EdgeResult:
    """Engine from out_dir/model.fused.onnx with one optimization profile spanning the parity inputs, then every
    parity set run on it and compared with torch's outputs. Writes the engine, its manifest and edge_report.json."""
    out_dir = Path(out_dir)
    parity = read_build_folder(out_dir)
    result = EdgeResult()
    if onnxruntime:
        result.checks += check_onnxruntime(out_dir, parity)
        on_checks(result.checks)
    available, why = tensorrt_runner.tensorrt_status()
    if not available:
        write_json(out_dir / EDGE_REPORT, {**result.as_dict(), "engine_reason": why})
        raise UserError(why)
    library = Path(plugin_library) if plugin_library else tensorrt_runner.find_plugin_library()
    shapes = [{n: tuple(v.shape) for n, v in inputs.items()} for _, inputs, _ in parity]
    engine_path = Path(engine_path) if engine_path else out_dir / "model.plan"
    result.engine = tensorrt_runner.build_engine(out_dir / FUSED_GRAPH, engine_path, plugin_library=library,
                                                 profiles=[tensorrt_profiles.covering_profile(shapes)],
                                                 precision=precision)
    default_atol, default_rtol = (None, None) if precision == "fp32" else parity_tolerances(precision)
    runner = (runner_factory or EngineRunner)(result.engine, library)
    for label, inputs, expected in parity:
        got = runner.run(inputs)
        result.checks.append(EdgeCheck(f"tensorrt: {result.engine.name}", label, compare_outputs(
            expected, got, default_atol if atol is None else atol, default_rtol if rtol is None else rtol,
            pair_by_position=True)))
    on_checks([c for c in result.checks if c.runner.startswith("tensorrt")])
    write_json(out_dir / EDGE_REPORT, result.as_dict())
    return result


# ------------------------------------------------------------------------------ torch-free engine runner
class _CudaRuntime:
    """The few CUDA runtime calls an engine run needs, through ctypes (JetPack ships libcudart, not torch)."""

    def __init__(self):
        for name in _CUDART_NAMES:
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            raise UserError("the CUDA runtime (libcudart.so) is not on the library path (JetPack: "
                            "/usr/local/cuda/lib64)")

    def call(self, what: str, status: int) -> None:
        if status != 0:
            self.lib.cudaGetErrorString.restype = ctypes.c_char_p
            raise UserError(f"CUDA {what} failed: {self.lib.cudaGetErrorString(status).decode()}")

    def malloc(self, size: int) -> int:
        pointer = ctypes.c_void_p()
        self.call("cudaMalloc", self.lib.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(max(size, 1))))
        return pointer.value

    def copy(self, dst: int, src: int, size: int, kind: int) -> None:
        self.call("cudaMemcpy", self.lib.cudaMemcpy(ctypes.c_void_p(dst), ctypes.c_void_p(src),
                                                    ctypes.c_size_t(size), kind))

    def free(self, pointer: int) -> None:
        self.lib.cudaFree(ctypes.c_void_p(pointer))

    def stream(self) -> int:
        handle = ctypes.c_void_p()
        self.call("cudaStreamCreate", self.lib.cudaStreamCreate(ctypes.byref(handle)))
        return handle.value or 0

    def synchronize(self, stream: int) -> None:
        self.call("cudaStreamSynchronize", self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)))


def _numpy_dtype(trt, data_type):
    table = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
             "BOOL": np.bool_, "UINT8": np.uint8}
    for name, dtype in table.items():
        if getattr(trt.DataType, name, None) == data_type:
            return np.dtype(dtype)
    raise UserError(f"engine I/O type {data_type} has no numpy type (bf16 I/O: build the engine with float32 I/O)")


class EngineRunner:
    """Runs a serialized engine with numpy arrays in and out and CUDA runtime buffers in between."""

    name = "tensorrt"

    def __init__(self, engine_path: Path, plugin_library: Path | None):
        trt, why = tensorrt_runner.importable_tensorrt()
        if trt is None:
            raise UserError(why)
        self.trt, self.engine_path, self.cuda = trt, Path(engine_path), _CudaRuntime()
        # the engine was built here a moment ago; the check still catches a foreign plugin library
        engine_manifest.check_engine(
            self.engine_path, tensorrt_version=trt.__version__, machine=engine_manifest.machine_facts(),
            plugin_library=engine_manifest.plugin_library_facts(plugin_library))
        if plugin_library is not None:
            tensorrt_runner._load_plugin_library(trt, plugin_library)
        self.logger = tensorrt_runner._make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise UserError(f"{self.engine_path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        self.stream = self.cuda.stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        buffers = []
        try:
            for name in self.input_names:
                dtype = _numpy_dtype(self.trt, self.engine.get_tensor_dtype(name))
                host = np.ascontiguousarray(inputs[name], dtype=dtype)
                if not self.context.set_input_shape(name, host.shape):
                    raise UserError(f"{self.engine_path}: input '{name}' shape {host.shape} is outside the "
                                    "engine's optimization profile")
                device = self.cuda.malloc(host.nbytes)
                buffers.append(device)
                self.cuda.copy(device, host.ctypes.data, host.nbytes, _H2D)
                self.context.set_tensor_address(name, device)
            outputs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                outputs[name] = np.empty(shape, dtype=_numpy_dtype(self.trt, self.engine.get_tensor_dtype(name)))
                device = self.cuda.malloc(outputs[name].nbytes)
                buffers.append(device)
                self.context.set_tensor_address(name, device)
            if not self.context.execute_async_v3(self.stream):
                raise UserError(one_line(f"{self.engine_path}: TensorRT execution failed "
                                         f"{'; '.join(self.logger.errors[-3:])}"))
            self.cuda.synchronize(self.stream)
            for name, device in zip(self.output_names, buffers[len(self.input_names):]):
                self.cuda.copy(outputs[name].ctypes.data, device, outputs[name].nbytes, _D2H)
            return outputs
        finally:
            for device in buffers:
                self.cuda.free(device)
