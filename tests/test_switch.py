"""Switch Transformer: the dispatch/combine layer against a per-token loop, capacity drops, the float32 router, and
every expert kept whole in the exported graph."""
import math

import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from attn_export.errors import UserError
from attn_export.export import export_onnx
from conftest import small_config
from models.switch import SwitchFFN


def _layer(**overrides):
    entry, _ = small_config("switch")
    return SwitchFFN(entry.make_config({**entry.small, **overrides})).eval()


def _loop_reference(layer, x, capacity_factor):
    """Top-1 routing token by token, admitting tokens to their expert in sequence order up to C."""
    batch, tokens, _ = x.shape
    experts = layer.num_experts
    capacity = math.ceil(tokens * capacity_factor / experts - 1e-9)
    out, dropped = torch.zeros_like(x), 0
    for b in range(batch):
        admitted = [0] * experts
        for t in range(tokens):
            probs = torch.softmax(x[b, t].float() @ layer.router.weight.float().t(), -1)
            e = int(probs.argmax())
            admitted[e] += 1
            if admitted[e] > capacity:
                dropped += 1
                continue
            hidden = torch.relu(x[b, t] @ layer.wi[e])
            out[b, t] = probs[e] * (hidden @ layer.wo[e])
    return out, dropped


@pytest.mark.parametrize("capacity_factor, tokens", [(1.25, 100), (0.5, 37), (2.0, 64)])
def test_layer_equals_a_per_token_loop_with_the_capacity_rule(capacity_factor, tokens):
    layer = _layer(capacity_factor=capacity_factor)
    x = torch.randn(2, tokens, layer.wi.shape[1])
    expected, dropped = _loop_reference(layer, x, capacity_factor)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    if capacity_factor < 1:
        assert dropped > 0, "the test must exercise the capacity rule"


def test_tokens_over_capacity_are_dropped_exactly():
    layer = _layer(capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.zero_()  # equal logits: every token goes to expert 0 (first index), gate 1 / E
    x = torch.randn(2, 40, layer.wi.shape[1])
    capacity = layer.capacity(40)
    assert capacity == 10
    out = layer(x)
    kept = torch.relu(x[:, :capacity] @ layer.wi[0]) @ layer.wo[0] / layer.num_experts
    torch.testing.assert_close(out[:, :capacity], kept, atol=1e-6, rtol=1e-5)
    assert torch.equal(out[:, capacity:], torch.zeros_like(out[:, capacity:]))


def test_capacity_is_the_exact_ceiling():
    assert _layer(num_experts=4, capacity_factor=1.25).capacity(100) == 32  # ceil(31.25)
    assert _layer(num_experts=4, capacity_factor=1.25).capacity(32) == 10
    # 100 * 1.1 / 11 is 10.000000000000002 in floating point; the capacity is exactly 10
    assert _layer(num_experts=11, capacity_factor=1.1).capacity(100) == 10


def test_router_runs_in_float32():
    layer = _layer().to(torch.bfloat16)
    x = torch.randn(2, 30, layer.wi.shape[1]).to(torch.bfloat16)
    probs, expert, gate = layer.route(x)
    assert probs.dtype == gate.dtype == torch.float32
    expected = torch.softmax(x.float() @ layer.router.weight.float().t(), -1)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(expert, expected.argmax(-1))
    assert layer(x).dtype == torch.bfloat16


def test_every_other_ffn_is_sparse():
    entry, _ = small_config("switch")
    for every, sparse in ((2, [1, 3]), (1, [0, 1, 2, 3]), (3, [1])):
        model = entry.build(entry.make_config({**entry.small, "num_layers": 4, "moe_every": every}))
        assert [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, SwitchFFN)] == sparse


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_the_exported_graph_holds_every_expert_whole(exporter):
    entry, config = small_config("switch")
    model = entry.build(config).eval()
    n = entry.parity_seq_lens(config)[0]
    graph = export_onnx(model, entry.example_inputs(config, 1, n), dynamic_axes=entry.dynamic_axes, exporter=exporter)
    weights = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    for name, param in model.named_parameters():
        if name.endswith((".wi", ".wo")):
            assert param.shape[0] == config.num_experts
            stored = [w for w in weights.values() if w.shape == tuple(param.shape)]
            assert any((w == param.detach().numpy()).all() for w in stored), f"{name} is not whole"
    assert not {"Loop", "If", "NonZero", "TopK"} & {node.op_type for node in graph.graph.node}
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    for length in (n // 2, n, 2 * n):  # other lengths route to other experts, with another capacity
        ids = entry.example_inputs(config, 2, length)["input_ids"]
        got = session.run(None, {"input_ids": ids.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), model(ids).detach(), atol=1e-4, rtol=1e-3)
    onnx.checker.check_model(graph)


def test_sequence_length_rule():
    entry, config = small_config("switch")
    entry.check_seq_len(config, config.max_seq_len)
    with pytest.raises(UserError, match="must be in"):
        entry.check_seq_len(config, config.max_seq_len + 1)


@pytest.mark.parametrize("overrides, message", [
    ({"capacity_factor": 0.0}, "capacity_factor"),
    ({"num_experts": 0}, "num_experts"),
    ({"moe_every": -1}, "moe_every"),
    ({"hidden": 30, "num_heads": 4}, "multiple of num_heads"),
])
def test_config_out_of_range_is_a_user_error(overrides, message):
    entry, _ = small_config("switch")
    with pytest.raises(UserError, match=message):
        entry.make_config(overrides)
