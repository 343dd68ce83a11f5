"""Fuse a depthwise convolution over the sequence with a long constant kernel (SPADE's S4 layer at inference) into
LongConvolution.

Anchor: a Conv with one input channel per group (depthwise), a constant [C, 1, K] weight of at least
LONG_TAPS taps, stride and dilation 1, and padding that keeps the length (left + right = K - 1).
Conv correlates: out[t] = sum_j w[j] u[t + j - left], so tap j reads the token at offset left - j; offsets >= 0 form
the op's causal kernel, offsets < 0 its backward kernel (which starts one step later). The tokens enter as
[B, N, C] through a transpose; the output is the first [B, N, C] tensor after the convolution.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper

from ..ops import LONG_CONVOLUTION
from .framework import (FamilyPass, Match, NotFused, closed_region, constant, find_output, register,
                        verify_numerically, walk_to_boundary)
from .graph import GraphIndex
from .probe import Probe

OP = LONG_CONVOLUTION
LONG_TAPS = 64


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def candidates(index: GraphIndex, probe: Probe):
    for node in index.nodes:
        if node.op_type != "Conv" or not index.is_static(node.input[1]):
            continue
        weight = probe.runs[0].get(node.input[1])
        if weight is not None and weight.ndim == 3 and weight.shape[-1] >= LONG_TAPS:
            yield node


def split_taps(weight: np.ndarray, left: int) -> tuple[np.ndarray, np.ndarray | None]:
    """[C, 1, K] correlation taps -> (causal kernel [C, L], backward kernel [C, L] or None)."""
    taps = weight[:, 0, :]
    causal = taps[:, :left + 1][:, ::-1]  # offset l = left - j for j = left .. 0
    backward = taps[:, left + 1:]  # offset -(j - left) for j = left + 1 .. K - 1, from one step later
    length = max(causal.shape[1], backward.shape[1])
    causal = np.pad(causal, [(0, 0), (0, length - causal.shape[1])])
    if backward.shape[1] == 0:
        return causal, None
    return causal, np.pad(backward, [(0, 0), (0, length - backward.shape[1])])


def _skip_term(probe: Probe, u: str, output: str, kernels: list[np.ndarray]) -> np.ndarray:
    """The per-channel D of y = K * u + D u when the layer adds it inside the matched region (least squares on the
    first probe; the verification then checks it at every probe). Zero when the region has no such term."""
    x, y = probe.runs[0][u], probe.runs[0][output]
    args = [torch.from_numpy(np.array(t)) for t in (x, kernels[0], np.zeros(x.shape[2], x.dtype), *kernels[1:])]
    residual = y - OP.reference(*args).numpy()
    denominator = (x * x).sum((0, 1))
    return np.where(denominator > 0, (residual * x).sum((0, 1)) / np.maximum(denominator, 1e-30), 0).astype(x.dtype)


def match(index: GraphIndex, probe: Probe, conv: onnx.NodeProto, name: str) -> Match:
    attrs = _attrs(conv)
    weight = probe.runs[0][conv.input[1]]
    channels, taps = weight.shape[0], weight.shape[2]
    pads = list(attrs.get("pads", [0, 0]))
    if attrs.get("group", 1) != channels or weight.shape[1] != 1:
        raise NotFused("the convolution is not depthwise (one input channel per group)")
    if any(s != 1 for s in attrs.get("strides", [1])) or any(d != 1 for d in attrs.get("dilations", [1])):
        raise NotFused("the convolution has a stride or dilation")
    if len(conv.input) > 2 and conv.input[2]:
        raise NotFused("the convolution has a bias")
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or len(pads) != 2 or sum(pads) != taps - 1:
        raise NotFused(f"padding {pads} does not keep the sequence length")
    u, _, _ = walk_to_boundary(index, probe, conv.input[0])
    shape = probe.shape(u)
    if shape is None or len(shape) != 3 or shape[2] != channels:
        raise NotFused(f"the tokens {shape} are not [B, N, {channels}]")
    output = find_output(index, probe, [conv.output[0]], like=u)
    if output is None:
        raise NotFused("no [B, N, C] output after the convolution")
    nodes = closed_region(index, [u], output, what="convolution")

    kernel, backward = split_taps(weight, pads[0])
    n_max = max(probe.runs[run][u].shape[1] for run in range(len(probe.runs)))
    if kernel.shape[1] < n_max:
        kernel = np.pad(kernel, [(0, 0), (0, n_max - kernel.shape[1])])
        backward = None if backward is None else np.pad(backward, [(0, 0), (0, n_max - backward.shape[1])])
    dtype = weight.dtype
    kernels = [kernel.astype(dtype)] + ([backward.astype(dtype)] if backward is not None else [])
    values = [kernels[0], _skip_term(probe, u, output, kernels), *kernels[1:]]
    names = [f"{name}/{part}" for part in ("kernel", "skip", "kernel_reverse")][:len(values)]
    op_attrs = {"channels": channels}
    why = verify_numerically(OP, probe, [u] + [lambda run, v=v: v for v in values], output, op_attrs)
    if why:
        raise NotFused(f"the op's reference does not reproduce the graph: {why}")
    return Match(OP, name, [u] + names, output, op_attrs, nodes, [constant(n, v) for n, v in zip(names, values)])


FAMILY = register(FamilyPass("long_convolution", 40, OP, candidates, match))
