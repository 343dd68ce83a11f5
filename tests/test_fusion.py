"""Export and fusion of the zoo models: both exporters, fixed and dynamic length, every layer fused, parity kept."""
import numpy as np
import onnx
import pytest
import torch

from attn_export import api
from attn_export.backends import OnnxRuntimeRunner
from attn_export.errors import UserError
from attn_export.export import export_onnx
from attn_export.passes import fuse_graph
from conftest import small_config

# every graph fused here (the zoo under both exporters) also passes the plugins' own rules (conftest.py)
pytestmark = pytest.mark.usefixtures("plugins_accept_fused_graphs")


def _export(name, exporter, dynamic, causal=False):
    entry, config = small_config(name)
    if causal:
        config.causal = True
    torch.manual_seed(0)
    module = entry.build(config).eval()
    lengths = entry.parity_seq_lens(config)
    lengths = lengths if dynamic else lengths[:1]
    inputs = [entry.example_inputs(config, 2, n) for n in lengths]
    probe = [{k: list(v.shape) for k, v in x.items()} for x in inputs]
    model = export_onnx(module, inputs[0], dynamic_axes=entry.dynamic_axes if dynamic else None, exporter=exporter,
                        probe_shapes=probe * (2 if len(probe) == 1 else 1))
    return module, model, inputs


CASES = [(name, exporter, dynamic) for name in ("bigbird", "performer") for exporter in ("dynamo", "torchscript")
         for dynamic in (True, False)]


@pytest.mark.parametrize("name,exporter,dynamic", CASES)
def test_every_attention_layer_fuses_and_keeps_parity(name, exporter, dynamic):
    module, model, inputs = _export(name, exporter, dynamic)
    fused, report = fuse_graph(model)
    assert report.attention_layers == 2 and report.all_fused, report.as_dict()
    op = {"bigbird": "BlockSparseAttention", "performer": "KernelizedAttention"}[name]
    custom = [n for n in fused.graph.node if n.domain == "attn_export"]
    assert [n.op_type for n in custom] == [op, op]
    assert not fused.functions, "the file must carry custom nodes only"
    assert not any(n.op_type == "Softmax" for n in fused.graph.node) or name != "bigbird"
    for node in custom:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b"attn_export"
    runner = OnnxRuntimeRunner(fused, "fused")
    for x in inputs:
        expected = module(**x).detach().numpy()
        got = runner.run({k: v.numpy() for k, v in x.items()})
        np.testing.assert_allclose(list(got.values())[0], expected, atol=1e-4, rtol=1e-3)


def test_causal_performer_fuses_as_causal():
    module, model, inputs = _export("performer", "dynamo", True, causal=True)
    fused, report = fuse_graph(model)
    assert report.all_fused
    assert all(layer.attributes["causal"] == 1 for layer in report.layers)


def test_reference_graph_has_standard_ops_only_and_parity_at_two_lengths():
    for name in ("bigbird", "performer"):
        module, model, inputs = _export(name, "dynamo", True)
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
        assert len(inputs) >= 2
        runner = OnnxRuntimeRunner(model, "reference")
        for x in inputs:
            np.testing.assert_allclose(list(runner.run({k: v.numpy() for k, v in x.items()}).values())[0],
                                       module(**x).detach().numpy(), atol=1e-4, rtol=1e-3)


class LeakyAttention(torch.nn.Module):
    """Dense softmax attention whose probabilities are also returned: a fusion must not swallow them."""

    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-1, -2), -1)
        return p @ v, p


def test_attention_with_an_escaping_tensor_is_reported_not_fused():
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    model = export_onnx(LeakyAttention(), {"q": q, "k": k, "v": v})
    fused, report = fuse_graph(model)
    assert report.fused == 0 and report.attention_layers == 1
    assert report.layers[0].status == "not fused" and report.layers[0].reason


def test_fused_graph_that_disagrees_is_refused(monkeypatch, tmp_path):
    module, model, inputs = _export("performer", "dynamo", False)
    import dataclasses

    import attn_export.passes.fusion as fusion
    import attn_export.passes.kernelized_attention as lin

    def wrong_match(*args, **kwargs):
        m = lin.match(*args, **kwargs)
        m.attrs["causal"] = 1 - m.attrs["causal"]  # a wrong fusion slipping past verification
        return m

    monkeypatch.setattr(fusion, "FAMILY_PASSES", [dataclasses.replace(f, match=wrong_match) if f is lin.FAMILY else f
                                                  for f in fusion.FAMILY_PASSES])
    with pytest.raises(UserError, match="refusing to write the fused graph"):
        api.fuse(model, tmp_path / "fused.onnx")
    assert not (tmp_path / "fused.onnx").exists()


@pytest.mark.parametrize("name,layer,reason", [
    # causal FLASH: relu^2 weights masked by a Trilu and a chunked prefix sum; no pass covers it yet
    ("flash", "layers.0", "product of two data tensors"),
])
def test_layers_without_a_softmax_are_reported_never_skipped(name, layer, reason):
    _, model, _ = _export(name, "dynamo", True, causal=True)
    _, report = fuse_graph(model)
    row = next((r for r in report.layers if r.name == layer), None)
    assert row is not None and row.status == "not fused" and reason in row.reason, report.as_dict()
    assert not report.all_fused  # so --strict fails instead of passing over the layer


DENSE_FAMILY = [(name, exporter, dynamic) for name in ("hypercube", "vit", "treeformer", "mgk")
                for exporter, dynamic in (("dynamo", True), ("torchscript", True), ("dynamo", False))]


@pytest.mark.parametrize("name,exporter,dynamic", DENSE_FAMILY)
def test_more_zoo_models_fuse_every_layer_with_parity(name, exporter, dynamic):
    module, model, inputs = _export(name, exporter, dynamic)
    fused, report = api.fuse(model)  # refuses a fused graph that differs from the reference graph
    assert report.attention_layers == module.config.num_layers and report.all_fused, report.as_dict()
    runner = OnnxRuntimeRunner(fused, "fused")
    with torch.no_grad():
        for feeds in inputs:
            got = next(iter(runner.run({k: v.numpy() for k, v in feeds.items()}).values()))
            np.testing.assert_allclose(got, module(*feeds.values()).numpy(), atol=1e-4, rtol=1e-3)


def _op_bias_rows(fused, feeds) -> list[int]:
    """The query rows of each DenseAttention's bias input when the fused graph runs on `feeds`."""
    biases = [n.input[3] for n in fused.graph.node if n.op_type == "DenseAttention"]
    probe = onnx.ModelProto()
    probe.CopyFrom(fused)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(b) for b in biases)
    got = OnnxRuntimeRunner(probe, "fused").run(feeds)
    return [got[b].shape[-2] for b in biases]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("sigma_sq_scale_1,folds", [(1.0, True), (1 / 3, False)])
def test_mgk_bias_keeps_its_key_side_only_when_the_softmax_ignores_the_rest(exporter, sigma_sq_scale_1, folds):
    """MGK's logits -a_r |q_i|^2 + (log pi_r - a_r |k_jr|^2) + 2 a_r q_i.k_jr: with one a for both components the
    query-side term is the same for every key of a row, so the op's bias is the key-side part, one row
    ([B, H, 1, 2N]); with two, the term differs between the components' keys and the bias stays [B, H, N, 2N]."""
    entry, config = small_config("mgk")
    config.sigma_sq_scale_1 = sigma_sq_scale_1
    torch.manual_seed(0)
    module = entry.build(config).eval()
    inputs = [entry.example_inputs(config, 2, n) for n in entry.parity_seq_lens(config)]
    model = export_onnx(module, inputs[0], dynamic_axes=entry.dynamic_axes, exporter=exporter,
                        probe_shapes=[{k: list(v.shape) for k, v in x.items()} for x in inputs])
    fused, report = api.fuse(model)
    assert report.all_fused and report.attention_layers == config.num_layers, report.as_dict()
    with torch.no_grad():
        for x in inputs:
            feeds = {k: v.numpy() for k, v in x.items()}
            n = next(iter(feeds.values())).shape[1]
            assert _op_bias_rows(fused, feeds) == [1 if folds else n] * config.num_layers
            got = next(iter(OnnxRuntimeRunner(fused, "fused").run(feeds).values()))
            np.testing.assert_allclose(got, module(*x.values()).numpy(), atol=1e-4, rtol=1e-3)


def test_mgk_layer_after_a_switched_off_component_keeps_its_whole_bias():
    """pi = 0 makes log pi = -inf in the first layer's bias, so its output may be NaN before the model cleans it:
    the next layer's |q|^2 is not provably finite, and dropping it from the bias is refused (the layer still fuses)."""
    entry, config = small_config("mgk")
    torch.manual_seed(0)
    module = entry.build(config).eval()
    with torch.no_grad():
        for layer in module.layers:
            layer.attention.pi[0, 0] = 0.0
    inputs = entry.example_inputs(config, 2, 32)
    model = export_onnx(module, inputs, dynamic_axes=entry.dynamic_axes,
                        probe_shapes=[{k: list(v.shape) for k, v in inputs.items()}] * 2)
    fused, report = api.fuse(model)
    assert report.all_fused, report.as_dict()
    feeds = {k: v.numpy() for k, v in inputs.items()}
    assert _op_bias_rows(fused, feeds) == [1, 32]
    got = next(iter(OnnxRuntimeRunner(fused, "fused").run(feeds).values()))
    with torch.no_grad():
        np.testing.assert_allclose(got, module(*inputs.values()).numpy(), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("exporter,dynamic", [("dynamo", True), ("torchscript", True), ("dynamo", False)])
def test_switch_fuses_attention_and_its_mixture_of_experts(exporter, dynamic):
    module, model, inputs = _export("switch", exporter, dynamic)
    fused, report = api.fuse(model)
    assert report.all_fused and report.attention_layers == 3, report.as_dict()
    ops = sorted(n.op_type for n in fused.graph.node if n.domain == "attn_export")
    assert ops == ["DenseAttention", "DenseAttention", "MixtureOfExperts"]
    moe = next(layer for layer in report.layers if layer.op == "MixtureOfExperts")
    if dynamic:
        assert moe.attributes["capacity"] == 0 and moe.attributes["capacity_factor"] == module.config.capacity_factor
    runner = OnnxRuntimeRunner(fused, "fused")
    with torch.no_grad():
        for feeds in inputs:
            got = next(iter(runner.run({k: v.numpy() for k, v in feeds.items()}).values()))
            np.testing.assert_allclose(got, module(*feeds.values()).numpy(), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_spade_state_space_layer_fuses_into_long_convolution(exporter):
    module, model, inputs = _export("spade", exporter, True)
    fused, report = api.fuse(model)  # refuses a fused graph that differs from the reference graph
    s4 = next(layer for layer in report.layers if layer.name.endswith("s4"))
    assert s4.status == "fused" and s4.op == "LongConvolution", report.as_dict()
    assert s4.attributes["channels"] == module.config.hidden
    assert not [n for n in fused.graph.node if n.op_type == "Conv"]


def _expected_ops(name, config):
    layers = config.num_layers
    if name == "flash":  # local relu^2 per chunk + global linear part, in every layer
        return {"DenseAttention": layers, "KernelizedAttention": layers}
    if name == "spade":  # local attention per block in every layer, the state-space layer every s4_every layers
        return {"DenseAttention": layers, "LongConvolution": len(range(0, layers, config.s4_every))}
    if name == "deberta":  # c2p, p2c and the log buckets inside the op, not a materialised N x N bias
        return {"DisentangledAttention": layers}
    return {"DenseAttention": layers}


@pytest.mark.parametrize("exporter,dynamic", [("dynamo", True), ("torchscript", True), ("dynamo", False),
                                              ("torchscript", False)])
def test_deberta_fuses_into_disentangled_attention_with_parity(exporter, dynamic):
    module, model, inputs = _export("deberta", exporter, dynamic)
    fused, report = api.fuse(model)  # refuses a fused graph that differs from the reference graph
    config = module.config
    assert report.attention_layers == config.num_layers and report.all_fused, report.as_dict()
    ops = [n.op_type for n in fused.graph.node if n.domain == "attn_export"]
    assert {op: ops.count(op) for op in set(ops)} == _expected_ops("deberta", config)
    for layer in report.layers:  # the bucket layout read off the graph is the model's
        assert (layer.attributes["span"], layer.attributes["max_position"]) == (config.position_buckets,
                                                                                config.max_relative_positions)
    assert not {"GatherElements", "Softmax"} & {n.op_type for n in fused.graph.node}
    runner = OnnxRuntimeRunner(fused, "fused")
    with torch.no_grad():
        for feeds in inputs:
            got = next(iter(runner.run({k: v.numpy() for k, v in feeds.items()}).values()))
            np.testing.assert_allclose(got, module(*feeds.values()).numpy(), atol=1e-4, rtol=1e-3)


PER_CHUNK_CASES = [(name, exporter, dynamic) for name in ("evolving", "flash", "spade", "transformer-ls")
                   for exporter, dynamic in (("dynamo", True), ("torchscript", True), ("dynamo", False))]


@pytest.mark.parametrize("name,exporter,dynamic", PER_CHUNK_CASES)
def test_chunked_materialised_and_two_part_layers_fuse_with_parity(name, exporter, dynamic):
    module, model, inputs = _export(name, exporter, dynamic)
    fused, report = api.fuse(model)  # refuses a fused graph that differs from the reference graph
    assert report.all_fused, report.as_dict()
    ops = [n.op_type for n in fused.graph.node if n.domain == "attn_export"]
    assert {op: ops.count(op) for op in set(ops)} == _expected_ops(name, module.config)
    attention = [part.attributes for part in report.parts if part.op == "DenseAttention"]
    if name == "evolving":  # every map is read by the next layer's convolution, so it stays materialised
        assert all(a["logits_input"] == 1 for a in attention)
    # Evolving's maps are finite, Transformer-LS's landmarks unmasked: no row loses every key, so none is checked;
    # SPADE's and FLASH's local windows may lose every key at a padded edge
    unchecked = name in ("evolving", "transformer-ls")
    assert all((a.get("masked_rows") == "none") == unchecked for a in attention), attention
    if name == "flash":
        assert all(a["score_fn"] == "relu_squared" for a in attention)
        assert all(layer.attributes["feature_map"] == "identity" and layer.attributes["normalize"] == 0
                   for layer in report.parts if layer.op == "KernelizedAttention")
    assert not [n for n in fused.graph.node if name == "flash" and n.op_type == "Relu"]
    if name == "transformer-ls":  # the landmarks go in as the shared keys, read in place; the own keys are tiles
        producer = {o: n for n in fused.graph.node for o in n.output}

        def source(tensor):  # the first node before `tensor` that is not a Reshape
            while producer[tensor].op_type == "Reshape":
                tensor = producer[tensor].input[0]
            return producer[tensor].op_type
        for node in (n for n in fused.graph.node if n.op_type == "DenseAttention"):
            assert len(node.input) == 6
            assert [source(t) for t in node.input[1:3]] == ["Gather", "Gather"]
            assert not {"Gather", "Expand", "Tile", "Concat"} & {source(t) for t in node.input[4:]}
    # Transformer-LS keeps its dynamic projection: a softmax over the tokens that makes the landmarks, not attention
    softmaxes = [n for n in fused.graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == (module.config.num_layers if name == "transformer-ls" else 0)
    runner = OnnxRuntimeRunner(fused, "fused")
    with torch.no_grad():
        for feeds in inputs:
            got = next(iter(runner.run({k: v.numpy() for k, v in feeds.items()}).values()))
            np.testing.assert_allclose(got, module(*feeds.values()).numpy(), atol=1e-4, rtol=1e-3)
