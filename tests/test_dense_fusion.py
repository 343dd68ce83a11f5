"""Standard softmax attention written in other ways fuses into DenseAttention with parity; near misses are reported
with their reason, never fused wrongly."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attn_export import api
from attn_export.backends import OnnxRuntimeRunner
from attn_export.export import export_onnx
from attn_export.passes import fuse_graph

HEADS, WIDTH, N, MEMORY = 2, 16, 12, 4


class Attention(nn.Module):
    """One attention layer written in a given style, between two projections."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.qkv, self.out = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.bias = nn.Parameter(torch.randn(1, HEADS, 64, 64))
        # memory slots every query also attends to (learned, shifted by the sequence's mean key and value), with
        # their own bias
        self.memory_k, self.memory_v = (nn.Parameter(torch.randn(1, HEADS, MEMORY, WIDTH // HEADS)) for _ in "kv")
        self.memory_bias = nn.Parameter(torch.randn(1, HEADS, 1, MEMORY))

    def forward(self, x, mask):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, HEADS, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        d = q.shape[-1]
        if self.style == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        elif self.style == "sdpa_causal":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.style == "sdpa_bool_mask":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :] > 0)
        elif self.style == "matmul_div":
            o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
        elif self.style == "additive_bias":
            o = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5 + self.bias[:, :, :n, :n], -1) @ v
        elif self.style == "masked_fill":
            scores = (q @ k.transpose(-1, -2)) * d ** -0.5
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            o = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v
        elif self.style == "padding_mask":  # an additive mask computed from a model input
            o = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5 + (1.0 - mask[:, None, None, :]) * -1e9, -1) @ v
        elif self.style in ("memory_keys", "memory_keys_biased"):  # one softmax over two score blocks, joined
            memory_k, memory_v = self.memory_k + k.mean(2, keepdim=True), self.memory_v + v.mean(2, keepdim=True)
            memory = q @ memory_k.transpose(-1, -2) * d ** -0.5
            if self.style == "memory_keys_biased":
                memory = memory + self.memory_bias
            own = (q @ k.transpose(-1, -2) * d ** -0.5).masked_fill(mask[:, None, None, :] == 0, float("-inf"))
            p = torch.softmax(torch.cat([memory, own], -1), -1)
            o = p[..., :MEMORY] @ memory_v + p[..., MEMORY:] @ v
        elif self.style == "wrong_axis":
            o = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, dim=-2) @ v
        elif self.style == "leaked_probs":  # an inner tensor (the attention weights) read after the layer
            probs = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, -1)
            o = probs @ v
            return self.out(o.transpose(1, 2).reshape(b, n, -1)) + probs.mean()
        elif self.style == "materialised_scores":  # the logits read after the layer: fused as logits (K1-m)
            scores = q @ k.transpose(-1, -2) * d ** -0.5
            o = torch.softmax(scores, -1) @ v
            return self.out(o.transpose(1, 2).reshape(b, n, -1)) + scores.mean()
        elif self.style == "materialised_padded":  # the same, padded keys filled with -1e9 (-inf in half precision)
            scores = q @ k.transpose(-1, -2) * d ** -0.5 + (1.0 - mask[:, None, None, :]) * -1e9
            o = torch.softmax(scores, -1) @ v
            return self.out(o.transpose(1, 2).reshape(b, n, -1)) + scores.amax(-1).amax(-1).mean()
        return self.out(o.transpose(1, 2).reshape(b, n, -1))


def _export(style, exporter, dynamic=True):
    torch.manual_seed(0)
    module = Attention(style).eval()
    inputs = [{"x": torch.randn(2, n, WIDTH), "mask": (torch.rand(2, n) > 0.3).float()} for n in (N, 20)]
    shapes = [{k: list(v.shape) for k, v in x.items()} for x in inputs]
    axes = {"x": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}} if dynamic else None
    model = export_onnx(module, inputs[0], dynamic_axes=axes, exporter=exporter,
                        probe_shapes=shapes if dynamic else shapes[:1] * 2)
    return module, model, inputs if dynamic else inputs[:1]


STYLES = ["sdpa", "sdpa_causal", "sdpa_bool_mask", "matmul_div", "additive_bias", "masked_fill", "padding_mask",
          "materialised_scores"]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("style", STYLES)
def test_other_writers_fuse_into_dense_attention_with_parity(style, exporter):
    module, model, inputs = _export(style, exporter)
    fused, report = api.fuse(model)  # refuses to return a fused graph that differs from the reference
    assert report.attention_layers == 1 and report.all_fused, report.as_dict()
    assert [n.op_type for n in fused.graph.node if n.domain == "attn_export"] == ["DenseAttention"]
    # only logits another op reads are handed over whole; otherwise q and k go in and QK^T is never materialised
    assert report.layers[0].attributes["logits_input"] == (style == "materialised_scores")
    runner = OnnxRuntimeRunner(fused, "fused")
    for feeds in inputs:
        expected = module(**feeds).detach().numpy()
        got = next(iter(runner.run({k: v.numpy() for k, v in feeds.items()}).values()))
        assert abs(got - expected).max() < 1e-4


@pytest.mark.parametrize("style,masked_rows", [("materialised_scores", "none"), ("materialised_padded", "zeros")])
def test_materialised_logits_are_unchecked_only_where_every_row_keeps_a_key(style, masked_rows):
    """Finite logits leave every softmax row a visible key, so the op checks none; a -1e9 fill is finite here but
    -inf in an fp16 engine, where a fully padded row needs the check."""
    module, model, inputs = _export(style, "dynamo")
    fused, report = api.fuse(model)
    assert report.all_fused, report.as_dict()
    attributes = report.layers[0].attributes
    assert attributes["logits_input"] == 1 and attributes["masked_rows"] == masked_rows
    runner = OnnxRuntimeRunner(fused, "fused")
    for feeds in inputs:
        got = next(iter(runner.run({k: v.numpy() for k, v in feeds.items()}).values()))
        assert abs(got - module(**feeds).detach().numpy()).max() < 1e-4


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("style", ["memory_keys", "memory_keys_biased"])
def test_one_softmax_over_joined_score_blocks_is_attention_over_the_joined_keys(style, exporter):
    """Memory slots beside the padded keys, one softmax over both blocks: one DenseAttention whose bias is the
    blocks' biases side by side (the padding mask beside zeros, one Pad; or beside the memory's own bias). Rows
    always keep the unmasked memory keys, so only then is no row checked. (Fixed length only: a sequence that is
    not cut into chunks of one length is not taken by this pass yet.)"""
    module, model, inputs = _export(style, exporter, dynamic=False)
    fused, report = api.fuse(model)
    assert report.all_fused, report.as_dict()
    assert report.layers[0].attributes["masked_rows"] == ("none" if style == "memory_keys" else "zeros")
    assert any(n.op_type == "Pad" for n in fused.graph.node) == (style == "memory_keys")
    feeds = {k: v.numpy() for k, v in inputs[0].items()}
    got = next(iter(OnnxRuntimeRunner(fused, "fused").run(feeds).values()))
    assert abs(got - module(**inputs[0]).detach().numpy()).max() < 1e-4


def test_fixed_length_export_fuses_too():
    _, model, _ = _export("masked_fill", "dynamo", dynamic=False)
    assert fuse_graph(model)[1].all_fused


@pytest.mark.parametrize("style,reason", [("wrong_axis", "not over the last (key) axis"),
                                          ("leaked_probs", "also used outside the attention")])
def test_near_misses_are_reported_not_fused(style, reason):
    _, model, _ = _export(style, "dynamo")
    fused, report = fuse_graph(model)
    assert report.attention_layers == 1 and report.fused == 0
    assert reason in report.layers[0].reason, report.as_dict()
    assert not [n for n in fused.graph.node if n.domain == "attn_export"]


def _attention_node_model(q_heads=HEADS, kv_heads=HEADS, mask="bool", causal=0):
    """A graph holding the ONNX (opset 23+) Attention node between two MatMul projections."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    kv_width = kv_heads * (WIDTH // q_heads)
    inits = [numpy_helper.from_array(rng.standard_normal((WIDTH, width)).astype(np.float32), f"w{i}")
             for i, width in enumerate((WIDTH, kv_width, kv_width))]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [t]) for i, t in enumerate("qkv")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", WIDTH])]
    attention_inputs = ["q", "k", "v"]
    if mask == "bool":
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", 1, "seq", "seq"]))
        attention_inputs.append("mask")
    nodes.append(helper.make_node("Attention", attention_inputs, ["y"], q_num_heads=q_heads, kv_num_heads=kv_heads,
                                  is_causal=causal))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    return model


@pytest.mark.parametrize("mask,causal", [("bool", 0), ("none", 1), ("none", 0)])
def test_onnx_attention_node_fuses_into_dense_attention(mask, causal):
    model = _attention_node_model(mask=mask, causal=causal)
    fused, report = api.fuse(model)
    assert report.all_fused and report.attention_layers == 1, report.as_dict()
    assert [n.op_type for n in fused.graph.node if n.domain == "attn_export"] == ["DenseAttention"]
    assert not [n for n in fused.graph.node if n.op_type == "Attention"]


def test_onnx_attention_node_with_grouped_heads_is_reported():
    _, report = fuse_graph(_attention_node_model(q_heads=2, kv_heads=1))
    assert report.fused == 0 and "mismatched head counts" in report.layers[0].reason


class BlockMaskedAttention(nn.Module):
    """Dense attention under a constant block-diagonal-plus-first-column mask (block 8)."""

    def __init__(self, n=32, block=8):
        super().__init__()
        self.qkv, self.out = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        blocks = torch.eye(n // block, dtype=torch.bool)
        blocks[:, 0] = True
        self.register_buffer("mask", blocks.repeat_interleave(block, 0).repeat_interleave(block, 1))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, HEADS, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        o = torch.softmax(scores.masked_fill(~self.mask, float("-inf")), -1) @ v
        return self.out(o.transpose(1, 2).reshape(b, n, -1))


def test_constant_block_mask_becomes_block_sparse_with_the_derived_layout():
    torch.manual_seed(0)
    x = torch.randn(2, 32, WIDTH)
    model = export_onnx(BlockMaskedAttention().eval(), {"x": x}, probe_shapes=[{"x": [2, 32, WIDTH]}] * 2)
    fused, report = api.fuse(model)
    assert report.all_fused, report.as_dict()
    (node,) = [n for n in fused.graph.node if n.domain == "attn_export"]
    assert node.op_type == "BlockSparseAttention"
    table = next(t for t in fused.graph.initializer if t.name == node.input[3])
    from onnx import numpy_helper

    layout = numpy_helper.to_array(table)[0]
    assert [sorted(j for j in row if j >= 0) for row in layout] == [[0], [0, 1], [0, 2], [0, 3]]
    assert report.layers[0].attributes["block_size"] == 8


class ConfigurableAttention(nn.Module):
    def __init__(self, heads: int, head_dim: int, style: str):
        super().__init__()
        self.heads, self.style = heads, style
        width = heads * head_dim
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        if self.style == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v
        return self.out(o.transpose(1, 2).reshape(b, n, -1))


@settings(max_examples=8, deadline=None, derandomize=True)
@given(heads=st.integers(1, 4), head_dim=st.sampled_from([4, 8, 16]), n=st.integers(3, 40),
       style=st.sampled_from(["sdpa", "explicit"]), exporter=st.sampled_from(["dynamo", "torchscript"]))
def test_random_valid_configurations_fuse_and_keep_parity(heads, head_dim, n, style, exporter):
    torch.manual_seed(n)
    module = ConfigurableAttention(heads, head_dim, style).eval()
    lengths = (n, n + 7)
    inputs = [{"x": torch.randn(2, length, heads * head_dim)} for length in lengths]
    model = export_onnx(module, inputs[0], dynamic_axes={"x": {0: "batch", 1: "seq"}}, exporter=exporter,
                        probe_shapes=[{"x": list(x["x"].shape)} for x in inputs])
    fused, report = api.fuse(model)
    assert report.all_fused and report.attention_layers == 1, report.as_dict()
    assert report.layers[0].attributes["num_heads"] == heads
    runner = OnnxRuntimeRunner(fused, "fused")
    with torch.no_grad():
        for feeds in inputs:
            got = runner.run({"x": feeds["x"].numpy()})
            np.testing.assert_allclose(next(iter(got.values())), module(feeds["x"]).numpy(), atol=1e-4, rtol=1e-3)
