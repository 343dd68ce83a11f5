import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from attn_export.ops.functions import with_function_bodies


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def run_single_op(contract, attrs, arrays):
    """Run one custom node through its attached decomposition on onnxruntime."""
    names = [f"x{i}" for i in range(len(arrays))]
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), None)
              for n, a in zip(names, arrays)]
    node = contract.make_node(names, ["y"], "op", attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("attn_export", 1)])
    session = ort.InferenceSession(with_function_bodies(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(names, arrays)))[0]


def run_cli(capsys, *args):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    from attn_export.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(map(str, args)))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def small_config(name):
    """The entry and its small config (quick on CPU, more than one layer and head)."""
    import models

    entry = models.get(name)
    return entry, entry.make_config(entry.small)


@pytest.fixture(scope="session")
def bigbird_build(tmp_path_factory):
    """One small zoo BigBird build folder (no engine), shared by the build-folder, deploy and serve tests.
    Returns (folder, number of parity input sets)."""
    from attn_export import api

    entry, config = small_config("bigbird")
    torch.manual_seed(0)
    module = entry.build(config).eval()
    lengths = entry.parity_seq_lens(config)
    inputs = [(f"seq_len={n}", entry.example_inputs(config, 1, n)) for n in lengths]
    out = tmp_path_factory.mktemp("bigbird") / "bigbird"
    result = api.build(module, inputs[0][1], out, dynamic_axes=dict(entry.dynamic_axes), parity_inputs=inputs,
                       engine=False)
    assert result.ok
    return out, len(lengths)
@pytest.fixture
def plugins_accept_fused_graphs(request, monkeypatch):
    """Every fully fused graph the test makes must pass `attn-export plugins check` at fp32 and fp16: the plugin
    library's own rules (fields, shapes over the profile, formats) accept every custom node. Without a C++
    compiler the rules cannot run and nothing is checked (tests/test_plugin_rules.py skips likewise)."""
    import attn_export.api
    import attn_export.passes
    from attn_export.plugin_check import check_model_at, find_compiler

    if find_compiler() is None:
        yield
        return
    produced = []
    original = attn_export.passes.fuse_graph

    def recording(model, *args, **kwargs):
        fused, report = original(model, *args, **kwargs)
        if report.all_fused:
            produced.append(fused)
        return fused, report

    monkeypatch.setattr(attn_export.passes, "fuse_graph", recording)
    monkeypatch.setattr(attn_export.api, "fuse_graph", recording)
    if getattr(request.module, "fuse_graph", None) is original:
        monkeypatch.setattr(request.module, "fuse_graph", recording)
    yield
    for fused in produced:
        for precision, results in check_model_at(fused, ("fp32", "fp16")).items():
            refused = [f"{r.name} ({r.op_type}): {r.detail}" for r in results if not r.accepted]
            assert not refused, f"plugins check at {precision} refuses: " + "; ".join(refused)
