"""Fusion: normalise how attention is spelled, run every registered family pass, and report per model layer what
was fused and, for everything attention-like left in the graph, why not."""
from __future__ import annotations

import numpy as np
import onnx

# the family modules register themselves on import
from . import (banded_block_sparse, block_sparse, dense_attention, disentangled_attention, kernelized_attention,
               long_convolution, mixture_of_experts, onnx_attention)
from .einsum import EinsumCheck, normalize_einsums
from .framework import FAMILY_PASSES, NotFused, replace_all
from .fusion_report import FusionReport, LayerResult, layer_name
from .graph import GraphIndex, remove_dead_nodes, topological_sort
from .long_convolution import LONG_TAPS
from .probe import Probe
from .softmax_core import NO_SCORE_PRODUCT, NO_VALUE_PRODUCT, find_core, softmax_nodes, value_product

del (banded_block_sparse, block_sparse, dense_attention, disentangled_attention, kernelized_attention, long_convolution,
     mixture_of_experts, onnx_attention)


def fuse_graph(model: onnx.ModelProto, probe: Probe | None = None) -> tuple[onnx.ModelProto, FusionReport]:
    """Returns a fused copy of `model` and the per-layer report. `model` itself is not changed. `probe`: one made
    of `model` already (the caller reads the reference outputs off it); it learns the tensors the passes add."""
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    topological_sort(fused.graph)
    probe = probe or fusion_probe(fused)
    normalize_einsums(fused, probe)  # Einsum-written attention reads as MatMul to every family
    index = GraphIndex(fused)
    matches, claimed, explained, final = [], set(), set(), set()
    results: dict[int, LayerResult] = {}  # per anchor, in the order first seen
    prefixes: set[str] = set()
    for family in FAMILY_PASSES:
        for candidate in family.candidates(index, probe):
            anchor = family.anchor(candidate)
            earlier = results.get(id(anchor))
            if (earlier and earlier.status == "fused") or id(anchor) in claimed or id(anchor) in final:
                continue  # fused by an earlier family, refused for good, or inside a layer fused already
            # a later family may still fuse what an earlier one could not; if none can, the first reason stands
            name = earlier.name if earlier else _scope(index, anchor)
            try:
                m = family.match(index, probe, candidate, _unique_prefix(name, prefixes))
                if any(id(n) in claimed for n in m.nodes):
                    raise NotFused("overlaps a layer fused already")
            except NotFused as e:
                results.setdefault(id(anchor), LayerResult(name, family.op.op_type, "not fused", str(e)))
                if e.final:
                    final.add(id(anchor))
                continue
            claimed.update(id(n) for n in m.nodes)
            explained.update(id(n) for n in m.kept)
            matches.append(m)
            attrs = m.contract.resolve_attrs(m.attrs)
            results[id(anchor)] = LayerResult(name, m.contract.op_type, "fused", "", attrs)
    # a candidate one family refused but whose nodes another family's region took is fused, not a part left over
    report = FusionReport([r for a, r in results.items() if r.status == "fused" or a not in claimed])
    _report_unclaimed_softmax(index, probe, claimed | set(results), report)
    _report_leftovers(index, probe, claimed | explained, report)
    replace_all(fused, matches, index.static, dtype_of=lambda t: _probed_dtype(probe, t))
    remove_dead_nodes(fused.graph)  # first: shape nodes that read the removed tensors go with them
    topological_sort(fused.graph)
    return fused, report


def fusion_probe(model: onnx.ModelProto) -> Probe:
    """The probe fuse_graph reads: it checks the Einsum rewrites on the values as it makes them."""
    return Probe(model, observers=[EinsumCheck(model)])


def _probed_dtype(probe: Probe, tensor: str):
    value = probe.runs[0].get(tensor) if probe.runs else None
    return None if value is None else np.asarray(value).dtype


def _report_unclaimed_softmax(index: GraphIndex, probe: Probe, seen: set[int], report: FusionReport) -> None:
    """Softmax attention no pass claimed is reported, so nothing falls back silently."""
    for softmax in softmax_nodes(index):
        if id(softmax) in seen:
            continue
        core = find_core(index, probe, softmax)
        if core in (NO_SCORE_PRODUCT, NO_VALUE_PRODUCT):
            continue  # a softmax that is not attention (a classifier head, a gate)
        reason = core if isinstance(core, str) else "dense softmax attention: no fusion pass for this family yet"
        report.parts.append(LayerResult(_scope(index, softmax), "", "not fused", reason))


def _report_leftovers(index: GraphIndex, probe: Probe, claimed: set[int], report: FusionReport) -> None:
    """The safety net for attention however it is spelled, and for mechanisms without a softmax (FLASH's relu^2,
    linear attention, MoE dispatch, S4): a product of two data tensors, a softmax written as exp / sum, or a
    convolution with a long kernel that no pass claimed is reported per layer, so `--strict` cannot pass over it."""
    reported = set()
    explained = set(claimed) | _softmax_products(index)  # already reported with their softmax
    for node in index.nodes:
        if id(node) in explained:
            continue
        if _is_data_product(index, probe, node):
            reason = "a product of two data tensors (attention-like) that no fusion pass matched"
        elif _is_exp_normalisation(index, node):
            reason = "a softmax written as exp / sum that no fusion pass matched"
        elif node.op_type == "Conv" and (probe.shape(node.input[1]) or (0,))[-1] >= LONG_TAPS:
            reason = f"a long convolution ({probe.shape(node.input[1])[-1]} taps) that no fusion pass matched"
        else:
            continue
        name = layer_name(node)
        if name not in reported:
            reported.add(name)
            report.parts.append(LayerResult(name, "", "not fused", reason))


def _is_data_product(index: GraphIndex, probe: Probe, node: onnx.NodeProto) -> bool:
    """MatMul, Einsum or Gemm of two data tensors, or a broadcast Mul of two that a ReduceSum contracts (an outer
    product summed over one axis is a matrix product spelled out)."""
    dynamic = index.dynamic_inputs(node)
    if node.op_type in ("MatMul", "Einsum"):
        return len(dynamic) >= 2
    if node.op_type == "Gemm":
        return node.input[1] in dynamic and node.input[0] in dynamic
    if node.op_type != "Mul" or len(dynamic) != 2 or dynamic[0] == dynamic[1]:
        return False
    sizes = [_size(probe, t) for t in (*dynamic, node.output[0])]
    if None in sizes or sizes[2] <= max(sizes[0], sizes[1]):
        return False  # an elementwise product (a gate, x * sigmoid(x)), not an outer product
    return any(c.op_type in ("ReduceSum", "ReduceMean") for c in index.consumers.get(node.output[0], []))


def _is_exp_normalisation(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """Exp(x) / ReduceSum(Exp(x)): softmax spelled out (a Div, or a Mul with the Reciprocal of the sum)."""
    if node.op_type != "Exp":
        return False
    exp = node.output[0]
    for consumer in index.consumers.get(exp, []):
        if consumer.op_type != "ReduceSum":
            continue
        total = consumer.output[0]
        for user in index.consumers.get(total, []):
            if user.op_type == "Div" and list(user.input) == [exp, total]:
                return True
            if user.op_type == "Reciprocal" and any(c.op_type == "Mul" and exp in c.input
                                                    for c in index.consumers.get(user.output[0], [])):
                return True
    return False


def _size(probe: Probe, tensor: str) -> int | None:
    shape = probe.shape(tensor)
    if shape is None:
        return None
    size = 1
    for d in shape:
        size *= d
    return size


def _softmax_products(index: GraphIndex, depth: int = 6) -> set[int]:
    """The products right around every softmax (its QK^T and its PV): part of the softmax's own report line."""
    found = set()
    for softmax in softmax_nodes(index):
        for step in (index.ancestors(softmax.input[0], stop=set())[:depth],
                     index.descendants(set(softmax.output))[:depth]):
            found.update(id(n) for n in step if n.op_type == "MatMul")
    return found


def _scope(index: GraphIndex, anchor: onnx.NodeProto) -> str:
    """The layer an anchor belongs to: that of its value product where it has one (a softmax or relu written as
    a module of its own, like FLASH-pytorch's ReLUSquared, sits one scope below its layer)."""
    product = value_product(index, anchor) if anchor.op_type in ("Softmax", "Relu") else None
    return layer_name(product if product is not None else anchor)


def _unique_prefix(name: str, taken: set[str]) -> str:
    """A name for the nodes a match inserts, unique in the graph even when one layer holds several parts."""
    prefix, i = name, 2
    while prefix in taken:
        prefix, i = f"{name}#{i}", i + 1
    taken.add(prefix)
    return prefix
