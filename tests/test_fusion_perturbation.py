"""Wrong fusions never ship: perturb the attention subgraph of an exported zoo model (a scale constant, the
softmax axis, the block table, a random-feature entry, an extra reader of an inner tensor, q and k swapped) and
fuse. Fusion may refuse, or leave that layer unfused, but whatever it writes must compute what the perturbed
reference graph computes, also at a sequence length and on inputs fusion never saw."""
from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import helper, numpy_helper

from attn_export import api
from attn_export.backends import OnnxRuntimeRunner
from attn_export.check import compare_outputs
from attn_export.errors import UserError
from attn_export.export import export_onnx
from attn_export.passes.graph import GraphIndex
from attn_export.passes.probe import probe_shapes, random_inputs
from conftest import small_config

LAYERS = 2  # the small configs have two attention layers: perturb one, the other must stay as it was
PERTURBED = settings(max_examples=8, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.lru_cache(maxsize=None)
def exported(name: str) -> bytes:
    """The small zoo model as a reference graph (TorchScript exporter: fast, and dynamic in batch and length)."""
    entry, config = small_config(name)
    torch.manual_seed(0)
    module = entry.build(config).eval()
    inputs = [entry.example_inputs(config, 2, n) for n in entry.parity_seq_lens(config)]
    probe = [{k: list(v.shape) for k, v in x.items()} for x in inputs]
    model = export_onnx(module, inputs[0], dynamic_axes=entry.dynamic_axes, probe_shapes=probe, exporter="torchscript")
    return model.SerializeToString()


def fresh(name: str) -> onnx.ModelProto:
    return onnx.load_from_string(exported(name))


@functools.lru_cache(maxsize=None)
def unprobed_length(name: str) -> int:
    """A sequence length the model takes but fusion never probes (the probes are the parity lengths)."""
    entry, config = small_config(name)
    for n in (37, 160, 224, 256, 320, 96):
        try:
            entry.check_seq_len(config, n)
        except UserError:
            continue
        if n not in entry.parity_seq_lens(config):
            return n
    raise AssertionError(f"no unprobed length for {name}")


# ---------------------------------------------------------------------------------------------- the subgraph

def attention_nodes(model: onnx.ModelProto, layer: int, inner_only: bool = True) -> list[onnx.NodeProto]:
    """The nodes of one attention module (TorchScript names them /layers.<i>/attention/...); inner_only drops
    the q/k/v/out projections, which are not part of the fused op."""
    prefix = f"/layers.{layer}/attention/"
    nodes = [n for n in model.graph.node if n.name.startswith(prefix)]
    return [n for n in nodes if "/" not in n.name[len(prefix):]] if inner_only else nodes


def constant_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def rewire(model: onnx.ModelProto, node: onnx.NodeProto, slot: int, value: np.ndarray, tag: str) -> None:
    """Feed `node`'s input `slot` from a new initializer holding `value` (other readers keep the old tensor)."""
    name = f"perturbed/{tag}/{len(model.graph.initializer)}"
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
    node.input[slot] = name


def constant_inputs(model, nodes, accept) -> list[tuple[onnx.NodeProto, int, np.ndarray]]:
    """(node, input slot, value) for every constant input of `nodes` that `accept(node, value)` takes."""
    found = []
    for node in nodes:
        for slot, name in enumerate(node.input):
            value = constant_value(model, name) if name else None
            if value is not None and accept(node, value):
                found.append((node, slot, value))
    return found


def inputs_of_gathers(model, nodes) -> set[str]:
    """Constant-derived tensors feeding the block gathers: everything upstream of a Gather's indices."""
    index = GraphIndex(model)
    upstream = set()
    for gather in (n for n in nodes if n.op_type == "Gather" and not index.is_static(n.input[0])):
        upstream.update(o for n in index.ancestors(gather.input[1], set()) for o in n.output)
        upstream.add(gather.input[1])
    return upstream


# ---------------------------------------------------------------------------------------------- perturbations
# Each takes (model, layer, draw) and changes the model in place; draw(strategy) picks the details.

def change_scale(model, layer, draw):
    scalings = constant_inputs(model, attention_nodes(model, layer),
                               lambda n, v: n.op_type in ("Mul", "Div") and v.size == 1 and v.dtype.kind == "f")
    node, slot, value = draw(st.sampled_from(scalings))
    factor = draw(st.sampled_from([0.5, 1.01, 2.0, -1.0, 0.0]))
    rewire(model, node, slot, value * np.asarray(factor, value.dtype), "scale")


def change_softmax_axis(model, layer, draw):
    softmaxes = [n for n in attention_nodes(model, layer) if n.op_type == "Softmax"]
    node = draw(st.sampled_from(softmaxes))
    axis = next(a for a in node.attribute if a.name == "axis")
    axis.i = draw(st.sampled_from([-2, -3, 0, 1, 2]))


def change_block_table(model, layer, draw):
    nodes = attention_nodes(model, layer)
    feeding = inputs_of_gathers(model, nodes)
    index = GraphIndex(model)
    table_inputs = constant_inputs(
        model, [n for n in nodes if any(o in feeding for o in n.output)],
        lambda n, v: v.dtype.kind in "iuf" and v.size >= 1 and not any(i and not index.is_static(i) for i in n.input))
    node, slot, value = draw(st.sampled_from(table_inputs))
    flat = value.reshape(-1).copy()
    at = draw(st.integers(0, flat.size - 1))
    if flat.dtype.kind == "f":  # the random-block priorities: reorder which blocks win
        flat[at] = draw(st.sampled_from([-1.0, 0.0, 2.0]))
    else:
        flat[at] += draw(st.sampled_from([-1, 1, 2]))
    rewire(model, node, slot, flat.reshape(value.shape), "table")


def change_feature_entry(model, layer, draw):
    products = constant_inputs(model, attention_nodes(model, layer),
                               lambda n, v: n.op_type == "MatMul" and v.ndim == 2)
    one_side = draw(st.booleans())
    targets = [draw(st.sampled_from(products))] if one_side else products
    value = targets[0][2].copy()
    i, j = draw(st.integers(0, value.shape[0] - 1)), draw(st.integers(0, value.shape[1] - 1))
    value[i, j] += draw(st.sampled_from([-1.0, 0.5, 3.0]))
    for node, slot, _ in targets:
        rewire(model, node, slot, value, "features")


def read_inner_tensor(model, layer, draw):
    """An extra reader of a tensor inside the attention: a new graph output, or a term added to the output."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    index = GraphIndex(model)
    inner = [o for n in attention_nodes(model, layer) for o in n.output
             if o and not index.is_static(o) and types.get(o) == onnx.TensorProto.FLOAT]
    tensor = draw(st.sampled_from(inner))
    tag = f"escape/{len(model.graph.node)}"
    if draw(st.booleans()):
        model.graph.node.append(helper.make_node("Identity", [tensor], [tag], name=tag))
        model.graph.output.append(helper.make_tensor_value_info(tag, onnx.TensorProto.FLOAT, None))
    else:  # output + 1e-3 * mean(inner): the same outputs, now depending on the inner tensor
        out = model.graph.output[0]
        moved = f"{tag}/original"
        for node in model.graph.node:
            node.output[:] = [moved if o == out.name else o for o in node.output]
        model.graph.initializer.append(numpy_helper.from_array(np.float32(1e-3), f"{tag}/weight"))
        model.graph.node.extend([
            helper.make_node("ReduceMean", [tensor], [f"{tag}/mean"], keepdims=0, name=f"{tag}/mean"),
            helper.make_node("Mul", [f"{tag}/mean", f"{tag}/weight"], [f"{tag}/term"], name=f"{tag}/term"),
            helper.make_node("Add", [moved, f"{tag}/term"], [out.name], name=f"{tag}/add")])


def swap_query_and_key(model, layer, draw):
    projections = {n.name: n.output[0] for n in attention_nodes(model, layer, inner_only=False)}
    q, k = (projections[f"/layers.{layer}/attention/{p}/Add"] for p in ("query", "key"))
    for node in attention_nodes(model, layer):
        node.input[:] = [{q: k, k: q}.get(i, i) for i in node.input]


PERTURBATIONS = {
    "bigbird": [change_scale, change_softmax_axis, change_block_table, read_inner_tensor, swap_query_and_key],
    "performer": [change_scale, change_feature_entry, read_inner_tensor, swap_query_and_key],
}


# ---------------------------------------------------------------------------------------------- the property

def fuse_or_refuse(name: str, model: onnx.ModelProto) -> tuple[str, onnx.ModelProto | None, object]:
    """('refused', None, why) or ('written', fused, report), after checking the fused graph against `model`
    on fresh random inputs at the probe shapes and at one more sequence length."""
    try:
        fused, report = api.fuse(model)
    except UserError as e:
        return "refused", None, str(e)
    shapes = probe_shapes(model)
    extra = {k: [1, unprobed_length(name), *s[2:]] for k, s in shapes[0].items()}
    reference = OnnxRuntimeRunner(model, "perturbed reference")
    candidate = OnnxRuntimeRunner(fused, "fused")
    compared = 0
    for i, shape_set in enumerate(shapes + [extra]):
        feeds = random_inputs(model, shape_set, seed=1000 + i)
        try:
            expected = reference.run(feeds)
        except UserError:
            continue  # the perturbed graph itself cannot run at this shape: nothing to agree with
        for c in compare_outputs(expected, candidate.run(feeds)):
            assert c.passed, f"wrong fusion shipped: output {c.name} at {shape_set}: {c.reason}"
        compared += 1
    assert compared, "the perturbed reference ran at no shape at all"
    return "written", fused, report


def custom_nodes(fused: onnx.ModelProto, op_type: str | None = None) -> int:
    return sum(n.domain == "attn_export" and op_type in (None, n.op_type) for n in fused.graph.node)


def layer_row(report, layer: int):
    return next(row for row in report.layers if row.name == f"layers.{layer}.attention")


@pytest.mark.parametrize("name", ["bigbird", "performer"])
def test_unperturbed_models_fuse_every_layer(name):
    assert small_config(name)[1].num_layers == LAYERS
    outcome, fused, report = fuse_or_refuse(name, fresh(name))
    assert outcome == "written" and report.all_fused and custom_nodes(fused) == LAYERS


@pytest.mark.parametrize("name", ["bigbird", "performer"])
@settings(PERTURBED)
@given(data=st.data())
def test_perturbed_attention_is_never_fused_wrongly(name, data):
    perturb = data.draw(st.sampled_from(PERTURBATIONS[name]), label="perturbation")
    layer = data.draw(st.integers(0, LAYERS - 1), label="layer")
    model = fresh(name)
    perturb(model, layer, data.draw)
    fuse_or_refuse(name, model)


# Fixed cases with a known right answer, so that the property above cannot pass by refusing everything.

def test_scaled_scores_fuse_with_the_new_scale():
    model = fresh("bigbird")
    scalings = constant_inputs(model, attention_nodes(model, 0),
                               lambda n, v: n.op_type == "Mul" and v.size == 1 and v.dtype.kind == "f")
    assert len(scalings) == 2  # the sparse rows' scores and the global rows' scores
    for node, slot, value in scalings:
        rewire(model, node, slot, value * np.asarray(2, value.dtype), "scale")
    outcome, fused, report = fuse_or_refuse("bigbird", model)
    assert outcome == "written" and report.all_fused
    scales = sorted(layer.attributes["scale"] for layer in report.layers)
    assert np.isclose(scales[1], 2 * scales[0])


def test_softmax_over_another_axis_is_not_fused():
    model = fresh("bigbird")
    sparse = [n for n in attention_nodes(model, 1) if n.op_type == "Softmax"][0]
    next(a for a in sparse.attribute if a.name == "axis").i = -2
    outcome, fused, report = fuse_or_refuse("bigbird", model)
    # the other layer is still one BlockSparseAttention; of this one at most a verified part (its global rows)
    assert outcome == "written" and custom_nodes(fused, "BlockSparseAttention") == 1
    assert layer_row(report, 0).status == "fused" and layer_row(report, 1).status == "not fused"
    assert "not over the last (key) axis" in layer_row(report, 1).reason


def test_features_changed_on_one_side_only_are_not_fused():
    model = fresh("performer")
    products = constant_inputs(model, attention_nodes(model, 0), lambda n, v: n.op_type == "MatMul" and v.ndim == 2)
    node, slot, value = products[1]
    changed = value.copy()
    changed[0, 0] += 1.0
    rewire(model, node, slot, changed, "features")
    outcome, fused, report = fuse_or_refuse("performer", model)
    assert outcome == "written" and custom_nodes(fused) == 1


def test_features_changed_on_both_sides_fuse_with_the_new_features():
    model = fresh("performer")
    products = constant_inputs(model, attention_nodes(model, 0), lambda n, v: n.op_type == "MatMul" and v.ndim == 2)
    changed = products[0][2].copy()
    changed[0, 0] += 1.0
    for node, slot, _ in products:
        rewire(model, node, slot, changed, "features")
    outcome, fused, report = fuse_or_refuse("performer", model)
    assert outcome == "written" and custom_nodes(fused) == LAYERS


@pytest.mark.parametrize("name", ["bigbird", "performer"])
def test_an_inner_tensor_read_outside_keeps_that_layer_unfused(name):
    model = fresh(name)
    product = next(n for n in attention_nodes(model, 0) if n.op_type == "MatMul")
    model.graph.node.append(helper.make_node("Identity", [product.output[0]], ["leak"], name="leak"))
    model.graph.output.append(helper.make_tensor_value_info("leak", onnx.TensorProto.FLOAT, None))
    outcome, fused, report = fuse_or_refuse(name, model)
    op = {"bigbird": "BlockSparseAttention", "performer": "KernelizedAttention"}[name]
    assert outcome == "written" and custom_nodes(fused, op) == 1
    assert layer_row(report, 0).status == "not fused" and layer_row(report, 1).status == "fused"
    assert any(w in layer_row(report, 0).reason for w in ("used outside", "graph output")), report.as_dict()


@pytest.mark.parametrize("name", ["bigbird", "performer"])
def test_swapped_query_and_key_fuse_with_the_roles_swapped(name):
    model = fresh(name)
    swap_query_and_key(model, 0, None)
    outcome, fused, report = fuse_or_refuse(name, model)
    assert outcome == "written" and custom_nodes(fused) == LAYERS
