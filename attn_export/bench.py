"""Latency benchmarks: each backend at each sequence length, as JSON records and a latency-vs-length plot.

Two kinds of figure, named as trtexec names them:
  - "GPU Compute Time": inputs and outputs resident on the device, each call bracketed by CUDA events on the
    stream it runs on (torch eager on CUDA, and TensorRT on its bound buffers, as trtexec --noDataTransfers);
  - "Latency": wall clock around a synchronised call with host arrays in and out, copies included (CPU runs,
    onnxruntime, and TensorRT end to end as a second record).
CUDA graphs are never used.
"""
from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import onnx
import torch

from .atomic import write_bytes
from .errors import UserError

BACKENDS = ("torch", "onnxruntime", "tensorrt")
PERCENTILES = {"p90": 90, "p95": 95, "p99": 99}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class BenchRecord:
    backend: str
    graph: str  # "eager", "model.onnx" or "model.fused.onnx"
    seq_len: int | None  # None: a model without a sequence axis (vision)
    batch: int
    dtype: str
    device: str
    latency_ms: dict[str, float]  # min, mean, median, p90, p95, p99
    throughput_per_s: float  # inferences per second (trtexec: Throughput, qps)
    tokens_per_s: float | None  # None without a sequence axis
    peak_memory_mb: float | None  # None where the backend does not expose it
    trtexec_name: str  # which trtexec figure latency_ms corresponds to
    cuda_graphs: bool = False
    transfers: str = ""
    iters: int = 0
    warmup: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def latency_stats(samples_ms: np.ndarray) -> dict[str, float]:
    stats = {"min": float(samples_ms.min()), "mean": float(samples_ms.mean()), "median": float(np.median(samples_ms))}
    stats.update({name: float(np.percentile(samples_ms, q)) for name, q in PERCENTILES.items()})
    return stats


def time_on_stream(call: Callable[[], object], warmup: int, iters: int, stream) -> np.ndarray:
    """Milliseconds per call between CUDA events recorded on `stream` around it (trtexec's GPU Compute Time)."""
    for _ in range(warmup):
        call()
    stream.synchronize()
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        call()
        end.record(stream)
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return np.asarray(samples)


def time_calls(call: Callable[[], object], warmup: int, iters: int, sync: Callable[[], None]) -> np.ndarray:
    for _ in range(warmup):
        call()
    sync()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return np.asarray(samples)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA GPU here")
    return device


def check_request(backends: list[str], dtype: str, device: str) -> None:
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise UserError(f"unknown backend(s) {', '.join(unknown) or '(none)'} (choose from {', '.join(BACKENDS)})")
    if dtype != "fp32" and device == "cpu":
        raise UserError(f"--dtype {dtype} needs a GPU (torch eager and onnxruntime run float32 on CPU)")
    if dtype != "fp32" and "onnxruntime" in backends:
        raise UserError(f"--dtype {dtype}: the onnxruntime backend runs the float32 graphs; bench it with fp32")
    if "tensorrt" in backends:
        from .backends.tensorrt_runner import tensorrt_status

        available, reason = tensorrt_status()
        if not available:
            raise UserError(f"tensorrt backend: {reason}")


class Case:
    """One thing to time: a backend on a graph, prepared once, called per sequence length."""

    def __init__(self, backend: str, graph: str, device: str, prepare: Callable[[dict], Callable[[], object]],
                 transfers: str, peak_memory: Callable[[], float | None] = lambda: None,
                 stream: Callable[[], object] | None = None):
        self.backend, self.graph, self.device = backend, graph, device
        self.prepare, self.transfers, self.peak_memory = prepare, transfers, peak_memory
        self.stream = stream  # the CUDA stream the call runs on: timed with events ("GPU Compute Time")

    @property
    def trtexec_name(self) -> str:
        return "GPU Compute Time" if self.stream is not None else "Latency"


def torch_case(module: torch.nn.Module, input_names: list[str], device: str, dtype: str) -> Case:
    if module.training:  # a torch.export program's module refuses eval(); loaded models are in eval already
        module.eval()
    module = module.to(device)
    if dtype != "fp32":
        module = module.to(TORCH_DTYPES[dtype])

    def prepare(feeds):
        args = [torch.from_numpy(feeds[n]).to(device) for n in input_names]
        args = [a.to(TORCH_DTYPES[dtype]) if a.is_floating_point() else a for a in args]
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def call():
            with torch.inference_mode():
                return module(*args)
        return call

    def peak():
        return torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else None

    transfers = "inputs resident on the GPU, outputs left there" if device == "cuda" else "host memory only"
    stream = torch.cuda.current_stream if device == "cuda" else None
    return Case("torch", "eager", device, prepare, transfers, peak, stream=stream)


def onnxruntime_case(model: onnx.ModelProto, graph: str, device: str) -> Case:
    from .backends import OnnxRuntimeRunner

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    runner = OnnxRuntimeRunner(model, graph, providers=providers)
    if device == "cuda" and "CUDAExecutionProvider" not in runner.session.get_providers():
        raise UserError("onnxruntime has no CUDA provider here (install onnxruntime-gpu) or use --device cpu")

    def prepare(feeds):
        return lambda: runner.run(feeds)

    transfers = "host arrays in and out (copies included)" if device == "cuda" else "host memory only"
    return Case("onnxruntime", graph, device, prepare, transfers)


def span_profile(input_shapes: list[dict[str, tuple]]) -> dict[str, tuple]:
    """One profile over every benchmarked shape: per-dimension min and max, opt the last (longest) shapes."""
    return {name: (tuple(min(d) for d in zip(*(s[name] for s in input_shapes))), tuple(input_shapes[-1][name]),
                   tuple(max(d) for d in zip(*(s[name] for s in input_shapes))))
            for name in input_shapes[0]}


def tensorrt_cases(fused: onnx.ModelProto, workdir, input_shapes: list[dict[str, tuple]], dtype: str) -> list[Case]:
    """Build one engine whose profile spans every benchmarked shape; time it twice: GPU compute on bound device
    buffers (CUDA events), and end to end with host copies (wall clock)."""
    from pathlib import Path

    from .backends import tensorrt_runner
    from .export import save_onnx

    onnx_path = save_onnx(fused, Path(workdir) / "model.fused.onnx")
    profile = span_profile(input_shapes)
    engine = tensorrt_runner.build_engine(onnx_path, Path(workdir) / "model.plan",
                                          plugin_library=tensorrt_runner.find_plugin_library(), profiles=[profile],
                                          precision=dtype)  # fp32, fp16 or bf16
    runner = tensorrt_runner.TensorRTRunner(engine)

    def resident(feeds):
        runner.bind(feeds)  # copied once, outside the timing
        return runner.enqueue

    def end_to_end(feeds):
        return lambda: runner.run(feeds)

    return [Case("tensorrt", "model.plan", "cuda", resident, "inputs and outputs resident on the GPU",
                 stream=lambda: runner.stream),
            Case("tensorrt", "model.plan (end to end)", "cuda", end_to_end, "host arrays in and out (copies included)")]


def run_benchmark(cases: list[Case], inputs_for: Callable[[int], dict[str, np.ndarray]], seq_lens: list[int],
                  batch: int, dtype: str, warmup: int, iters: int,
                  started: Callable[[str], None] = lambda label: None,
                  finished: Callable[[], None] = lambda: None) -> list[BenchRecord]:
    records = []
    for seq_len in seq_lens:
        feeds = inputs_for(seq_len)
        for case in cases:
            started(f"{case.backend}: {case.graph} at {seq_len} tokens" if seq_len else f"{case.backend}: {case.graph}")
            call = case.prepare(feeds)
            if case.stream is not None:
                samples = time_on_stream(call, warmup, iters, case.stream())
            else:
                sync = torch.cuda.synchronize if case.device == "cuda" else (lambda: None)
                samples = time_calls(call, warmup, iters, sync)
            stats = latency_stats(samples)
            per_s = 1e3 / stats["mean"]
            records.append(BenchRecord(
                backend=case.backend, graph=case.graph, seq_len=seq_len, batch=batch, dtype=dtype,
                device=case.device, latency_ms=stats, throughput_per_s=per_s,
                tokens_per_s=per_s * batch * seq_len if seq_len else None,
                peak_memory_mb=case.peak_memory(), trtexec_name=case.trtexec_name,
                transfers=case.transfers, iters=iters, warmup=warmup))
            finished()
    return records


def write_plot(records: list[BenchRecord], path, title: str) -> None:
    """Median latency against sequence length, one line per backend and graph, log-log, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    by_length = all(r.seq_len is not None for r in records)  # else a vision model: latency per batch instead
    x = (lambda r: r.seq_len) if by_length else (lambda r: r.batch)
    for key in dict.fromkeys((r.backend, r.graph) for r in records):
        rows = sorted((r for r in records if (r.backend, r.graph) == key), key=x)
        axes.plot([x(r) for r in rows], [r.latency_ms["median"] for r in rows], marker="o",
                  label=f"{key[0]}: {key[1]}")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("sequence length (tokens)" if by_length else "batch")
    axes.set_ylabel("median latency (ms)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    write_bytes(path, buffer.getvalue())
