"""SPADE: the S4D long convolution against its recurrence, local attention against dense masked attention, the
global/local merges, and where the S4 layer sits."""
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from attn_export.errors import UserError
from attn_export.export import export_onnx
from conftest import small_config
from models.common import split_heads, t5_relative_buckets
from models.spade import GlobalLocal, LocalAttention, RelativePositionBias, S4D, s4d_imag_parts


def _config(**overrides):
    entry, _ = small_config("spade")
    return entry.make_config({**entry.small, **overrides})


def _recurrence(s4: S4D, u: torch.Tensor, discretization: str) -> torch.Tensor:
    """Both scans in complex128, with Ā, B̄ from the continuous parameters:
    forward  s_t = Ā s_{t-1} + B̄ u_t,  y_t = 2 Re(C_fwd s_t);
    backward r_t = Ā r_{t+1} + B̄ u_t,  y_t = 2 Re(C_bwd r_{t+1}) (strictly later tokens, as the official kernel);
    plus D u_t."""
    dt = s4.log_dt.double().exp()[:, None]
    A = -s4.a.double().exp() + 1j * s4.theta.double()
    B = torch.view_as_complex(s4.B.double())
    C_fwd, C_bwd = torch.view_as_complex(s4.C.double())
    if discretization == "bilinear":
        A_bar, B_bar = (1 + dt * A / 2) / (1 - dt * A / 2), dt * B / (1 - dt * A / 2)
    else:
        A_bar = torch.exp(dt * A)
        B_bar = (A_bar - 1) / A * B
    u = u.double()
    batch, n, h = u.shape
    y = s4.D.double() * u
    s = torch.zeros(batch, h, A.shape[-1], dtype=torch.complex128)
    for t in range(n):
        s = A_bar * s + B_bar * u[:, t, :, None]
        y[:, t] += 2 * (C_fwd * s).sum(-1).real
    r = torch.zeros_like(s)
    for t in reversed(range(n)):
        y[:, t] += 2 * (C_bwd * r).sum(-1).real
        r = A_bar * r + B_bar * u[:, t, :, None]
    return y


@pytest.mark.parametrize("discretization,init,dt_max", [("bilinear", "legs", 0.1), ("zoh", "lin", 0.5)])
@pytest.mark.parametrize("n", [1, 37, 128])
def test_s4_convolution_equals_the_bidirectional_recurrence(discretization, init, dt_max, n):
    config = _config(discretization=discretization, s4d_init=init, max_seq_len=128, dt_max=dt_max)
    s4 = S4D(config, layer_index=0).eval()
    u = torch.randn(2, n, config.hidden)
    expected = _recurrence(s4, u, discretization)
    torch.testing.assert_close(s4(u).double(), expected, atol=2e-5, rtol=1e-4)


def test_s4_has_no_complex_or_fft_at_inference_and_is_frozen():
    s4 = S4D(_config(), layer_index=0)
    assert s4.taps.dtype == torch.float32 and s4.taps.shape == (64, 2 * 512 - 1)
    assert [name for name, _ in s4.named_parameters()] == ["D"]
    assert torch.equal(s4.taps, S4D(_config(), layer_index=0).taps), "seeded: the same kernel every build"
    assert not torch.equal(s4.taps, S4D(_config(), layer_index=1).taps), "layers draw their own SSM"


def test_s4d_legs_imaginary_parts_are_those_of_the_normal_hippo_legs_matrix():
    n = 16
    i = torch.arange(n, dtype=torch.float64)
    root = torch.sqrt((2 * i[:, None] + 1) * (2 * i[None] + 1))
    legs = torch.where(i[:, None] > i[None], -root, torch.diag(-(i + 1)))  # HiPPO-LegS A
    normal = legs + 0.5 * root  # + P P^T with P = sqrt(i + 1/2)
    eig = torch.linalg.eigvals(normal)
    torch.testing.assert_close(eig.real, torch.full((n,), -0.5, dtype=torch.float64))
    expected = eig.imag.sort().values[: n // 2]
    torch.testing.assert_close(s4d_imag_parts("legs", n), expected)
    torch.testing.assert_close(s4d_imag_parts("lin", n), math.pi * torch.arange(n // 2, dtype=torch.float64))


def _dense_local_attention(attention: LocalAttention, x: torch.Tensor, radius: int) -> torch.Tensor:
    heads = attention.num_heads
    q, k, v = (split_heads(p(x), heads) for p in (attention.query, attention.key, attention.value))
    n = x.shape[1]
    relative = torch.arange(n)[None] - torch.arange(n)[:, None]  # key - query
    bias = attention.relative_bias.bias.weight[t5_relative_buckets(relative, True, 32, 128)].permute(2, 0, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    out = torch.softmax(scores.masked_fill(relative.abs() > radius, float("-inf")), -1) @ v
    return attention.out(out.transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("n", [1, 15, 16, 35, 79, 96])
def test_local_attention_equals_dense_attention_under_the_radius_mask(n):
    config = _config()
    attention = LocalAttention(config, RelativePositionBias(config)).eval()
    x = torch.randn(2, n, config.hidden)
    torch.testing.assert_close(attention(x), _dense_local_attention(attention, x, config.radius),
                               atol=1e-5, rtol=1e-5)


def test_local_attention_with_radius_zero_sees_only_itself():
    config = _config(radius=0)
    attention = LocalAttention(config, RelativePositionBias(config)).eval()
    x = torch.randn(1, 5, config.hidden)
    v = split_heads(attention.value(x), config.num_heads)
    torch.testing.assert_close(attention(x), attention.out(v.transpose(1, 2).reshape(x.shape)))


def test_padded_keys_get_no_weight(monkeypatch):
    config = _config()
    bl, n = config.radius + 1, 35  # 3 blocks, the last one 13 tokens short
    attention = LocalAttention(config, RelativePositionBias(config)).eval()
    seen = []
    softmax = torch.softmax
    monkeypatch.setattr(torch, "softmax", lambda t, dim: seen.append(softmax(t, dim)) or seen[-1])
    attention(torch.randn(2, n, config.hidden))
    probs = seen[0]  # [B, H, nb, bl, 3 bl]
    assert probs.shape[2:] == (3, bl, 3 * bl)
    key_position = (torch.arange(3)[:, None, None] - 1 + torch.arange(3)[None, :, None]) * bl + torch.arange(bl)
    padded = ((key_position < 0) | (key_position >= n)).reshape(3, 1, 3 * bl).expand(-1, bl, -1)
    assert torch.all(probs[..., padded] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))  # padded query rows too: no NaN


@pytest.mark.parametrize("combine,weight", [("concat", 0.5), ("add", 0.5), ("add", 0.3)])
def test_global_and_local_merge(combine, weight):
    config = _config(combine=combine, s4_weight=weight)
    mixer = GlobalLocal(config, S4D(config, 0), LocalAttention(config, RelativePositionBias(config))).eval()
    with torch.no_grad():  # LayerNorm affine parameters away from (1, 0), so a swapped norm would show
        for p in (*mixer.norm_global.parameters(), *mixer.norm_local.parameters()):
            p.normal_()
    x = torch.randn(2, 35, config.hidden)
    h = config.hidden
    g = F.layer_norm(mixer.s4(x), (h,), mixer.norm_global.weight, mixer.norm_global.bias)
    local = F.layer_norm(mixer.local(x), (h,), mixer.norm_local.weight, mixer.norm_local.bias)
    if combine == "concat":
        w, b = mixer.aggregate.weight, mixer.aggregate.bias  # [h, 2h]: global half first
        expected = g @ w[:, :h].T + local @ w[:, h:].T + b
    else:
        assert mixer.aggregate is None
        expected = weight * g + (1 - weight) * local
    torch.testing.assert_close(mixer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("s4_every,expected", [(100, [True, False, False, False]), (1, [True] * 4),
                                                (2, [True, False, True, False]), (3, [True, False, False, True])])
def test_s4_layer_only_where_configured(s4_every, expected):
    entry, _ = small_config("spade")
    config = _config(num_layers=4, s4_every=s4_every, max_seq_len=64)
    model = entry.build(config)
    assert [isinstance(layer.attention, GlobalLocal) for layer in model.layers] == expected
    local = [layer.attention.local if isinstance(layer.attention, GlobalLocal) else layer.attention
             for layer in model.layers]
    assert all(isinstance(a, LocalAttention) for a in local)
    assert all(a.relative_bias is local[0].relative_bias for a in local), "one T5 bias table for all layers"


def test_sequence_length_rule():
    entry, config = small_config("spade")
    for n in (1, 35, config.max_seq_len):
        entry.check_seq_len(config, n)
    for n in (0, config.max_seq_len + 1):
        with pytest.raises(UserError, match="must be in"):
            entry.check_seq_len(config, n)
    default = entry.make_config()
    entry.check_seq_len(default, entry.default_seq_len(default))


@pytest.mark.parametrize("overrides,message", [
    ({"num_heads": -2}, "num_heads"), ({"hidden": 66}, "multiple of num_heads"), ({"radius": -1}, "radius"),
    ({"n_state": 15}, "n_state"), ({"dt_min": 0.0}, "dt_min"), ({"dt_min": 0.2, "dt_max": 0.1}, "dt_max"),
    ({"s4_weight": 1.5}, "s4_weight"), ({"combine": "stack"}, "combine"), ({"s4d_init": "inv"}, "s4d_init"),
    ({"discretization": "euler"}, "discretization"), ({"s4_every": 0}, "s4_every"),
])
def test_config_out_of_range_is_a_user_error(overrides, message):
    entry, _ = small_config("spade")
    with pytest.raises(UserError, match=message):
        entry.make_config(overrides)


def test_torchscript_export_keeps_the_sequence_axis_dynamic():
    """The dynamo path is covered by test_zoo; the TorchScript exporter needs a constant-shaped conv kernel."""
    entry, config = small_config("spade")
    torch.manual_seed(0)
    module = entry.build(config).eval()
    lengths = entry.parity_seq_lens(config)
    model = export_onnx(module, entry.example_inputs(config, 2, lengths[0]), dynamic_axes=entry.dynamic_axes,
                        exporter="torchscript")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in (*lengths, 1):
        x = entry.example_inputs(config, 1, n)
        got = session.run(None, {k: v.numpy() for k, v in x.items()})[0]
        np.testing.assert_allclose(got, module(**x).detach().numpy(), atol=1e-4, rtol=1e-3)
