"""attn-export deploy: a Triton model repository whose configs parse with Triton's own protobuf and match the
model files they describe; bad input exits 2 with one line and writes nothing."""
import json
import shutil

import onnx
import pytest

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient (the serve extra)")

from attn_export.backends.engine_manifest import FORMAT  # noqa: E402
from attn_export.deploy import triton_config  # noqa: E402
from attn_export.deploy.repository import deploy  # noqa: E402
from conftest import run_cli as run  # noqa: E402


def specs_of(path):
    return triton_config.onnx_specs(onnx.load(str(path), load_external_data=False))


def test_bigbird_deploys_an_onnxruntime_model_whose_config_matches_the_portable_graph(capsys, bigbird_build, tmp_path):
    out, _ = bigbird_build
    repo = tmp_path / "repo"
    code, stdout, _ = run(capsys, "deploy", out, "--triton-repo", repo, "--name", "bigbird")
    assert code == 0, stdout
    model = repo / "bigbird_onnxruntime"
    config = triton_config.parse_config(model / "config.pbtxt")
    assert config.name == "bigbird_onnxruntime" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert [(i.name, list(i.dims)) for i in config.input] == [("input_ids", [-1, -1])]
    assert [o.dims[-1] for o in config.output] == [2]  # the classifier's two classes
    assert triton_config.config_problems(config, *specs_of(model / "1" / "model.onnx")) == []
    assert (model / "1" / "model.onnx").read_bytes() == (out / "model.fused.portable.onnx").read_bytes()
    assert "skipped bigbird_tensorrt: no engine" in stdout and "tritonserver --model-repository=" in stdout
    info = json.loads((repo / "deploy.json").read_text())
    assert info["models"] == {"bigbird_onnxruntime": "onnxruntime_onnx"} and "bigbird_tensorrt" in info["skipped"]
    assert not list(tmp_path.glob(".repo.stage-*")), "the staging folder must be gone"


def test_max_batch_size_drops_the_batch_axis_and_turns_on_dynamic_batching(bigbird_build, tmp_path):
    out, _ = bigbird_build
    deploy(out, tmp_path / "repo", name="bb", max_batch_size=4, instances=2)
    config = triton_config.parse_config(tmp_path / "repo" / "bb_onnxruntime" / "config.pbtxt")
    assert config.max_batch_size == 4 and config.HasField("dynamic_batching")
    assert [list(i.dims) for i in config.input] == [[-1]] and [list(o.dims) for o in config.output] == [[2]]
    assert config.instance_group[0].count == 2
    assert triton_config.config_problems(config, *specs_of(out / "model.fused.portable.onnx")) == []


def test_validation_names_every_mismatch(bigbird_build, tmp_path):
    out, _ = bigbird_build
    deploy(out, tmp_path / "repo", name="bb")
    path = tmp_path / "repo" / "bb_onnxruntime" / "config.pbtxt"
    path.write_text(path.read_text().replace("TYPE_INT64", "TYPE_INT32").replace("dims: 2", "dims: 3"))
    problems = triton_config.config_problems(triton_config.parse_config(path), *specs_of(out / "model.onnx"))
    assert any("TYPE_INT32 vs the model's TYPE_INT64" in p for p in problems)
    assert any("dims [-1, 3] vs the model's [-1, 2]" in p for p in problems)
    path.write_text("input { name: 'x' data_type: TYPE_NOT_A_TYPE }")
    with pytest.raises(Exception, match="not a Triton model config"):
        triton_config.parse_config(path)


def fake_engine(out, tmp_path, profiles, with_library=True):
    """A build folder with a model.plan and its manifest, as a TensorRT build leaves them (the engine's bytes
    are never read by deploy, only copied)."""
    folder = tmp_path / "with_engine"
    shutil.copytree(out, folder)
    (folder / "model.plan").write_bytes(b"serialized engine")
    library = tmp_path / "libattn_export_plugins.so"
    library.write_bytes(b"\x7fELF attn_export_plugins:contracts=0123456789abcdef;tensorrt=10.3.0")
    manifest = {"format": FORMAT, "engine": "model.plan", "tensorrt": "10.3.0", "precision": "fp16",
                "plugin_library": {"path": str(library) if with_library else str(tmp_path / "gone.so"),
                                   "contracts": "0123456789abcdef"},
                "profiles": [{"input_ids": {"min": lo, "opt": opt, "max": hi}} for lo, opt, hi in profiles]}
    (folder / "model.json").write_text(json.dumps(manifest))
    return folder, library


TWO_BUCKETS = [([1, 64], [4, 128], [8, 256]), ([1, 256], [4, 512], [8, 512])]


def test_an_engine_becomes_a_tensorrt_plan_model_with_its_plugin_and_launch_line(capsys, bigbird_build, tmp_path):
    out, _ = bigbird_build
    folder, library = fake_engine(out, tmp_path, TWO_BUCKETS)
    repo = tmp_path / "repo"
    code, stdout, _ = run(capsys, "deploy", folder, "--triton-repo", repo, "--name", "bb", "--max-batch-size", "8",
                          "--instances", "2")
    assert code == 0, stdout
    config = triton_config.parse_config(repo / "bb_tensorrt" / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 8 and config.HasField("dynamic_batching")
    assert [list(i.dims) for i in config.input] == [[-1]]
    assert [(list(g.profile), g.count) for g in config.instance_group] == [(["0"], 2), (["1"], 2)]
    assert (repo / "bb_tensorrt" / "1" / "model.plan").read_bytes() == b"serialized engine"
    copied = tmp_path / "repo_plugins" / "libattn_export_plugins.so"
    assert copied.read_bytes() == library.read_bytes()
    assert f"LD_PRELOAD={copied}" in stdout and f"--backend-config=tensorrt,plugins={copied}" in stdout
    info = json.loads((repo / "deploy.json").read_text())
    assert info["models"] == {"bb_onnxruntime": "onnxruntime_onnx", "bb_tensorrt": "tensorrt_plan"}


def test_fixed_profile_axes_stay_fixed_in_the_engine_config(bigbird_build, tmp_path):
    out, _ = bigbird_build
    folder, _ = fake_engine(out, tmp_path, [([1, 128], [1, 128], [1, 128])])
    deploy(folder, tmp_path / "repo", name="bb")
    config = triton_config.parse_config(tmp_path / "repo" / "bb_tensorrt" / "config.pbtxt")
    assert [list(i.dims) for i in config.input] == [[1, 128]] and not config.HasField("dynamic_batching")


def test_engine_without_its_plugin_library_is_skipped_with_the_reason(bigbird_build, tmp_path, monkeypatch):
    out, _ = bigbird_build
    from attn_export.backends import tensorrt_runner

    monkeypatch.setattr(tensorrt_runner, "find_plugin_library", lambda: None)
    folder, _ = fake_engine(out, tmp_path, TWO_BUCKETS, with_library=False)
    result = deploy(folder, tmp_path / "repo", name="bb")
    assert list(result.models) == ["bb_onnxruntime"] and "plugin" in result.skipped["bb_tensorrt"]


def test_redeploy_replaces_its_models_and_keeps_the_others(bigbird_build, tmp_path):
    out, _ = bigbird_build
    repo = tmp_path / "repo"
    (repo / "other").mkdir(parents=True)
    (repo / "other" / "config.pbtxt").write_text('name: "other"')
    deploy(out, repo, name="bb", max_batch_size=2)
    deploy(out, repo, name="bb", max_batch_size=0)
    assert (repo / "other" / "config.pbtxt").read_text() == 'name: "other"'
    assert triton_config.parse_config(repo / "bb_onnxruntime" / "config.pbtxt").max_batch_size == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("case", ["no fused graph", "repo is a file", "parent is a file", "bad name", "dot name",
                                  "batch too big", "no batch axis", "negative batch"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(capsys, bigbird_build, tmp_path, case):
    out, _ = bigbird_build
    repo, args, expected = tmp_path / "repo", [], ""
    folder = out
    if case == "no fused graph":
        folder = tmp_path / "empty"
        folder.mkdir()
        expected = "no fused graph"
    elif case == "repo is a file":
        repo.write_text("not a folder")
        expected = "is not a folder"
    elif case == "parent is a file":
        (tmp_path / "afile").write_text("")
        repo, expected = tmp_path / "afile" / "repo", "cannot write beside it"
    elif case in ("bad name", "dot name"):
        args, expected = ["--name", "a/b" if case == "bad name" else ".hidden"], "not one Triton accepts"
    elif case == "batch too big":
        folder, _ = fake_engine(out, tmp_path, TWO_BUCKETS)
        args, expected = ["--max-batch-size", "16"], "stop at a smaller batch"
    elif case == "no batch axis":
        folder, _ = fake_engine(out, tmp_path, TWO_BUCKETS)
        static = onnx.load(str(folder / "model.fused.portable.onnx"))
        static.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
        onnx.save(static, str(folder / "model.fused.portable.onnx"))
        args, expected = ["--max-batch-size", "4"], "no dynamic batch axis"
    else:
        args, expected = ["--max-batch-size", "-1"], "--max-batch-size must be 0"
    before = listing(tmp_path)
    code, stdout, err = run(capsys, "deploy", folder, "--triton-repo", repo, *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert listing(tmp_path) == before, "nothing may be left behind"
