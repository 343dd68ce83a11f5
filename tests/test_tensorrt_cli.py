"""`attn-export build`'s engine options through the command line, on a machine without TensorRT: bad profile or
precision options are one line and exit 2, good ones leave the graphs and the report as before."""
import json
import sys

import pytest

from attn_export.cli import main
from conftest import small_config, run_cli as run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    entry, config = small_config("performer")
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    args = [arg for key, value in entry.small.items() for arg in ("--set", f"{key}={value}")]
    with pytest.raises(SystemExit) as info:
        main(["zoo", "create", "performer", "-o", str(path), *args, "--seq-len", str(entry.parity_seq_lens(config)[0])])
    assert info.value.code == 0
    return path


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.mark.parametrize("options, message", [
    (["--seq-lens", "0,128"], "--seq-lens takes positive integers"),
    (["--seq-lens", "128", "--opt-shapes", "input_ids:1x128"], "either --seq-lens buckets or --min/--opt/--max-shapes"),
    (["--min-shapes", "input_ids:1x16"], "need --opt-shapes too"),
    (["--opt-shapes", "input_ids=1x128"], "--opt-shapes expects NAME:DIMS"),
    (["--precision", "int8"], "Invalid value for '--precision'"),
])
def test_bad_engine_options_fail_before_any_work(capsys, tmp_path, checkpoint, options, message):
    code, out, err = run(capsys, "build", checkpoint, "-o", tmp_path / "out", *options)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_profile_that_does_not_fit_the_graph(capsys, tmp_path, checkpoint):
    code, _, err = run(capsys, "build", checkpoint, "-o", tmp_path / "out", "--opt-shapes", "input_ids:1x128x3",
                       "--no-engine")
    assert code == 2 and "optimization profile 0: 'input_ids' has rank 2" in err


def test_engine_options_without_tensorrt(capsys, tmp_path, checkpoint, no_tensorrt):
    code, out, err = run(capsys, "build", checkpoint, "-o", tmp_path / "out", "--precision", "fp16",
                         "--seq-lens", "64,128")
    assert code == 0, err
    assert "engine: not built: TensorRT is not installed" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["engine"]["path"] is None and {row["backend"] for row in report["parity"]} == {"onnxruntime"}
