"""LongConvolution: a per-channel convolution with a kernel as long as the sequence (kernel family K6).

SPADE's state-space layer at inference: the S4 kernel is precomputed, so the layer is
  y[t, c] = sum_{l=0..t} kernel[c, l] u[t - l, c]                        (causal part)
          + sum_{l=1..N-1-t} kernel_reverse[c, l - 1] u[t + l, c]        (strictly later tokens, when given)
          + skip[c] u[t, c].
The backward direction starts one step later, as in the official bidirectional S4 (so u[t] is not counted twice).
kernel and kernel_reverse hold L >= N taps; only the first N are read.
"""
from __future__ import annotations

import torch

from .contract import Attribute, OpContract, TensorSpec, shape_of_first_input
from .onnx_builder import OnnxBuilder

FLOATS = ("float32", "float16", "bfloat16")


def causal_convolution(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """[B, N, C] * [C, L] -> [B, N, C], direct depthwise convolution in float32."""
    n = u.shape[1]
    x = torch.nn.functional.pad(u.float().transpose(1, 2), (n - 1, 0))  # [B, C, 2N-1]
    weight = kernel[:, :n].float().flip(-1)[:, None]  # conv1d correlates, so the taps are reversed
    return torch.nn.functional.conv1d(x, weight, groups=u.shape[2]).transpose(1, 2)


def reference(u, kernel, skip, kernel_reverse=None, *, channels=0):
    y = causal_convolution(u, kernel) + u.float() * skip.float()
    if kernel_reverse is not None:
        later = causal_convolution(u.flip(1), kernel_reverse).flip(1)  # sum over l >= 0 of kr[l] u[t + l]
        y = y + torch.nn.functional.pad(later[:, 1:], (0, 0, 0, 1))  # shifted: kr[l - 1] u[t + l], l >= 1
    return y.to(u.dtype)


def decompose(b: OnnxBuilder, inputs: list[str], outputs: list[str], attrs: dict) -> None:
    if attrs["channels"] <= 0:
        raise ValueError("LongConvolution needs its channels attribute to build a grouped Conv")
    u, kernel, skip = inputs[:3]
    kernel_reverse = inputs[3] if len(inputs) > 3 and inputs[3] else ""
    x = b.op("Cast", u, to=1)
    n = b.dim(b.op("Shape", x), 1)
    c = attrs["channels"]
    y = b.op("Add", _causal(b, x, kernel, n, c), b.op("Mul", x, b.op("Cast", skip, to=1)))
    if kernel_reverse:
        later = _flip(b, _causal(b, _flip(b, x, 1), kernel_reverse, n, c), 1)
        shifted = b.op("Pad", b.op("Slice", later, b.const([1]), b.const([2 ** 62]), b.const([1])),
                       b.const([0, 0, 0, 0, 1, 0]))
        y = b.op("Add", y, shifted)
    b.op("CastLike", y, u, outputs=[outputs[0]])


def _flip(b: OnnxBuilder, x: str, axis: int) -> str:
    return b.op("Slice", x, b.const([-1]), b.const([-(2 ** 62)]), b.const([axis]), b.const([-1]))


def _causal(b: OnnxBuilder, x: str, kernel: str, n: str, channels: int) -> str:
    """Depthwise Conv over the left-padded sequence; the taps are reversed because Conv correlates."""
    taps = b.op("Slice", b.op("Cast", kernel, to=1), b.const([0]), n, b.const([1]))  # [C, N]
    weight = b.unsqueeze(_flip(b, taps, 1), [1])  # [C, 1, N]
    pads = b.op("Concat", b.const([0, 0]), b.op("Sub", n, b.const([1])), b.const([0, 0, 0]), axis=0)
    padded = b.op("Pad", b.op("Transpose", x, perm=[0, 2, 1]), pads)  # [B, C, 2N-1]
    return b.op("Transpose", b.op("Conv", padded, weight, group=channels), perm=[0, 2, 1])


CONTRACT = OpContract(
    op_type="LongConvolution",
    version=1,
    doc=__doc__,
    inputs=(
        TensorSpec("input", 3, FLOATS, "[B, N, C]"),
        TensorSpec("kernel", 2, FLOATS, "[C, L] causal taps, L >= N"),
        TensorSpec("skip", 1, FLOATS, "[C] the D term"),
        TensorSpec("kernel_reverse", 2, FLOATS, "[C, L] anti-causal taps (bidirectional layers)", optional=True),
    ),
    outputs=(TensorSpec("output", 3, FLOATS, "[B, N, C]"),),
    attributes=(
        Attribute("channels", "int", 0, "C, the input's last axis (ONNX Conv needs the group count as a constant)"),
    ),
    reference=reference,
    decompose=decompose,
    output_shapes=shape_of_first_input,
)
