"""Treeformer: routing through the per-head trees, TF (attention inside the leaf) and TC (mean aggregates along the
root-to-leaf path), each against an explicit slow computation; both forms export with both exporters."""
import math

import numpy as np
import pytest
import torch

from attn_export.backends import OnnxRuntimeRunner
from attn_export.errors import UserError
from attn_export.export import export_onnx
from conftest import small_config
from models.common import split_heads
from models.treeformer import TreeformerAttention, route, tc_attention, tf_attention


def _attention(form="tf", tree_height=2):
    _, config = small_config("treeformer")
    config.attention, config.tree_height = form, tree_height
    attention = TreeformerAttention(config).eval()
    with torch.no_grad():  # non-zero offsets, so the test also covers b
        attention.b.normal_(0, 0.3)
    return attention, config


def _heads(attention, x):
    return [split_heads(p(x), attention.num_heads) for p in (attention.query, attention.key, attention.value)]


def _walk(x, w, b):
    """The root-to-leaf path of one vector, one node at a time (float64)."""
    node, path = 0, [0]
    for _ in range(int(math.log2(w.shape[0] + 1))):
        node = 2 * node + 2 if float(w[node].double() @ x.double() + b[node].double()) > 0 else 2 * node + 1
        path.append(node)
    return path


def test_routing_equals_an_explicit_walk_down_each_heads_tree():
    attention, config = _attention(tree_height=3)
    x = torch.randn(2, config.num_heads, 20, config.hidden // config.num_heads)
    w, b = attention.w.detach(), attention.b.detach()
    path = route(x, w, b)
    assert path.shape == (2, config.num_heads, 20, 4)
    for n in range(2):
        for h in range(config.num_heads):
            for i in range(20):
                assert path[n, h, i].tolist() == _walk(x[n, h, i], w[h], b[h])
    leaves = path[..., -1] - (2**3 - 1)
    assert leaves.min() >= 0 and leaves.max() < 2**3 and len(leaves.unique()) > 2, "routing uses several leaves"


def _tf_per_leaf(q, k, v, leaf_q, leaf_k):
    """Ordinary softmax attention run separately inside each leaf; a query whose leaf has no key gets zeros."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for leaf in leaf_q[b, h].unique():
                qi = (leaf_q[b, h] == leaf).nonzero()[:, 0]
                kj = (leaf_k[b, h] == leaf).nonzero()[:, 0]
                if len(kj):
                    scores = q[b, h, qi] @ k[b, h, kj].T / math.sqrt(q.shape[-1])
                    out[b, h, qi] = torch.softmax(scores, -1) @ v[b, h, kj]
    return out


def test_tf_equals_ordinary_attention_inside_each_leaf():
    attention, config = _attention("tf", tree_height=2)
    x = torch.randn(2, 40, config.hidden)
    q, k, v = _heads(attention, x)
    leaf_q, leaf_k = (route(t, attention.w, attention.b)[..., -1] for t in (q, k))
    expected = _tf_per_leaf(q, k, v, leaf_q, leaf_k)
    torch.testing.assert_close(tf_attention(q, k, v, leaf_q, leaf_k), expected, atol=1e-6, rtol=1e-5)
    out = attention(x)
    torch.testing.assert_close(out, attention.out(expected.transpose(1, 2).reshape(2, 40, -1)), atol=1e-6, rtol=1e-5)


def test_tf_query_in_a_leaf_without_keys_gets_zeros_not_nan():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    leaf_q = torch.tensor([[[0, 1, 2, 3, 3, 0], [5, 5, 5, 5, 5, 5]]])
    leaf_k = torch.tensor([[[0, 0, 1, 1, 1, 1], [0, 1, 2, 3, 4, 4]]])
    out = tf_attention(q, k, v, leaf_q, leaf_k)
    assert not out.isnan().any()
    empty = (leaf_q[..., :, None] != leaf_k[..., None, :]).all(-1)  # leaves 2, 3 in head 0; leaf 5 in head 1
    assert empty.sum() == 9
    assert (out[empty] == 0).all()
    torch.testing.assert_close(out, _tf_per_leaf(q, k, v, leaf_q, leaf_k), atol=1e-6, rtol=1e-5)


def test_tf_layer_with_empty_leaves_stays_finite():
    attention, config = _attention("tf", tree_height=5)  # 32 leaves for 12 tokens: many queries find no key
    x = torch.randn(1, 12, config.hidden)
    q, k, _ = _heads(attention, x)
    leaf_q, leaf_k = (route(t, attention.w, attention.b)[..., -1] for t in (q, k))
    assert (leaf_q[..., :, None] != leaf_k[..., None, :]).all(-1).any(), "the case must occur"
    assert torch.isfinite(attention(x)).all()


def _tc_per_query(q, k, v, path_q, path_k):
    """For each query: the mean key/value of every node on its path that some key reached, one softmax over them."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                keys, values = [], []
                for node in path_q[b, h, i].tolist():
                    members = (path_k[b, h] == node).any(-1)
                    if members.any():
                        keys.append(k[b, h, members].mean(0))
                        values.append(v[b, h, members].mean(0))
                weights = torch.softmax(torch.stack(keys) @ q[b, h, i] / math.sqrt(q.shape[-1]), 0)
                out[b, h, i] = weights @ torch.stack(values)
    return out


def test_tc_equals_an_explicit_per_query_path_computation():
    attention, config = _attention("tc", tree_height=3)
    x = torch.randn(2, 24, config.hidden)
    q, k, v = _heads(attention, x)
    path_q, path_k = (route(t, attention.w, attention.b) for t in (q, k))
    reached = [(path_k[..., None, :, t] == path_q[..., :, None, t]).any(-1) for t in range(4)]
    assert not torch.stack(reached).all(), "some query path nodes hold no key (the masked case)"
    expected = _tc_per_query(q, k, v, path_q, path_k)
    out = tc_attention(q, k, v, path_q, path_k, attention.node_depth)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    out = attention(x)
    torch.testing.assert_close(out, attention.out(expected.transpose(1, 2).reshape(2, 24, -1)), atol=1e-6, rtol=1e-5)


def test_tc_aggregates_are_means_so_repeating_the_keys_changes_nothing():
    attention, config = _attention("tc", tree_height=3)
    q, k, v = _heads(attention, torch.randn(1, 30, config.hidden))
    path_q, path_k = (route(t, attention.w, attention.b) for t in (q, k))
    once = tc_attention(q, k, v, path_q, path_k, attention.node_depth)
    thrice = tc_attention(q, k.repeat(1, 1, 3, 1), v.repeat(1, 1, 3, 1), path_q, path_k.repeat(1, 1, 3, 1),
                          attention.node_depth)
    torch.testing.assert_close(thrice, once, atol=1e-6, rtol=1e-5)  # a sum would grow the logits 3x


@pytest.mark.parametrize("form,exporter", [("tf", "torchscript"), ("tc", "dynamo"), ("tc", "torchscript")])
def test_form_exports_with_a_dynamic_length_and_keeps_parity(form, exporter):
    entry, config = small_config("treeformer")
    config.attention = form
    module = entry.build(config).eval()
    inputs = [entry.example_inputs(config, 2, n) for n in entry.parity_seq_lens(config)]
    model = export_onnx(module, inputs[0], dynamic_axes=entry.dynamic_axes, exporter=exporter)
    runner = OnnxRuntimeRunner(model, "reference")
    for x in inputs:
        got = list(runner.run({k: t.numpy() for k, t in x.items()}).values())[0]
        np.testing.assert_allclose(got, module(**x).detach().numpy(), atol=1e-4, rtol=1e-3)


def test_sequence_length_rule():
    entry, config = small_config("treeformer")
    entry.check_seq_len(config, 1)
    entry.check_seq_len(config, config.max_seq_len)
    with pytest.raises(UserError, match="must be in"):
        entry.check_seq_len(config, config.max_seq_len + 1)
    with pytest.raises(UserError, match="must be in"):
        entry.check_seq_len(config, 0)
    default = entry.make_config()
    assert entry.default_seq_len(default) / 2**default.tree_height == 64, "about 64 keys per leaf by default"


def test_config_out_of_range_is_a_user_error():
    entry, _ = small_config("treeformer")
    with pytest.raises(UserError, match="tree_height"):
        entry.make_config({"tree_height": 0})
    with pytest.raises(UserError, match="attention"):
        entry.make_config({"attention": "dense"})
    with pytest.raises(UserError, match="multiple of num_heads"):
        entry.make_config({"hidden": 65, "num_heads": 4})
    assert entry.make_config({"attention": "tc"}).attention == "tc"
