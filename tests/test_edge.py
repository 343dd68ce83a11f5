"""The edge path: `attn-export engine` on a build folder, in a process where torch cannot be imported."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from attn_export import edge
from attn_export.backends import tensorrt_runner
from attn_export.build_folder import load_parity_data
from attn_export.errors import UserError

# torch made unimportable before attn_export loads; every attempt is counted and reported at exit
NO_TORCH = """
import atexit, sys
attempts = []
class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            attempts.append(name)
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, BlockTorch())
atexit.register(lambda: print("torch imports attempted:", len(attempts), file=sys.stderr))
from attn_export.cli import main
main(sys.argv[1:])
"""


def run_without_torch(*args):
    return subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_engine_command_runs_without_torch_checks_parity_and_says_tensorrt_is_absent(bigbird_build, tmp_path):
    out, n_sets = bigbird_build
    folder = tmp_path / "on_device"
    shutil.copytree(out, folder)  # what a user copies to the Jetson
    done = run_without_torch("engine", folder, "--onnxruntime")
    assert "torch imports attempted: 0" in done.stderr, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("onnxruntime: ")]
    assert len(lines) == n_sets and all(line.endswith(" pass") for line in lines), done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and errors == ["error: " + tensorrt_runner.NOT_INSTALLED], done.stderr
    report = json.loads((folder / edge.EDGE_REPORT).read_text())
    assert report["engine"] is None and "TensorRT" in report["engine_reason"] and len(report["checks"]) == n_sets


def test_engine_command_refuses_a_folder_without_parity_data(bigbird_build, tmp_path):
    out, _ = bigbird_build
    folder = tmp_path / "old"
    shutil.copytree(out, folder)
    (folder / "parity.npz").unlink()
    done = run_without_torch("engine", folder)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "no parity data" in done.stderr


def test_a_tampered_parity_file_fails_the_onnxruntime_check(bigbird_build, tmp_path):
    out, _ = bigbird_build
    folder = tmp_path / "tampered"
    shutil.copytree(out, folder)
    sets = load_parity_data(folder / "parity.npz")
    arrays = {"labels": np.array([s[0] for s in sets])}
    for i, (_, inputs, outputs) in enumerate(sets):
        arrays.update({f"inputs/{i}/{k}": v for k, v in inputs.items()})
        arrays.update({f"outputs/{i}/{k}": v + 0.1 for k, v in outputs.items()})
    np.savez(folder / "parity.npz", **arrays)
    checks = edge.check_onnxruntime(folder, load_parity_data(folder / "parity.npz"))
    assert checks and not any(c.passed for c in checks)


class EchoEngine:
    """Stands in for the engine runner: answers with the saved torch outputs plus an error."""

    def __init__(self, parity, error):
        self.answers = {s[1]["input_ids"].shape: s[2] for s in parity}
        self.error = error

    def run(self, inputs):
        return {f"out{i}": v + self.error for i, v in enumerate(self.answers[inputs["input_ids"].shape].values())}


@pytest.mark.parametrize("error, passed", [(0.0, True), (1e-2, False)])
def test_engine_build_uses_one_profile_over_the_parity_shapes_and_compares(bigbird_build, tmp_path, monkeypatch,
                                                                           error, passed):
    out = tmp_path / "build"
    shutil.copytree(bigbird_build[0], out)
    parity = load_parity_data(out / "parity.npz")
    built = {}
    monkeypatch.setattr(tensorrt_runner, "tensorrt_status", lambda: (True, "TensorRT 10.3.0"))
    monkeypatch.setattr(tensorrt_runner, "find_plugin_library", lambda: None)

    def build_engine(onnx_path, engine_path, *, plugin_library, profiles, precision):
        built.update(onnx=onnx_path, profiles=profiles, precision=precision)
        return engine_path

    monkeypatch.setattr(tensorrt_runner, "build_engine", build_engine)
    result = edge.build_and_check(out, engine_path=tmp_path / "model.plan", precision="fp32",
                                  runner_factory=lambda path, library: EchoEngine(parity, error))
    lengths = sorted(s[1]["input_ids"].shape[1] for s in parity)
    [(lo, _opt, hi)] = [built["profiles"][0]["input_ids"]]
    assert built["onnx"].name == "model.fused.onnx" and lo[1] == lengths[0] and hi[1] == lengths[-1]
    assert result.passed is passed and len(result.checks) == len(parity)
    assert json.loads((out / edge.EDGE_REPORT).read_text())["passed"] is passed


def test_engine_runner_without_tensorrt_is_one_line():
    with pytest.raises(UserError, match="TensorRT"):
        edge.EngineRunner("model.plan", None)


MANIFEST_WITHOUT_TORCH = """
import sys
class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, BlockTorch())
from attn_export.backends import engine_manifest, tensorrt_runner
machine = engine_manifest.machine_facts()
library = {"path": "/x.so", "sha256": "0", "contracts": "0123456789abcdef", "tensorrt_headers": "10.3.0"}
manifest = engine_manifest.build_manifest(engine_path="m.plan", onnx_path="m.onnx", tensorrt_version="10.3.0",
                                          machine=machine, plugin_library=library, precision="fp32", profiles_json=[])
print(manifest["contracts"], machine["gpu"], tensorrt_runner.tensorrt_status()[0], "torch" in sys.modules)
"""


def test_engine_manifest_and_gpu_check_work_without_torch():
    done = subprocess.run([sys.executable, "-c", MANIFEST_WITHOUT_TORCH], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    contracts, gpu, trt_ok, torch_loaded = done.stdout.split()
    # the digest comes from the plugin library's tag; no GPU and no TensorRT here
    assert contracts == "0123456789abcdef" and torch_loaded == "False" and trt_ok == "False"


def test_cuda_runtime_without_a_gpu_is_one_line():
    from attn_export.backends.engine_manifest import driver_device

    if driver_device() is not None:
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match="CUDA|libcudart"):
        edge._CudaRuntime().malloc(16)
