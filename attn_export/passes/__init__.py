"""Fusion: run every family pass over a graph and report, per attention layer, fused or not fused and why."""
from __future__ import annotations

import ast
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import (block_sparse, dense_attention, kernelized_attention, long_convolution, mixture_of_experts,
               onnx_attention)
from .framework import LayerResult, NotFused, replace_all
from .graph import GraphIndex, remove_dead_nodes, topological_sort
from .probe import Probe
from .softmax_core import NO_SCORE_PRODUCT, NO_VALUE_PRODUCT, find_core, softmax_nodes

# (family name, module with candidates(index, probe) and match(index, probe, candidate, name))
# dense last: it takes the softmax attention no more specific family claimed
FAMILY_PASSES = (("block_sparse", block_sparse), ("kernelized_attention", kernelized_attention),
                 ("mixture_of_experts", mixture_of_experts), ("long_convolution", long_convolution),
                 ("onnx_attention", onnx_attention),
                 ("dense_attention", dense_attention))


@dataclass
class FusionReport:
    layers: list[LayerResult] = field(default_factory=list)

    @property
    def attention_layers(self) -> int:
        return len(self.layers)

    @property
    def fused(self) -> int:
        return sum(layer.status == "fused" for layer in self.layers)

    @property
    def all_fused(self) -> bool:
        return self.fused == self.attention_layers

    def as_dict(self):
        return {"attention_layers": self.attention_layers, "fused": self.fused,
                "layers": [layer.as_dict() for layer in self.layers]}


def layer_name(node: onnx.NodeProto) -> str:
    """The module path the exporter recorded for a node (dynamo metadata or TorchScript's /a/b/Op name)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in ast.literal_eval(prop.value) if s]
            if len(scopes) > 1:
                return scopes[-2]  # the module; the last scope is the op itself
    if node.name.startswith("/") and node.name.count("/") > 1:
        return node.name.rsplit("/", 1)[0].strip("/").replace("/", ".")
    return node.name or node.op_type


def fuse_graph(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FusionReport]:
    """Returns a fused copy of `model` and the per-layer report. `model` itself is not changed."""
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    topological_sort(fused.graph)
    index = GraphIndex(fused)
    probe = Probe(fused)
    matches, claimed, explained, final = [], set(), set(), set()
    results: dict[int, LayerResult] = {}  # per anchor, in the order first seen
    for _family, module in FAMILY_PASSES:
        for candidate in module.candidates(index, probe):
            anchor = _anchor(candidate)
            earlier = results.get(id(anchor))
            if (earlier and earlier.status == "fused") or id(anchor) in claimed or id(anchor) in final:
                continue  # fused by an earlier family, refused for good, or inside a layer fused already
            # a later family may still fuse what an earlier one could not; if none can, the first reason stands
            name = earlier.name if earlier else _unique(layer_name(anchor), results.values())
            try:
                m = module.match(index, probe, candidate, name)
                if any(id(n) in claimed for n in m.nodes):
                    raise NotFused("overlaps a layer fused already")
            except NotFused as e:
                results.setdefault(id(anchor), LayerResult(name, module.OP.op_type, "not fused", str(e)))
                if e.final:
                    final.add(id(anchor))
                continue
            claimed.update(id(n) for n in m.nodes)
            explained.update(id(n) for n in m.kept)
            matches.append(m)
            attrs = m.contract.resolve_attrs(m.attrs)
            results[id(anchor)] = LayerResult(name, m.contract.op_type, "fused", "", attrs)
    report, anchors = FusionReport(list(results.values())), set(results)
    # softmax attention no pass claimed: report it so nothing falls back silently
    for softmax in softmax_nodes(index):
        if id(softmax) in claimed or id(softmax) in anchors:
            continue
        core = find_core(index, probe, softmax)
        reason = core if isinstance(core, str) else "dense softmax attention: no fusion pass for this family yet"
        if core in (NO_SCORE_PRODUCT, NO_VALUE_PRODUCT):
            continue  # a softmax that is not attention (a classifier head, a gate)
        report.layers.append(LayerResult(_unique(layer_name(softmax), report.layers), "", "not fused", reason))
    _report_leftovers(index, probe, claimed | explained, report)
    replace_all(fused, matches, index.static, dtype_of=lambda t: _probed_dtype(probe, t))
    remove_dead_nodes(fused.graph)  # first: shape nodes that read the removed tensors go with them
    topological_sort(fused.graph)
    return fused, report


def _probed_dtype(probe: Probe, tensor: str):
    value = probe.runs[0].get(tensor) if probe.runs else None
    return None if value is None else np.asarray(value).dtype


def _report_leftovers(index: GraphIndex, probe: Probe, claimed: set[int], report: FusionReport) -> None:
    """The safety net for mechanisms without a softmax (FLASH's relu^2, linear attention, MoE dispatch, S4): a
    product of two data tensors, or a convolution with a long kernel, that no pass claimed is reported per layer (a
    second row when the layer has a fused part too), so `--strict` cannot pass over it."""
    reported = set()
    explained = set(claimed) | _softmax_products(index)  # already reported with their softmax
    for node in index.nodes:
        if id(node) in explained:
            continue
        if node.op_type == "MatMul" and len(index.dynamic_inputs(node)) == 2:
            reason = "a product of two data tensors (attention-like) that no fusion pass matched"
        elif node.op_type == "Conv" and (probe.shape(node.input[1]) or (0,))[-1] >= long_convolution.LONG_TAPS:
            reason = f"a long convolution ({probe.shape(node.input[1])[-1]} taps) that no fusion pass matched"
        else:
            continue
        name = layer_name(node)
        if name not in reported:
            reported.add(name)
            report.layers.append(LayerResult(_unique(name, report.layers), "", "not fused", reason))


def _softmax_products(index: GraphIndex, depth: int = 6) -> set[int]:
    """The products right around every softmax (its QK^T and its PV): part of the softmax's own report line."""
    found = set()
    for softmax in softmax_nodes(index):
        for step in (index.ancestors(softmax.input[0], stop=set())[:depth],
                     index.descendants(set(softmax.output))[:depth]):
            found.update(id(n) for n in step if n.op_type == "MatMul")
    return found


def _anchor(candidate) -> onnx.NodeProto:
    """The node a candidate is anchored on: its softmax, or the first feature product of a linear layer."""
    if isinstance(candidate, onnx.NodeProto):
        return candidate
    return candidate.softmax if hasattr(candidate, "softmax") else candidate[0]


def _unique(name: str, layers) -> str:
    taken = {layer.name for layer in layers}
    if name not in taken:
        return name
    i = 2
    while f"{name}#{i}" in taken:
        i += 1
    return f"{name}#{i}"


__all__ = ["fuse_graph", "FusionReport", "LayerResult", "FAMILY_PASSES", "NotFused"]
