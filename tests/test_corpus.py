"""The bad-input corpus (tests/corpus) through the command line, as a user meets it: one line
`error: <file>: <problem>`, exit code 2, no traceback, nothing written, no code from the file run. Then
interrupted builds: no half-written file under a final name, and the same build run again succeeds."""
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from attn_export.backends import tensorrt_runner
from attn_export.export import load_onnx
from attn_export.loading import save_zoo_checkpoint
from conftest import small_config, run_cli as run
from corpus.cases import CHECKPOINTS, GRAPHS, tiny_graph

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    """A valid small BigBird checkpoint: the makers damage copies of it."""
    entry, config = small_config("bigbird")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "model.pt"
    save_zoo_checkpoint(path, "bigbird", config, entry.build(config).state_dict(), batch=1,
                        seq_len=entry.parity_seq_lens(config)[0])
    return path


@pytest.fixture
def folders(tmp_path):
    """(model folder, output folder holding one valid graph); the marker sits where a pickle would write it."""
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    (outputs / "good.onnx").write_bytes(tiny_graph().SerializeToString())
    return inputs, outputs, tmp_path / "ran.marker"


def assert_refused(code, out, err, path, expected, outputs, marker):
    assert code == 2, out + err
    assert err.startswith(f"error: {path}: ") and err.count("\n") == 1, err
    assert expected in err
    assert "Traceback" not in out + err
    assert sorted(p.name for p in outputs.rglob("*")) == ["good.onnx"], "nothing may be written"
    assert not marker.exists(), "code from the file ran"


CHECKPOINT_COMMANDS = {
    "export": lambda model, out: ["export", model, "-o", out / "model.onnx"],
    "build": lambda model, out: ["build", model, "-o", out / "build", "--no-engine"],
    "check": lambda model, out: ["check", model, "--onnx", out / "good.onnx"],
}


@pytest.mark.parametrize("command", list(CHECKPOINT_COMMANDS))
@pytest.mark.parametrize("make, expected", CHECKPOINTS, ids=[m.__name__[5:] for m, _ in CHECKPOINTS])
def test_bad_checkpoint(capsys, folders, base_checkpoint, make, expected, command):
    inputs, outputs, marker = folders
    path = inputs / "model.pt"
    make(path, marker, torch.load(base_checkpoint, weights_only=True))
    code, out, err = run(capsys, *CHECKPOINT_COMMANDS[command](path, outputs))
    assert_refused(code, out, err, path, expected, outputs, marker)


GRAPH_COMMANDS = {
    "fuse": lambda graph, out, ckpt: ["fuse", graph, "-o", out / "fused.onnx", "--report", out / "fusion.json"],
    "check graphs": lambda graph, out, ckpt: ["check", graph, out / "good.onnx"],
    "check against torch": lambda graph, out, ckpt: ["check", ckpt, "--onnx", graph],
}


@pytest.mark.parametrize("command", list(GRAPH_COMMANDS))
@pytest.mark.parametrize("make, expected", GRAPHS, ids=[m.__name__[5:] for m, _ in GRAPHS])
def test_bad_graph(capsys, folders, base_checkpoint, make, expected, command):
    inputs, outputs, marker = folders
    path = inputs / "model.onnx"
    make(path, marker, torch.load(base_checkpoint, weights_only=True))
    code, out, err = run(capsys, *GRAPH_COMMANDS[command](path, outputs, base_checkpoint))
    assert_refused(code, out, err, path, expected, outputs, marker)


# ------------------------------------------------------------------------------------------------ interrupted

@pytest.fixture(scope="module")
def performer_checkpoint(tmp_path_factory) -> Path:
    """A one-layer Performer: the quickest full build (TorchScript export)."""
    entry, config = small_config("performer")
    config.num_layers = 1
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("performer") / "model.pt"
    save_zoo_checkpoint(path, "performer", config, entry.build(config).state_dict(), batch=1,
                        seq_len=entry.parity_seq_lens(config)[0])
    return path


def build_args(checkpoint, out):
    return ["build", checkpoint, "-o", out, "--exporter", "torchscript", "--no-engine"]


FINAL_NAMES = ("model.onnx", "model.fused.onnx", "model.fused.portable.onnx", "parity.npz", "report.json")


def assert_complete(out: Path) -> list[str]:
    """Every file under a final name is whole (it parses); anything else is a leftover temporary."""
    finals = []
    for path in sorted(out.iterdir()):
        if path.name.startswith("."):
            assert path.name.endswith(".tmp"), path.name
            continue
        assert path.name in FINAL_NAMES, path.name
        if path.suffix == ".onnx":
            load_onnx(path)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                assert data.files
        else:
            json.loads(path.read_text())
        finals.append(path.name)
    return finals


def test_the_same_build_twice(capsys, tmp_path, performer_checkpoint):
    out = tmp_path / "out"
    for _ in range(2):
        code, stdout, _ = run(capsys, *build_args(performer_checkpoint, out))
        assert code == 0, stdout
        assert assert_complete(out) == sorted(FINAL_NAMES)
        assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_build_interrupted_before_a_rename_keeps_the_previous_file(capsys, tmp_path, monkeypatch,
                                                                   performer_checkpoint):
    out = tmp_path / "out"
    assert run(capsys, *build_args(performer_checkpoint, out))[0] == 0
    before = {name: (out / name).read_bytes() for name in FINAL_NAMES}

    real_replace = os.replace

    def dies_on_the_fused_graph(src, dst, *args, **kwargs):
        if Path(dst).name == "model.fused.onnx":
            raise KeyboardInterrupt  # Ctrl-C between writing the temporary file and renaming it
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", dies_on_the_fused_graph)
    code, _, err = run(capsys, *build_args(performer_checkpoint, out))
    assert code == 130 and "aborted" in err
    assert (out / "model.fused.onnx").read_bytes() == before["model.fused.onnx"]
    assert (out / "report.json").read_bytes() == before["report.json"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "the temporary file is cleaned up"

    monkeypatch.setattr(os, "replace", real_replace)
    assert run(capsys, *build_args(performer_checkpoint, out))[0] == 0
    assert assert_complete(out) == sorted(FINAL_NAMES)


def test_build_killed_outright_leaves_only_whole_files_and_runs_again(capsys, tmp_path, performer_checkpoint):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "attn_export.cli", *map(str, build_args(performer_checkpoint,
                                                                                              out))],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "model.onnx").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        process.kill()  # SIGKILL: no cleanup runs, as with an OOM kill or a power cut
    finally:
        process.wait()
    assert (out / "model.onnx").exists(), "the build never got as far as its first file"
    assert "model.onnx" in assert_complete(out)

    assert run(capsys, *build_args(performer_checkpoint, out))[0] == 0
    assert {"model.onnx", "model.fused.onnx", "report.json"} <= set(assert_complete(out))


def test_engine_and_manifest_never_disagree(tmp_path, monkeypatch):
    engine = tmp_path / "model.plan"
    manifest = tensorrt_runner.manifest_path(engine)
    tensorrt_runner._write_engine(engine, b"engine one", {"fp16": False})
    written = json.loads(manifest.read_text())
    assert written["engine"] == "model.plan" and written["fp16"] is False
    assert written["engine_sha256"] == hashlib.sha256(b"engine one").hexdigest() and written["engine_bytes"] == 10

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tensorrt_runner, "write_json", dies)  # killed after the engine, before its manifest
    with pytest.raises(KeyboardInterrupt):
        tensorrt_runner._write_engine(engine, b"engine two", {})
    assert engine.read_bytes() == b"engine two" and not manifest.exists(), "no manifest of the old engine remains"

    monkeypatch.undo()
    tensorrt_runner._write_engine(engine, b"engine two", {})
    assert json.loads(manifest.read_text())["engine_sha256"] == hashlib.sha256(b"engine two").hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.plan"]
