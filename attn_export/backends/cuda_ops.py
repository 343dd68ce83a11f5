"""The CUDA kernels of plugins_trt/ for torch tensors, with each op contract's reference as the fallback.

`run_op(op_type, *tensors, **attrs)` runs a custom op: through the torch extension over plugins_trt/kernels when
its floating inputs are CUDA tensors (the attributes passed by their contract names, checked and turned into kernel
params by the plugins' own C++ rules), through the contract's torch `reference` otherwise. The extension is built
on first use (torch.utils.cpp_extension, cached by torch); it needs a CUDA build of torch (>= 2.6), a GPU and
nvcc. `unavailable_reason()` says in one line why it cannot be had here, or None.
"""
from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import torch

from ..ops import OPS

PLUGINS_DIR = Path(__file__).resolve().parents[2] / "plugins_trt"
KERNELS_DIR = PLUGINS_DIR / "kernels"
PLUGIN_RULES_DIR = PLUGINS_DIR / "trt"  # the plugins' TensorRT-free fields, shape checks and kernel params
PLUGIN_RULES = ("fields.cpp", "block_sparse_attention.cpp", "dense_attention.cpp", "kernelized_attention.cpp",
                "disentangled_attention.cpp", "mixture_of_experts.cpp", "long_convolution.cpp")
EXTENSION_SOURCE = PLUGINS_DIR / "torch_ext" / "attn_export_ext.cpp"
EXTENSION_NAME = "attn_export_cuda_kernels"


class CudaKernelsUnavailable(RuntimeError):
    """The torch extension cannot be built or loaded here (the message says why, in one line)."""


def unavailable_reason() -> str | None:
    if not EXTENSION_SOURCE.is_file() or not KERNELS_DIR.is_dir():
        return f"the plugins_trt sources are not at {PLUGINS_DIR} (install attn-export from a checkout with -e)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build; install a CUDA build of torch (>= 2.6)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    if _nvcc() is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def available() -> bool:
    return unavailable_reason() is None


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


@functools.lru_cache(maxsize=None)
def load_extension(verbose: bool = False):
    """The compiled extension module (built once per source change; torch caches the build)."""
    reason = unavailable_reason()
    if reason:
        raise CudaKernelsUnavailable(f"attn_export CUDA kernels unavailable: {reason}")
    from torch.utils.cpp_extension import load

    sources = [str(EXTENSION_SOURCE)] + [str(PLUGIN_RULES_DIR / s) for s in PLUGIN_RULES]
    sources += sorted(str(p) for p in KERNELS_DIR.glob("*.cu"))
    return load(
        name=EXTENSION_NAME,
        sources=sources,
        extra_include_paths=[str(KERNELS_DIR), str(PLUGIN_RULES_DIR)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        verbose=verbose,
    )


def on_cuda(tensors) -> bool:
    floating = [t for t in tensors if t is not None and t.is_floating_point()]
    return bool(floating) and all(t.is_cuda for t in floating)


def run_op(op_type: str, *tensors, **attrs):
    """Run custom op `op_type` on torch tensors: the CUDA kernel for CUDA inputs, the contract's reference
    otherwise. Attributes are the contract's (defaults filled in); optional inputs may be omitted or None."""
    contract = OPS[op_type]
    resolved = contract.resolve_attrs(attrs)
    while tensors and tensors[-1] is None:
        tensors = tensors[:-1]
    if on_cuda(tensors):
        # by name, as the contract spells them: the extension parses them as the plugins parse the ONNX node's
        # fields (string options included) and takes shapes and params from the plugins' makeParams
        return load_extension().run_op(op_type, list(tensors), resolved)
    return contract.reference(*tensors, **resolved)
