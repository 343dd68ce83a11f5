"""ViT: patch embedding, token count, standard attention, and the one sequence length the model accepts."""
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from attn_export.errors import UserError
from attn_export.export import export_onnx
from conftest import small_config
from models.common import split_heads
from models.common import SelfAttention


def test_patch_embedding_equals_unfold_and_linear():
    entry, config = small_config("vit")
    model = entry.build(config).eval()
    p = config.patch_size
    images = torch.randn(2, 3, config.image_size, config.image_size)
    patches = F.unfold(images, kernel_size=p, stride=p).transpose(1, 2)  # [B, Np, 3*P*P], row-major patch order
    conv = model.patch_embed
    expected = patches @ conv.weight.reshape(config.hidden, -1).t() + conv.bias
    got = conv(images).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_token_count_is_patches_plus_cls():
    entry, config = small_config("vit")
    model = entry.build(config).eval()
    grid = config.image_size // config.patch_size
    assert config.num_tokens == grid * grid + 1 == entry.default_seq_len(config) == entry.parity_seq_lens(config)[0]
    images = entry.example_inputs(config, 3, config.num_tokens)["pixel_values"]
    assert images.shape == (3, 3, config.image_size, config.image_size)
    seen = []
    model.layers[0].attention.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    assert model(images).shape == (3, config.num_classes)
    assert seen == [(3, config.num_tokens, config.hidden)]


def test_attention_equals_scaled_dot_product_attention():
    _, config = small_config("vit")
    attention = SelfAttention(config.hidden, config.num_heads).eval()
    x = torch.randn(2, 65, config.hidden)
    q, k, v = (split_heads(p(x), config.num_heads) for p in (attention.query, attention.key, attention.value))
    expected = attention.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 65, -1))
    torch.testing.assert_close(attention(x), expected, atol=1e-5, rtol=1e-5)


def test_layout_follows_the_reference_code():
    entry, config = small_config("vit")
    model = entry.build(config)
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    assert all(isinstance(layer.mlp[1], torch.nn.GELU) and layer.mlp[1].approximate == "none"
               for layer in model.layers)
    assert torch.count_nonzero(model.cls_token) == 0, "cls starts at zero"
    assert model.position.shape == (1, config.num_tokens, config.hidden)
    assert model.head.weight.abs().max() > 0, "head initialised small but nonzero so the tests mean something"


def test_only_the_configured_token_count_is_accepted():
    entry, config = small_config("vit")
    entry.check_seq_len(config, config.num_tokens)
    for n in (config.num_tokens - 1, config.num_tokens + 1, 2 * 2 + 1, 1):
        with pytest.raises(UserError, match=f"exactly {config.num_tokens} tokens.*position embedding"):
            entry.check_seq_len(config, n)
    assert entry.example_inputs(config, 1, 5)["pixel_values"].shape[-1] == 2 * config.patch_size
    with pytest.raises(ValueError, match=r"g\^2 \+ 1"):
        entry.example_inputs(config, 1, 66)


def test_torchscript_export_keeps_the_batch_axis_dynamic():
    entry, config = small_config("vit")
    model = entry.build(config).eval()
    graph = export_onnx(model, entry.example_inputs(config, 1, config.num_tokens), dynamic_axes=entry.dynamic_axes,
                        exporter="torchscript")
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        images = entry.example_inputs(config, batch, config.num_tokens)["pixel_values"]
        got = session.run(None, {"pixel_values": images.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), model(images).detach(), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("overrides, message", [
    ({"image_size": 100, "patch_size": 16}, "multiple of patch_size"),
    ({"patch_size": 0}, "patch_size"),
    ({"hidden": 30, "num_heads": 4}, "multiple of num_heads"),
])
def test_config_out_of_range_is_a_user_error(overrides, message):
    entry, _ = small_config("vit")
    with pytest.raises(UserError, match=message):
        entry.make_config(overrides)
