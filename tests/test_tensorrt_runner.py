"""The TensorRT backend without TensorRT: every entry point must say why in one line, never crash.

The tests hide any installed `tensorrt` (sys.modules entry None makes `import tensorrt` fail), so they check the
absent path on every machine, GPU or not.
"""
import importlib
import sys
import types

import pytest
import torch

from attn_export.backends import tensorrt_runner
from attn_export.errors import UserError


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_module_imports_without_tensorrt(no_tensorrt):
    importlib.reload(tensorrt_runner)  # no top-level `import tensorrt`


def test_status_reports_missing_tensorrt(no_tensorrt):
    ok, reason = tensorrt_runner.tensorrt_status()
    assert ok is False
    assert reason == "TensorRT is not installed (pip install 'attn-export[gpu]' on a machine with an NVIDIA GPU)"
    assert "\n" not in reason


def test_build_engine_raises_user_error(no_tensorrt, tmp_path):
    with pytest.raises(UserError) as info:
        tensorrt_runner.build_engine(tmp_path / "m.fused.onnx", tmp_path / "m.plan", plugin_library=None,
                                     profiles=[{"input_ids": ((1, 128), (1, 512), (1, 1024))}])
    assert str(info.value) == tensorrt_runner.NOT_INSTALLED
    assert not (tmp_path / "m.plan").exists()
    assert not (tmp_path / "m.json").exists()


def test_runner_raises_user_error(no_tensorrt, tmp_path):
    with pytest.raises(UserError, match="TensorRT is not installed"):
        tensorrt_runner.TensorRTRunner(tmp_path / "m.plan")


def test_status_rejects_old_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1.6"))
    ok, reason = tensorrt_runner.tensorrt_status()
    assert ok is False
    assert reason == "TensorRT 8.6.1.6 is too old: attn-export needs 10.3 or newer (IPluginV3 plugins)"


def test_status_needs_a_cuda_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0.26"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, reason = tensorrt_runner.tensorrt_status()
    assert ok is False
    assert reason.startswith("TensorRT 10.3.0.26 is installed but torch sees no CUDA GPU")


def test_status_ok_with_new_tensorrt_and_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.16.1"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert tensorrt_runner.tensorrt_status() == (True, "TensorRT 10.16.1")


def test_find_plugin_library_from_env(monkeypatch, tmp_path):
    lib = tmp_path / "libmine.so"
    lib.write_bytes(b"\x7fELF")
    monkeypatch.setenv("ATTN_EXPORT_PLUGIN_LIB", str(lib))
    assert tensorrt_runner.find_plugin_library() == lib.resolve()


def test_find_plugin_library_env_missing_file(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTN_EXPORT_PLUGIN_LIB", str(tmp_path / "nope.so"))
    with pytest.raises(UserError, match="nope.so: no such file"):
        tensorrt_runner.find_plugin_library()


def test_find_plugin_library_in_build_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("ATTN_EXPORT_PLUGIN_LIB", raising=False)
    monkeypatch.setattr(tensorrt_runner, "_REPO_ROOT", tmp_path)
    assert tensorrt_runner.find_plugin_library() is None
    lib = tmp_path / "plugins_trt" / "build" / "libattn_export_plugins.so"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"\x7fELF")
    assert tensorrt_runner.find_plugin_library() == lib
