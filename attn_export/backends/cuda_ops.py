"""The CUDA kernels of plugins_trt/ for torch tensors, with each op contract's reference as the fallback.

`run_op(op_type, *tensors, **attrs)` runs a custom op: through the torch extension over plugins_trt/kernels when
its floating inputs are CUDA tensors, through the contract's torch `reference` otherwise. The extension is built
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
from ..ops.dense_attention import MASKED_ROWS, SCORE_FNS
from ..ops.linear_attention import FEATURE_MAPS
from ..ops.mixture_of_experts import ACTIVATIONS

PLUGINS_DIR = Path(__file__).resolve().parents[2] / "plugins_trt"
KERNELS_DIR = PLUGINS_DIR / "kernels"
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

    sources = [str(EXTENSION_SOURCE)] + sorted(str(p) for p in KERNELS_DIR.glob("*.cu"))
    return load(
        name=EXTENSION_NAME,
        sources=sources,
        extra_include_paths=[str(KERNELS_DIR)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        verbose=verbose,
    )


def _code(options: tuple[str, ...], value: str, attribute: str) -> int:
    """A string attribute as the enum code the kernels take (its index in the contract's option list)."""
    if value not in options:
        raise ValueError(f"{attribute} must be one of {', '.join(options)}, not {value!r}")
    return options.index(value)


def _optional(tensors: tuple, index: int):
    return tensors[index] if len(tensors) > index else None


def _block_sparse(ext, t, a):
    return ext.block_sparse_attention(t[0], t[1], t[2], t[3], _optional(t, 4), a["num_heads"], a["block_size"],
                                      a["scale"], a["global_blocks"], a["count_repeats"])


def _dense(ext, t, a):
    return ext.dense_attention(t[0], t[1], t[2], _optional(t, 3), a["num_heads"], a["scale"], a["causal"],
                               _code(SCORE_FNS, a["score_fn"], "score_fn"), a["logits_input"],
                               _code(MASKED_ROWS, a["masked_rows"], "masked_rows"))


def _kernelized(ext, t, a):
    return ext.kernelized_attention(t[0], t[1], t[2], _optional(t, 3), a["num_heads"],
                                    _code(FEATURE_MAPS, a["feature_map"], "feature_map"), a["causal"],
                                    a["normalize"], a["scale"], a["eps"])


def _disentangled(ext, t, a):
    return ext.disentangled_attention(t[0], t[1], t[2], t[3], t[4], _optional(t, 5), a["num_heads"], a["span"],
                                      a["max_position"], a["scale"], a["c2p"], a["p2c"],
                                      _code(MASKED_ROWS, a["masked_rows"], "masked_rows"))


def _moe(ext, t, a):
    return ext.mixture_of_experts(t[0], t[1], t[2], t[3], a["capacity"], a["capacity_factor"],
                                  _code(ACTIVATIONS, a["activation"], "activation"))


def _long_conv(ext, t, a):
    return ext.long_convolution(t[0], t[1], t[2], _optional(t, 3), a["channels"])


KERNELS = {
    "BlockSparseAttention": _block_sparse,
    "DenseAttention": _dense,
    "KernelizedAttention": _kernelized,
    "DisentangledAttention": _disentangled,
    "MixtureOfExperts": _moe,
    "LongConvolution": _long_conv,
}


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
        return KERNELS[op_type](load_extension(), tensors, resolved)
    return contract.reference(*tensors, **resolved)
