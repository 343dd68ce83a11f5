"""`attn-export plugins check`: the plugins' own C++ rules on the custom nodes of a fused graph (no TensorRT, no
GPU). Graphs here are one custom node each, built from the contracts; the zoo's fused graphs are checked by
tests/test_zoo.py and tests/test_fusion.py (conftest.plugins_accept_fused_graphs)."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from attn_export import plugin_check
from attn_export.export import PROBE_SHAPES_KEY, set_metadata
from attn_export.ops import OPS
from test_cli import run

pytestmark = pytest.mark.skipif(plugin_check.find_compiler() is None, reason="no C++ compiler: rules cannot run")


def _graph(op, attrs, extra_inputs=(), inits=(), width=64, dtype=TensorProto.FLOAT, edit=None):
    names = ["q", "k", "v"]
    inputs = [helper.make_tensor_value_info(n, dtype, ["batch", "seq", width]) for n in names]
    node = OPS[op].make_node(names + [t.name for t in inits] + list(extra_inputs), ["y"], "layer0", attrs)
    if edit:
        edit(node)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", dtype, ["batch", "seq", width])],
                              initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                    helper.make_opsetid("attn_export", 1)])
    shapes = [{n: [1, 16, width] for n in names}, {n: [2, 48, width] for n in names}]
    set_metadata(model, PROBE_SHAPES_KEY, json.dumps(shapes))
    return model


def _set(node, name, value):
    attr = next(a for a in node.attribute if a.name == name)
    attr.CopyFrom(helper.make_attribute(name, value))


def _save(tmp_path, model):
    path = tmp_path / "fused.onnx"
    onnx.save(model, path)
    return path


def test_accepted_graph_exits_0_with_the_profile_shapes(capsys, tmp_path):
    projection = numpy_helper.from_array(np.random.default_rng(0).standard_normal((80, 16)).astype(np.float32),
                                         "projection")
    model = _graph("KernelizedAttention", {"num_heads": 4, "feature_map": "favor_positive"}, inits=[projection])
    [result] = plugin_check.check_model(model, "fp16")
    assert result.accepted, result.detail
    assert "output=1x16x64/1x16x64/2x48x64" in result.detail  # min/opt/max spanned per dimension
    code, out, _ = run(capsys, "plugins", "check", _save(tmp_path, model), "--precision", "fp16")
    assert code == 0 and "1 of 1 plugin nodes accepted at fp16" in out


@pytest.mark.parametrize("attrs,edit,message", [
    ({"num_heads": 4, "causal": 2}, None, "createPlugin: causal must be 0 or 1"),
    ({"num_heads": 3}, None, "onShapeChange at the profile's min: the query width 64"),
    ({"num_heads": 4}, lambda n: n.attribute.append(helper.make_attribute("dropout", 0.1)),
     "createPlugin: unknown field 'dropout'"),
    ({"num_heads": 4}, lambda n: _set(n, "plugin_namespace", "other"), "plugin_namespace 'other'"),
    ({"num_heads": 4}, lambda n: _set(n, "plugin_version", "2"), "plugin_version '2' but the library has 1"),
])
def test_broken_node_is_refused_with_exit_1(capsys, tmp_path, attrs, edit, message):
    model = _graph("DenseAttention", attrs, edit=edit)  # (num_heads 3 cannot split the width 64)
    results = plugin_check.check_model(model)
    assert [r.accepted for r in results] == [False]
    code, out, _ = run(capsys, "plugins", "check", _save(tmp_path, model))
    assert code == 1
    assert "refused layer0 (DenseAttention): " in out and message.split(": ")[-1] in out, out
    assert "0 of 1 plugin nodes accepted" in out


def test_graph_types_reach_supports_format_combination():
    """An int64 block table (the plugin takes int32) and an fp16 graph feeding a float32 projection (item 7 of
    issue 14, before the passes matched the types) are refused as TensorRT would refuse them."""
    table = numpy_helper.from_array(np.zeros((1, 1, 1), np.int64), "table")
    model = _graph("BlockSparseAttention", {"num_heads": 4, "block_size": 16}, inits=[table])
    [result] = plugin_check.check_model(model)
    assert not result.accepted and "refuses input 'block_index' (must be int32)" in result.detail
    node_lines = plugin_check._field_lines(model.graph.node[0])
    assert "field num_heads:int32:4" in node_lines and "field block_size:int32:16" in node_lines
    binary = plugin_check.harness_binary()
    import subprocess

    text = "\n".join(["node l BlockSparseAttention 1 attn_export", "field num_heads:int32:1",
                      "field block_size:int32:16", *["input float32 1x32x64 1x32x64 1x32x64"] * 3,
                      "input other 1x2x1 1x2x1 1x2x1", "end",
                      "node p KernelizedAttention 1 attn_export", "field num_heads:int32:4",
                      *["input float16 1x32x64 1x32x64 1x32x64"] * 3, "input float32 80x16 80x16 80x16", "end"])
    out = subprocess.run([str(binary), "--check"], input=text + "\n", capture_output=True, text=True).stdout
    assert "refused l: supportsFormatCombination refuses input 'block_index' (must be int32)" in out
    assert "refused p: supportsFormatCombination refuses input 'projection'" in out


def test_launch_limits_are_part_of_the_check():
    binary = plugin_check.harness_binary()
    import subprocess

    heads = 1 << 16
    text = "\n".join(["node big DenseAttention 1 attn_export", f"field num_heads:int32:{heads}",
                      *[f"input float16 1x8x{heads} 1x8x{heads} 1x8x{heads}"] * 3, "end"])
    out = subprocess.run([str(binary), "--check"], input=text + "\n", capture_output=True, text=True)
    assert out.returncode == 1 and "launch limit at the profile's min: num_heads exceeds" in out.stdout


def test_no_compiler_or_bad_file_exits_2_never_passes(capsys, tmp_path, monkeypatch):
    model = _graph("DenseAttention", {"num_heads": 4})
    path = _save(tmp_path, model)
    monkeypatch.setattr(plugin_check, "find_compiler", lambda: None)
    code, out, err = run(capsys, "plugins", "check", path)
    assert code == 2 and "needs a C++17 compiler" in err and "accepted" not in out
    monkeypatch.undo()
    (tmp_path / "bad.onnx").write_text("not a graph")
    code, _, err = run(capsys, "plugins", "check", tmp_path / "bad.onnx")
    assert code == 2 and err.startswith("error: ")


def test_harness_is_built_once_per_source_hash():
    first = plugin_check.harness_binary()  # built by the tests above, or now
    stamp = first.stat().st_mtime_ns
    assert plugin_check.harness_binary() == first and first.stat().st_mtime_ns == stamp
    assert first.parent.parent == plugin_check.cache_dir() and len(first.parent.name) == 16
