"""`attn-export doctor`: one screen that says what works here and why the rest does not, exit 1 when a piece
the user requires (or a core one) is missing. TensorRT and the GPU are faked or hidden, so every machine runs
every path."""
import sys
import types

import pytest
import torch

from attn_export.backends import tensorrt_runner
from attn_export.cli import main
from attn_export.ops import OPS


def run(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(["doctor", *map(str, args)])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out.splitlines(), captured.err


def line(lines, name):
    """The line about one piece: (mark, detail)."""
    for text in lines:
        mark, _, rest = text.partition(" ")
        piece, _, detail = rest.strip().partition(" ")
        if piece == name:
            return mark, detail.strip()
    raise AssertionError(f"no line for {name} in {lines}")


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def no_plugin_library(monkeypatch, tmp_path):
    monkeypatch.delenv(tensorrt_runner.PLUGIN_LIB_ENV, raising=False)
    monkeypatch.setattr(tensorrt_runner, "_REPO_ROOT", tmp_path)


@pytest.fixture
def plugin_library(monkeypatch, tmp_path):
    library = tmp_path / "libattn_export_plugins.so"
    library.write_bytes(b"\x7fELF")
    monkeypatch.setenv(tensorrt_runner.PLUGIN_LIB_ENV, str(library))
    monkeypatch.setattr(tensorrt_runner, "_loaded_plugin_libraries", {})
    return library


def fake_tensorrt(monkeypatch, creators, version="10.3.0.26"):
    """A tensorrt module whose registry, once our library is loaded, lists `creators` (name, version, namespace)."""
    registry = types.SimpleNamespace(all_creators=[])

    def load_library(path):
        registry.all_creators = [types.SimpleNamespace(name=n, plugin_version=v, plugin_namespace=ns)
                                 for n, v, ns in creators]
        return object()

    registry.load_library = load_library
    module = types.SimpleNamespace(__version__=version, get_plugin_registry=lambda: registry)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


ALL_CREATORS = [(op.op_type, str(op.version), "attn_export") for op in OPS.values()]


def test_one_screen_and_exit_0_without_gpu_pieces(capsys, no_tensorrt, no_gpu, no_plugin_library):
    code, lines, err = run(capsys)
    assert code == 0 and err == ""
    assert len(lines) <= 10 and all(len(text) < 240 for text in lines)
    assert line(lines, "torch") == ("ok", line(lines, "torch")[1]) and torch.__version__ in line(lines, "torch")[1]
    mark, detail = line(lines, "onnxruntime")
    assert mark == "ok" and "CPUExecutionProvider" in detail
    assert line(lines, "tensorrt") == ("no", tensorrt_runner.NOT_INSTALLED)
    mark, detail = line(lines, "cuda")
    assert mark == "no" and detail.startswith("no CUDA GPU")
    mark, detail = line(lines, "plugins")
    assert mark == "no" and "not built" in detail and tensorrt_runner.PLUGIN_LIB_ENV in detail
    assert lines[-1].startswith("export, fuse and check on onnxruntime work here")


@pytest.mark.parametrize("piece", ["tensorrt", "cuda", "plugins"])
def test_a_required_piece_that_is_missing_exits_1(capsys, no_tensorrt, no_gpu, no_plugin_library, piece):
    code, lines, _ = run(capsys, "--require", piece)
    assert code == 1
    assert line(lines, piece)[0] == "MISSING"
    assert lines[-1] == f"cannot work here: {piece}"
    others = {"tensorrt", "cuda", "plugins"} - {piece}
    assert all(line(lines, other)[0] == "no" for other in others)


def test_old_tensorrt_is_named_with_its_version(capsys, monkeypatch, no_plugin_library):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    code, lines, _ = run(capsys, "--require", "tensorrt")
    assert code == 1
    assert line(lines, "tensorrt") == ("MISSING", "TensorRT 8.6.1 is too old: attn-export needs 10.3 or newer "
                                                  "(IPluginV3 plugins)")


def test_tensorrt_and_gpu_present(capsys, monkeypatch, no_plugin_library):
    fake_tensorrt(monkeypatch, [], version="10.16.1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (8, 7))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Orin")
    code, lines, _ = run(capsys, "--require", "tensorrt", "--require", "cuda")
    assert code == 0
    assert line(lines, "tensorrt") == ("ok", "TensorRT 10.16.1")
    mark, detail = line(lines, "cuda")
    assert mark == "ok" and detail.startswith("Orin (sm_87)")


def test_plugin_library_set_but_missing(capsys, monkeypatch, tmp_path, no_tensorrt):
    monkeypatch.setenv(tensorrt_runner.PLUGIN_LIB_ENV, str(tmp_path / "nope.so"))
    code, lines, _ = run(capsys, "--require", "plugins")
    assert code == 1
    mark, detail = line(lines, "plugins")
    assert mark == "MISSING" and detail.endswith("nope.so: no such file")


def test_plugin_creators_need_tensorrt_to_be_listed(capsys, no_tensorrt, plugin_library):
    code, lines, _ = run(capsys, "--require", "plugins")
    assert code == 1
    assert line(lines, "plugins") == ("MISSING", f"{plugin_library}; its creators cannot be listed: "
                                                 f"{tensorrt_runner.NOT_INSTALLED}")


def test_plugin_creators_are_listed(capsys, monkeypatch, no_gpu, plugin_library):
    fake_tensorrt(monkeypatch, ALL_CREATORS + [("SomeoneElses", "1", "other")])
    code, lines, _ = run(capsys, "--require", "plugins")
    assert code == 0
    mark, detail = line(lines, "plugins")
    assert mark == "ok" and detail.startswith(str(plugin_library))
    for op in OPS.values():
        assert f"{op.op_type} v{op.version}" in detail
    assert "SomeoneElses" not in detail


def test_a_missing_creator_is_named(capsys, monkeypatch, no_gpu, plugin_library):
    dropped = ALL_CREATORS[-1]
    fake_tensorrt(monkeypatch, ALL_CREATORS[:-1])
    code, lines, _ = run(capsys, "--require", "plugins")
    assert code == 1
    mark, detail = line(lines, "plugins")
    assert mark == "MISSING" and detail.endswith(f"missing {dropped[0]} v{dropped[1]}")


def test_a_broken_core_piece_exits_1_without_require(capsys, monkeypatch, no_tensorrt, no_gpu, no_plugin_library):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, lines, _ = run(capsys)
    assert code == 1
    mark, detail = line(lines, "onnxruntime")
    assert mark == "MISSING" and detail.startswith("cannot be imported: ")
    assert lines[-1] == "cannot work here: onnxruntime"


def test_unknown_requirement_is_a_usage_error(capsys):
    code, _, err = run(capsys, "--require", "gpu")
    assert code == 2 and "'gpu' is not one of" in err
