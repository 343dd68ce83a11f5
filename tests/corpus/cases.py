"""The bad inputs, made at test time: each maker writes `path` (a model.pt or model.onnx in its own folder) and
the expected fragment of the one-line error says what attn-export must report.

Pickles that carry code would create `marker` when unpickled: the tests check it never appears.
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

HERE = Path(__file__).parent
REFUSED_CODE = "refusing to load: it contains Python objects other than tensors and plain data"


class WritesMarker:
    """Unpickling this calls open(marker, "w")."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def copy_static(name: str):
    def make(path: Path, marker: Path, base: dict) -> None:
        shutil.copyfile(HERE / name, path)
    make.__name__ = f"make_{Path(name).stem}"
    return make


def _save(path: Path, payload) -> None:
    torch.save(payload, path)


def _with(base: dict, **changes) -> dict:
    payload = {**base, "config": dict(base["config"]), "example": dict(base["example"])}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            payload[section][field] = value
        else:
            payload[section] = value
    return payload


# ------------------------------------------------------------------------------------------------ model.pt
# `base` is a valid small BigBird zoo checkpoint, loaded as a plain dict.

def make_missing(path, marker, base):
    pass


def make_folder(path, marker, base):
    path.mkdir()


def make_empty(path, marker, base):
    path.write_bytes(b"")


def make_random_bytes(path, marker, base):
    path.write_bytes(b"\x00" + np.random.default_rng(0).bytes(4095))


def make_truncated(path, marker, base):
    buffer = io.BytesIO()
    torch.save(base, buffer)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def make_foreign_zip(path, marker, base):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")


def make_numpy_file(path, marker, base):
    with path.open("wb") as f:
        np.save(f, np.zeros(3))


def make_onnx_named_pt(path, marker, base):
    path.write_bytes(tiny_graph().SerializeToString())


def make_bare_code_pickle(path, marker, base):
    path.write_bytes(pickle.dumps({"state_dict": WritesMarker(marker)}))


def make_zip_code_pickle(path, marker, base):
    _save(path, _with(base, config=WritesMarker(marker)))


def make_legacy_code_pickle(path, marker, base):
    torch.save({"x": WritesMarker(marker)}, path, _use_new_zipfile_serialization=False)


def make_pickled_module(path, marker, base):
    _save(path, torch.nn.Linear(2, 2))


def make_plain_state_dict(path, marker, base):
    _save(path, base["state_dict"])


def make_unknown_arch(path, marker, base):
    _save(path, _with(base, arch="no-such-arch"))


def make_negative_heads(path, marker, base):
    _save(path, _with(base, config__num_heads=-4))


def make_zero_hidden(path, marker, base):
    _save(path, _with(base, config__hidden=0))


def make_zero_features(path, marker, base):
    _save(path, _with(base, arch="performer", config={"num_features": 0}, state_dict={}))


def make_length_not_a_block_multiple(path, marker, base):
    _save(path, _with(base, example__seq_len=base["config"]["block_size"] * 8 + 3))


def make_config_asking_for_terabytes(path, marker, base):
    _save(path, _with(base, config__hidden=2**20, config__num_heads=1))


def make_batch_out_of_range(path, marker, base):
    _save(path, _with(base, example__batch=10**9))


def make_config_of_the_wrong_type(path, marker, base):
    _save(path, _with(base, config__num_layers="two"))


def make_weights_of_another_config(path, marker, base):
    _save(path, _with(base, config__num_layers=base["config"]["num_layers"] + 1))


CHECKPOINTS = [
    (make_missing, "no such file"),
    (make_folder, "not a Hugging Face model folder (no config.json in it)"),
    (make_empty, "empty file"),
    (make_random_bytes, "not a model file: neither a zip archive nor a pickle"),
    (copy_static("html_error_page.txt"), "not a model file"),
    (copy_static("git_lfs_pointer.txt"), "not a model file"),
    (make_truncated, "truncated or corrupt"),
    (make_foreign_zip, "truncated or corrupt checkpoint"),
    (make_numpy_file, "not a model file"),
    (make_onnx_named_pt, "not a model file"),
    (make_bare_code_pickle, REFUSED_CODE),
    (make_zip_code_pickle, REFUSED_CODE),
    (make_legacy_code_pickle, REFUSED_CODE),
    (make_pickled_module, REFUSED_CODE),
    (make_plain_state_dict, "not an attn-export checkpoint"),
    (make_unknown_arch, "unknown architecture 'no-such-arch'"),
    (make_negative_heads, "invalid bigbird config: num_heads must be positive, got -4"),
    (make_zero_hidden, "invalid bigbird config: hidden must be positive, got 0"),
    (make_zero_features, "invalid performer config: num_features must be positive, got 0"),
    (make_length_not_a_block_multiple, "multiple of block_size"),
    (make_config_asking_for_terabytes, "config and weights do not match"),
    (make_batch_out_of_range, "example batch 1000000000 is over"),
    (make_config_of_the_wrong_type, "config field 'num_layers' must be int"),
    (make_weights_of_another_config, "state dict does not match bigbird with this config: missing layers."),
]


# ------------------------------------------------------------------------------------------------ model.onnx

WEIGHT = np.ones((8, 8), np.float32)


def tiny_graph() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 8])],
                              [numpy_helper.from_array(WEIGHT, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _external(path: Path, location: str) -> None:
    model = tiny_graph()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    path.write_bytes(model.SerializeToString())


def _secret(path: Path) -> Path:
    """A file beside the model's folder, of exactly the weight's size: reading it would 'work'."""
    secret = path.parent.parent / "secret.bin"
    secret.write_bytes(WEIGHT.tobytes())
    return secret


def make_graph_garbage(path, marker, base):
    path.write_bytes(b"\x00\x01garbage" * 10)


def make_graph_truncated(path, marker, base):
    data = tiny_graph().SerializeToString()
    path.write_bytes(data[: len(data) - 20])


def make_checkpoint_named_onnx(path, marker, base):
    _save(path, base)


def make_graph_with_dangling_input(path, marker, base):
    model = tiny_graph()
    model.graph.node[0].input[0] = "nowhere"
    path.write_bytes(model.SerializeToString())


def make_external_data_up_and_out(path, marker, base):
    _secret(path)
    _external(path, "../secret.bin")


def make_external_data_absolute(path, marker, base):
    _external(path, str(_secret(path)))


def make_external_data_through_symlink(path, marker, base):
    os.symlink(_secret(path), path.parent / "w.bin")
    _external(path, "w.bin")


def make_external_data_missing(path, marker, base):
    _external(path, "w.bin")


GRAPHS = [
    (make_missing, "no such file"),
    (make_folder, "not a file"),
    (make_empty, "empty file"),
    (make_graph_garbage, "not"),
    (make_graph_truncated, "not a readable ONNX model"),
    (copy_static("html_error_page.txt"), "not"),
    (copy_static("git_lfs_pointer.txt"), "not"),
    (make_checkpoint_named_onnx, "not"),
    (make_graph_with_dangling_input, "not a valid ONNX model"),
    (make_external_data_up_and_out, "points outside the model's folder"),
    (make_external_data_absolute, "absolute path"),
    (make_external_data_through_symlink, "a symlink leads outside the model's folder"),
    (make_external_data_missing, "external data file 'w.bin' of tensor 'w' is missing"),
]
