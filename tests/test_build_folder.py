"""What build leaves for deployment: a portable fused graph plain onnxruntime runs, and the parity data (.npz)."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from attn_export.build_folder import PARITY_DATA, PORTABLE_GRAPH, load_parity_data, save_parity_data
from attn_export.errors import UserError

# runs in a fresh interpreter that never imports attn_export: only onnxruntime and numpy
PLAIN_ORT = """
import sys, numpy as np, onnxruntime as ort
folder = sys.argv[1]
data = np.load(folder + "/parity.npz", allow_pickle=False)
session = ort.InferenceSession(folder + "/model.fused.portable.onnx", providers=["CPUExecutionProvider"])
for i in range(len(data["labels"])):
    feeds = {x.name: data[f"inputs/{i}/{x.name}"] for x in session.get_inputs()}
    got = session.run(None, feeds)
    want = [data[k] for k in data.files if k.startswith(f"outputs/{i}/")]
    assert len(got) == len(want), (len(got), len(want))
    for g, w in zip(got, want):
        err = float(np.max(np.abs(g - w)))
        assert np.allclose(g, w, atol=1e-4, rtol=1e-3), err
        print("set", i, "max_abs_err", err)
print("loaded", "attn_export" in sys.modules)
"""


def test_portable_graph_runs_in_plain_onnxruntime_with_parity(bigbird_build):
    out, n_sets = bigbird_build
    done = subprocess.run([sys.executable, "-c", PLAIN_ORT, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("max_abs_err") == n_sets and "loaded False" in done.stdout


def test_tensorrt_file_stays_body_free_and_the_portable_file_carries_bodies(bigbird_build):
    out, _ = bigbird_build
    trt, portable = onnx.load(str(out / "model.fused.onnx")), onnx.load(str(out / PORTABLE_GRAPH))
    custom = [n for n in trt.graph.node if n.domain == "attn_export"]
    assert custom and not trt.functions
    called = {n.op_type for n in portable.graph.node if n.domain == "attn_export"}
    assert called and called <= {f.name for f in portable.functions}
    onnx.checker.check_model(portable)


def test_report_says_which_file_is_for_what(bigbird_build):
    out, _ = bigbird_build
    files = json.loads((out / "report.json").read_text())["files"]
    assert "TensorRT" in files["model.fused.onnx"] and "onnxruntime" in files[PORTABLE_GRAPH]
    assert "torch" in files[PARITY_DATA]


def test_parity_data_holds_the_torch_outputs_parity_used(bigbird_build):
    out, n_sets = bigbird_build
    sets = load_parity_data(out / PARITY_DATA)
    assert len(sets) == n_sets and sets[0][0].startswith("seq_len=")
    assert list(sets[0][2]) == ["output_0"] and sets[0][1]["input_ids"].dtype == np.int64
    lengths = [s[1]["input_ids"].shape[1] for s in sets]
    assert len(set(lengths)) == n_sets  # one set per parity length, in order


def test_parity_data_round_trip_and_bad_files(tmp_path):
    path = tmp_path / "p.npz"
    outputs = {"output_0": np.ones(2, np.float32), "output_1": np.zeros(1)}
    save_parity_data(path, ["a"], [({"x": np.arange(3)}, outputs)])
    [(label, inputs, outputs)] = load_parity_data(path)
    assert label == "a" and list(outputs) == ["output_0", "output_1"] and inputs["x"].tolist() == [0, 1, 2]
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a parity data file"):
        load_parity_data(tmp_path / "bad.npz")
    with pytest.raises(UserError, match="no parity data"):
        load_parity_data(tmp_path / "missing.npz")
