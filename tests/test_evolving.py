"""Evolving Attention: plain attention in the first layer, the evolution formula, the map carried between layers."""
import math

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from attn_export.errors import UserError
from attn_export.export import export_onnx
from conftest import small_config
from models.common import split_heads
from models.evolving import EvolvingAttention


def _projections(attention, x):
    return [split_heads(p(x), attention.num_heads) for p in (attention.query, attention.key, attention.value)]


def _logits(attention, x):
    q, k, _ = _projections(attention, x)
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])


def _attend(attention, x, scores):
    """softmax(scores) V through the output projection, heads merged by hand."""
    _, _, v = _projections(attention, x)
    out = torch.softmax(scores, -1) @ v
    return attention.out(out.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1))


def test_first_layer_is_plain_softmax_attention():
    _, config = small_config("evolving")
    attention = EvolvingAttention(config, layer_index=0).eval()
    x = torch.randn(2, 37, config.hidden)
    out, scores = attention(x)
    q, k, v = _projections(attention, x)
    expected = F.scaled_dot_product_attention(q, k, v)
    expected = attention.out(expected.transpose(1, 2).reshape(2, 37, -1))
    torch.testing.assert_close(scores, _logits(attention, x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_evolution_equals_its_formula(activation):
    entry, _ = small_config("evolving")
    config = entry.make_config({**entry.small, "alpha": 0.3, "beta": 0.7, "activation": activation})
    attention = EvolvingAttention(config, layer_index=1).eval()
    x = torch.randn(2, 23, config.hidden)
    previous = torch.randn(2, config.num_heads, 23, 23)
    out, scores = attention(x, previous)

    conv = attention.cnn[0]
    mixed = 0.3 * _logits(attention, x) + 0.7 * previous  # (1 - beta) L + beta A^{i-1}
    convolved = F.conv2d(mixed, conv.weight, conv.bias, padding=1)
    activated = convolved.clamp(min=0) if activation == "relu" else torch.where(convolved > 0, convolved,
                                                                                0.01 * convolved)
    evolved = 0.3 * activated + 0.7 * mixed  # alpha CNN(A_bar) + (1 - alpha) A_bar
    torch.testing.assert_close(scores, evolved, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, _attend(attention, x, evolved), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores, mixed, atol=1e-3), "the convolution branch must change the map"


def test_alpha_and_beta_zero_give_independent_layers():
    entry, _ = small_config("evolving")
    config = entry.make_config({**entry.small, "alpha": 0.0, "beta": 0.0})
    model = entry.build(config).eval()
    ids = entry.example_inputs(config, 2, 40)["input_ids"]
    x = model.embed(ids)
    for layer in model.layers:  # every layer plain attention, ignoring what the previous one computed
        h = layer.norm1(x)
        x = x + _attend(layer.attention, h, _logits(layer.attention, h))
        x = x + layer.mlp(layer.norm2(x))
    expected = model.head(model.norm(x).mean(1))
    torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-5)


def test_the_map_carried_to_the_next_layer_is_pre_softmax_after_evolution():
    entry, config = small_config("evolving")
    assert config.num_layers >= 3, "two evolutions in a row"
    model = entry.build(config).eval()
    calls = []
    hooks = [layer.attention.register_forward_hook(lambda m, args, out: calls.append((args, out)))
             for layer in model.layers]
    model(entry.example_inputs(config, 2, 30)["input_ids"])
    for hook in hooks:
        hook.remove()

    (args0, (_, map0)), (args1, (_, map1)) = calls[0], calls[1]
    torch.testing.assert_close(map0, _logits(model.layers[0].attention, args0[0]))
    assert not torch.allclose(map0.sum(-1), torch.ones(()), atol=1e-2), "logits, not probabilities"
    for i in range(1, len(calls)):
        previous = calls[i][0][1]
        assert previous is calls[i - 1][1][1], f"layer {i} must receive layer {i - 1}'s map"
    expected = model.layers[1].attention.evolve(_logits(model.layers[1].attention, args1[0]), map0)
    torch.testing.assert_close(map1, expected)


def test_torchscript_export_keeps_the_sequence_axis_dynamic():
    entry, config = small_config("evolving")
    model = entry.build(config).eval()
    graph = export_onnx(model, entry.example_inputs(config, 1, 50), dynamic_axes=entry.dynamic_axes,
                        exporter="torchscript")
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in (20, 64):
        ids = entry.example_inputs(config, 2, n)["input_ids"]
        got = session.run(None, {"input_ids": ids.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), model(ids).detach(), atol=1e-4, rtol=1e-3)


def test_sequence_length_rule():
    entry, config = small_config("evolving")
    entry.check_seq_len(config, 1)
    entry.check_seq_len(config, config.max_seq_len)
    with pytest.raises(UserError, match="must be in"):
        entry.check_seq_len(config, config.max_seq_len + 1)
    with pytest.raises(UserError, match="must be in"):
        entry.check_seq_len(config, 0)


@pytest.mark.parametrize("overrides, message", [
    ({"alpha": 1.5}, "alpha"),
    ({"beta": -0.1}, "beta"),
    ({"activation": "gelu"}, "activation"),
    ({"hidden": 30, "num_heads": 4}, "multiple of num_heads"),
    ({"num_layers": 0}, "num_layers"),
])
def test_config_out_of_range_is_a_user_error(overrides, message):
    entry, _ = small_config("evolving")
    with pytest.raises(UserError, match=message):
        entry.make_config(overrides)
