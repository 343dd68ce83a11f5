"""ONNX files in and out: malformed files and hostile or missing external data are one-line refusals that read
nothing outside the model's folder; graphs over protobuf's limit are written with external data, atomically."""
import builtins
import io
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from attn_export import external_data
from attn_export.errors import UserError
from attn_export.export import load_onnx, save_onnx

WEIGHT = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096


def matmul_model() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 64])],
                              [numpy_helper.from_array(WEIGHT, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def with_external_weight(path: Path, location: str, **entries) -> Path:
    """Write a model whose weight lives at `location` (the file itself is the caller's business)."""
    model = matmul_model()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in {"location": location, **entries}.items():
        tensor.external_data.add(key=key, value=str(value))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def opened(monkeypatch):
    """Every file path opened from Python while the test runs."""
    paths = []
    real_open = io.open

    def spy(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            paths.append(Path(file).resolve())
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    return paths


def assert_refused(path: Path, *expected: str) -> str:
    with pytest.raises(UserError) as info:
        load_onnx(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for text in expected:
        assert text in message
    return message


# ------------------------------------------------------------------------------------------ external data read

def test_external_data_beside_the_model_loads(tmp_path):
    path = with_external_weight(tmp_path / "m.onnx", "w.bin")
    (tmp_path / "w.bin").write_bytes(WEIGHT.tobytes())
    model = load_onnx(path)
    tensor = model.graph.initializer[0]
    assert tensor.data_location == onnx.TensorProto.DEFAULT and not tensor.external_data
    np.testing.assert_array_equal(numpy_helper.to_array(tensor), WEIGHT)


def test_external_data_in_a_subfolder_at_an_offset_loads(tmp_path):
    path = with_external_weight(tmp_path / "m.onnx", "weights/all.bin", offset=8, length=WEIGHT.nbytes)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "all.bin").write_bytes(b"12345678" + WEIGHT.tobytes() + b"trailer")
    np.testing.assert_array_equal(numpy_helper.to_array(load_onnx(path).graph.initializer[0]), WEIGHT)


def test_a_symlink_that_stays_inside_the_folder_is_followed(tmp_path):
    path = with_external_weight(tmp_path / "m.onnx", "link.bin")
    (tmp_path / "real.bin").write_bytes(WEIGHT.tobytes())
    (tmp_path / "link.bin").symlink_to(tmp_path / "real.bin")
    np.testing.assert_array_equal(numpy_helper.to_array(load_onnx(path).graph.initializer[0]), WEIGHT)


def escape_with_dots(model_dir: Path, outside: Path) -> str:
    return os.path.relpath(outside, model_dir)


def escape_absolute(model_dir: Path, outside: Path) -> str:
    return str(outside)


def escape_through_dots_inside(model_dir: Path, outside: Path) -> str:
    return "sub/../../" + outside.parent.name + "/" + outside.name


def escape_by_file_symlink(model_dir: Path, outside: Path) -> str:
    (model_dir / "w.bin").symlink_to(outside)
    return "w.bin"


def escape_by_folder_symlink(model_dir: Path, outside: Path) -> str:
    (model_dir / "weights").symlink_to(outside.parent, target_is_directory=True)
    return "weights/" + outside.name


ESCAPES = [(escape_with_dots, "points outside the model's folder"), (escape_absolute, "absolute path"),
           (escape_through_dots_inside, "points outside the model's folder"),
           (escape_by_file_symlink, "a symlink leads outside"), (escape_by_folder_symlink, "a symlink leads outside")]


@pytest.mark.parametrize("escape, expected", ESCAPES, ids=[e.__name__ for e, _ in ESCAPES])
def test_external_data_outside_the_folder_is_refused_unread(tmp_path, opened, escape, expected):
    model_dir, outside = tmp_path / "model", tmp_path / "secrets" / "w.bin"
    outside.parent.mkdir()
    outside.write_bytes(WEIGHT.tobytes())  # a perfectly good weight: only its place is wrong
    model_dir.mkdir()
    path = with_external_weight(model_dir / "m.onnx", escape(model_dir, outside))
    opened.clear()
    assert_refused(path, "refusing external data of tensor 'w'", expected)
    assert path.resolve() in opened, "the spy sees what the loader opens"
    assert outside.resolve() not in opened, "the loader opened a file outside the model's folder"
    assert all(p.is_relative_to(model_dir.resolve()) for p in opened)


@pytest.mark.parametrize("location", ["C:\\weights\\w.bin", "\\\\server\\share\\w.bin"])
def test_windows_absolute_locations_are_refused(tmp_path, location):
    assert_refused(with_external_weight(tmp_path / "m.onnx", location), "absolute path")


def test_missing_external_data_is_one_line(tmp_path):
    assert_refused(with_external_weight(tmp_path / "m.onnx", "w.bin"), "external data file 'w.bin'", "is missing")


def test_external_data_past_the_end_of_its_file(tmp_path):
    path = with_external_weight(tmp_path / "m.onnx", "w.bin", offset=0, length=WEIGHT.nbytes)
    (tmp_path / "w.bin").write_bytes(WEIGHT.tobytes()[:1000])
    assert_refused(path, "runs past the end of 'w.bin' (1000 bytes)")


def test_external_data_of_the_wrong_size(tmp_path):
    path = with_external_weight(tmp_path / "m.onnx", "w.bin")
    (tmp_path / "w.bin").write_bytes(WEIGHT.tobytes()[:1000])
    assert_refused(path, "holds 1000 bytes, its shape [64, 64] needs 16384")


@pytest.mark.parametrize("entries, expected", [({"offset": "ten"}, "malformed offset or length"),
                                               ({"offset": -4}, "runs past the end")])
def test_malformed_external_data_entries(tmp_path, entries, expected):
    path = with_external_weight(tmp_path / "m.onnx", "w.bin", **entries)
    (tmp_path / "w.bin").write_bytes(WEIGHT.tobytes())
    assert_refused(path, expected)


def test_external_data_that_is_a_folder(tmp_path):
    path = with_external_weight(tmp_path / "m.onnx", "w.bin")
    (tmp_path / "w.bin").mkdir()
    assert_refused(path, "is not a regular file")


def test_graph_over_the_protobuf_limit_is_refused_before_reading(tmp_path, monkeypatch, opened):
    path = with_external_weight(tmp_path / "m.onnx", "w.bin")
    (tmp_path / "w.bin").write_bytes(WEIGHT.tobytes())
    monkeypatch.setattr(external_data, "PROTOBUF_LIMIT", WEIGHT.nbytes)  # as if the weight were 2 GiB
    opened.clear()
    assert_refused(path, "over protobuf's 2 GiB limit")
    assert path.resolve() in opened and (tmp_path / "w.bin").resolve() not in opened


# ------------------------------------------------------------------------------------------ malformed files

def make_garbage(path):
    path.write_bytes(b"\x00\x01garbage" * 10)


def make_truncated(path):
    data = matmul_model().SerializeToString()
    path.write_bytes(data[: len(data) // 2])


def make_empty(path):
    path.write_bytes(b"")


def make_folder(path):
    path.mkdir()


def make_dangling_input(path):
    model = matmul_model()
    model.graph.node[0].input[1] = "nowhere"
    path.write_bytes(model.SerializeToString())


def make_unknown_op(path):
    model = matmul_model()
    model.graph.node[0].op_type = "NoSuchOp"
    path.write_bytes(model.SerializeToString())


def make_future_ir(path):
    model = matmul_model()
    model.ir_version = 99
    path.write_bytes(model.SerializeToString())


MALFORMED = [(make_garbage, "not"), (make_truncated, "not a readable ONNX model"), (make_empty, "empty file"),
             (make_folder, "not a file"), (make_dangling_input, "not a valid ONNX model"),
             (make_unknown_op, "not a valid ONNX model"), (make_future_ir, "not a valid ONNX model")]


@pytest.mark.parametrize("make, expected", MALFORMED, ids=[m.__name__[5:] for m, _ in MALFORMED])
def test_malformed_onnx_is_one_line(tmp_path, make, expected):
    path = tmp_path / "m.onnx"
    make(path)
    assert_refused(path, expected)


def test_missing_file(tmp_path):
    assert_refused(tmp_path / "nope.onnx", "no such file")


# ------------------------------------------------------------------------------------------ writing

def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_small_graph_is_one_file_with_the_usual_permissions(tmp_path):
    save_onnx(matmul_model(), tmp_path / "m.onnx")
    assert files(tmp_path) == ["m.onnx"]
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert load_onnx(tmp_path / "m.onnx").SerializeToString() == matmul_model().SerializeToString()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_graph_over_the_limit_is_saved_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(external_data, "PROTOBUF_LIMIT", 4096)  # the 16 KiB weight now counts as "over 2 GiB"
    model = matmul_model()
    before = model.SerializeToString()
    save_onnx(model, tmp_path / "m.onnx")
    assert model.SerializeToString() == before, "saving must not change the model in memory"
    names = files(tmp_path)
    assert len(names) == 2 and names[0] == "m.onnx" and names[1].startswith("m.onnx.") and names[1].endswith(".data")
    assert (tmp_path / "m.onnx").stat().st_size < 1024
    # any runtime reads it from the file; ours reads it back whole
    x = np.ones((2, 64), np.float32)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ WEIGHT, rtol=1e-6)
    monkeypatch.setattr(external_data, "PROTOBUF_LIMIT", 2**31 - 1)
    assert load_onnx(tmp_path / "m.onnx").SerializeToString() == before


def test_saving_again_replaces_the_data_file(tmp_path, monkeypatch):
    monkeypatch.setattr(external_data, "PROTOBUF_LIMIT", 4096)
    save_onnx(matmul_model(), tmp_path / "m.onnx")
    first = files(tmp_path)
    save_onnx(matmul_model(), tmp_path / "m.onnx")
    second = files(tmp_path)
    assert len(second) == 2 and second != first, "a new data file, and the old one gone"
    monkeypatch.setattr(external_data, "PROTOBUF_LIMIT", 2**31 - 1)
    save_onnx(matmul_model(), tmp_path / "m.onnx")  # small again: no data file is needed any more
    assert files(tmp_path) == ["m.onnx"]


def test_save_killed_between_data_and_graph_keeps_the_previous_pair(tmp_path, monkeypatch):
    monkeypatch.setattr(external_data, "PROTOBUF_LIMIT", 4096)
    save_onnx(matmul_model(), tmp_path / "m.onnx")
    previous = {name: (tmp_path / name).read_bytes() for name in files(tmp_path)}

    real = external_data.atomic_path
    calls = []

    def dies_on_the_graph(final):
        calls.append(Path(final).name)
        if Path(final).name == "m.onnx":
            raise KeyboardInterrupt  # the process dies after the new data file is in place
        return real(final)

    monkeypatch.setattr(external_data, "atomic_path", dies_on_the_graph)
    changed = matmul_model()
    changed.graph.initializer[0].CopyFrom(numpy_helper.from_array(WEIGHT * 2, "w"))
    with pytest.raises(KeyboardInterrupt):
        save_onnx(changed, tmp_path / "m.onnx")
    assert calls[-1] == "m.onnx"
    for name, data in previous.items():  # the old graph and the data file it names are untouched
        assert (tmp_path / name).read_bytes() == data
    monkeypatch.setattr(external_data, "PROTOBUF_LIMIT", 2**31 - 1)
    np.testing.assert_array_equal(numpy_helper.to_array(load_onnx(tmp_path / "m.onnx").graph.initializer[0]), WEIGHT)
    assert not [n for n in files(tmp_path) if n.endswith(".tmp")]

    monkeypatch.setattr(external_data, "atomic_path", real)
    monkeypatch.setattr(external_data, "PROTOBUF_LIMIT", 4096)
    save_onnx(changed, tmp_path / "m.onnx")  # running it again succeeds and clears the orphan
    assert len(files(tmp_path)) == 2
    monkeypatch.setattr(external_data, "PROTOBUF_LIMIT", 2**31 - 1)
    got = numpy_helper.to_array(load_onnx(tmp_path / "m.onnx").graph.initializer[0])
    np.testing.assert_array_equal(got, WEIGHT * 2)


def test_unwritable_destination_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"m\.onnx: cannot write it: "):
        save_onnx(matmul_model(), tmp_path / "file" / "m.onnx")
