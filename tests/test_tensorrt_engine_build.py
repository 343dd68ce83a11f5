"""The TensorRT backend's plumbing against a stand-in `tensorrt` module: precision flags, TF32 off for fp32,
optimization profiles, the timing cache, the manifest beside the engine, the refusal of a foreign engine, and
api.build's engine step with its parity check. The stand-in records calls; it builds nothing, so these tests say
nothing about TensorRT itself (that needs TensorRT and a GPU)."""
import importlib.machinery
import json
import sys
import types

import numpy as np
import pytest
import torch

from attn_export import api, plugin_contracts
from attn_export.backends import engine_manifest, tensorrt_runner
from attn_export.backends.tensorrt_profiles import ProfileRequest
from attn_export.errors import UserError


def fake_tensorrt(version="10.3.0.30", flags=("FP16", "BF16", "TF32"), inputs=(("input_ids", (-1, -1)),)):
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch.export looks modules up by spec
    trt.__version__ = version
    trt.calls = []

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    trt.ILogger = ILogger
    trt.BuilderFlag = types.SimpleNamespace(**{f: f for f in flags})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        num_inputs = len(inputs)

        def get_input(self, i):
            return Tensor(*inputs[i])

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return b"CACHE:" + self.data

    class Config:
        def __init__(self):
            self.cache = None

        def set_memory_pool_limit(self, pool, size):
            trt.calls.append(("pool", pool, size))

        def set_flag(self, flag):
            trt.calls.append(("set_flag", flag))

        def clear_flag(self, flag):
            trt.calls.append(("clear_flag", flag))

        def create_timing_cache(self, data):
            trt.calls.append(("create_timing_cache", bytes(data)))
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            trt.calls.append(("profile", dict(profile.shapes)))

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"ENGINE-" + trt.__version__.encode()

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            trt.calls.append(("parse", path))
            return True

    class Registry:
        def load_library(self, path):
            trt.calls.append(("load_library", path))
            return object()

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    trt.get_plugin_registry = lambda: Registry()
    return trt


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv(engine_manifest.CACHE_DIR_ENV, str(tmp_path / "cache"))
    # TensorRT "available" without touching torch.cuda (torch.export must not think a GPU is there)
    monkeypatch.setattr(tensorrt_runner, "tensorrt_status", lambda: (True, "TensorRT (stand-in)"))
    monkeypatch.setattr(engine_manifest, "machine_facts", lambda: {
        "cuda_runtime": "12.6", "cuda_driver": "12.6", "gpu": "Orin", "compute_capability": "8.7"})
    monkeypatch.setattr(tensorrt_runner, "_loaded_plugin_libraries", {})
    library = tmp_path / "libattn_export_plugins.so"
    library.write_bytes(b"\x7fELF attn_export_plugins:contracts=" + plugin_contracts.contracts_digest().encode()
                        + b";tensorrt=10.3.0\x00")

    def install(trt):
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt

    return types.SimpleNamespace(tmp=tmp_path, library=library, install=install)


PROFILES = [{"input_ids": ((1, 1), (1, 128), (1, 128))}, {"input_ids": ((1, 129), (1, 512), (1, 512))}]


def test_build_writes_engine_manifest_and_timing_cache(env):
    trt = env.install(fake_tensorrt())
    engine = tensorrt_runner.build_engine(env.tmp / "model.fused.onnx", env.tmp / "model.plan",
                                          plugin_library=env.library, profiles=PROFILES, precision="fp16")
    assert engine.read_bytes() == b"ENGINE-10.3.0.30"
    assert ("set_flag", "FP16") in trt.calls and ("load_library", str(env.library.resolve())) in trt.calls
    assert [c[1] for c in trt.calls if c[0] == "profile"] == PROFILES
    manifest = json.loads((env.tmp / "model.json").read_text())
    assert manifest["format"] == engine_manifest.FORMAT and manifest["engine"] == "model.plan"
    assert manifest["tensorrt"] == "10.3.0.30" and manifest["sm"] == "sm_87" and manifest["precision"] == "fp16"
    assert manifest["plugin_library"]["contracts"] == plugin_contracts.contracts_digest()
    assert manifest["profiles"][1] == {"input_ids": {"min": [1, 129], "opt": [1, 512], "max": [1, 512]}}
    assert manifest["engine_bytes"] == len(b"ENGINE-10.3.0.30")
    cache = env.tmp / "cache" / "tensorrt" / "timing-10.3.0.30-sm_87.cache"
    assert manifest["timing_cache"] == str(cache) and cache.read_bytes() == b"CACHE:"
    # the next build starts from the saved cache
    tensorrt_runner.build_engine(env.tmp / "model.fused.onnx", env.tmp / "model.plan", plugin_library=env.library,
                                 profiles=PROFILES, precision="fp16")
    assert ("create_timing_cache", b"CACHE:") in trt.calls


def test_fp32_turns_tf32_off_and_bf16_sets_its_flag(env):
    trt = env.install(fake_tensorrt())
    tensorrt_runner.build_engine(env.tmp / "m.onnx", env.tmp / "m.plan", plugin_library=None, profiles=PROFILES,
                                 timing_cache=None)
    assert ("clear_flag", "TF32") in trt.calls and not any(c[0] == "set_flag" for c in trt.calls)
    assert not any(c[0] == "create_timing_cache" for c in trt.calls)
    trt.calls.clear()
    tensorrt_runner.build_engine(env.tmp / "m.onnx", env.tmp / "m.plan", plugin_library=None, profiles=PROFILES,
                                 precision="bf16", timing_cache=env.tmp / "mine.cache")
    assert ("set_flag", "BF16") in trt.calls and (env.tmp / "mine.cache").is_file()
    trt.calls.clear()
    tensorrt_runner.build_engine(env.tmp / "m.onnx", env.tmp / "m.plan", plugin_library=None, profiles=PROFILES,
                                 fp16=True)  # the bench command's spelling
    assert ("set_flag", "FP16") in trt.calls


def test_strongly_typed_tensorrt_follows_the_graph(env):
    from onnx import TensorProto, helper, save

    env.install(fake_tensorrt(version="11.1.0", flags=("TF32",)))
    graph = helper.make_graph([], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])], [])
    save(helper.make_model(graph), env.tmp / "fp32.onnx")
    with pytest.raises(UserError, match="TensorRT 11.1.0 is strongly typed .* export the model in float16"):
        tensorrt_runner.build_engine(env.tmp / "fp32.onnx", env.tmp / "m.plan", plugin_library=None,
                                     profiles=PROFILES, precision="fp16")
    assert not (env.tmp / "m.plan").exists()
    graph = helper.make_graph([], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4])], [])
    save(helper.make_model(graph), env.tmp / "fp16.onnx")
    tensorrt_runner.build_engine(env.tmp / "fp16.onnx", env.tmp / "m.plan", plugin_library=None, profiles=PROFILES,
                                 precision="fp16")
    assert json.loads((env.tmp / "m.json").read_text())["precision"] == "fp16"


def test_runner_refuses_an_engine_from_another_machine(env, monkeypatch):
    env.install(fake_tensorrt())
    tensorrt_runner.build_engine(env.tmp / "m.onnx", env.tmp / "model.plan", plugin_library=env.library,
                                 profiles=PROFILES)
    env.install(fake_tensorrt(version="10.16.1"))
    monkeypatch.setattr(engine_manifest, "machine_facts", lambda: {
        "cuda_runtime": "12.8", "cuda_driver": "12.8", "gpu": "NVIDIA H100", "compute_capability": "9.0"})
    with pytest.raises(UserError) as info:
        tensorrt_runner.TensorRTRunner(env.tmp / "model.plan", plugin_library=env.library)
    message = str(info.value)
    assert "\n" not in message and "this engine cannot run here" in message
    assert "built with TensorRT 10.3.0.30, this machine has TensorRT 10.16.1" in message and "sm_90" in message


def test_runner_refuses_a_plugin_library_with_other_contracts(env):
    env.install(fake_tensorrt())
    tensorrt_runner.build_engine(env.tmp / "m.onnx", env.tmp / "model.plan", plugin_library=env.library,
                                 profiles=PROFILES)
    stale = env.tmp / "old.so"
    stale.write_bytes(b"attn_export_plugins:contracts=0000000000000000;tensorrt=10.3.0")
    with pytest.raises(UserError, match="its plugins follow op contracts .* follows 0000000000000000"):
        tensorrt_runner.TensorRTRunner(env.tmp / "model.plan", plugin_library=stale)


# ------------------------------------------------------------------------------------------------ api.build
class EchoRunner:
    """Stands in for TensorRTRunner: answers with torch's outputs (plus an error, to test tolerances)."""

    def __init__(self, module, names, error=0.0):
        self.module, self.names, self.error, self.name, self.label, self.seen = module, names, error, "tensorrt", \
            "model.plan", []

    def run(self, feeds):
        self.seen.append({k: v.shape for k, v in feeds.items()})
        with torch.no_grad():
            out = self.module(*(torch.from_numpy(feeds[n]) for n in self.names))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {f"out{i}": o.numpy() + self.error for i, o in enumerate(outs)}


@pytest.fixture
def small_model():
    from conftest import small_config

    entry, config = small_config("performer")
    torch.manual_seed(0)
    module = entry.build(config).eval()
    lengths = entry.parity_seq_lens(config)
    parity = [(f"seq_len={n}", entry.example_inputs(config, 1, n)) for n in lengths]
    return module, parity, dict(entry.dynamic_axes), lengths


@pytest.mark.parametrize("precision, error, passed", [("fp32", 0.0, True), ("fp16", 5e-3, True),
                                                      ("fp32", 5e-3, False)])
def test_api_build_checks_the_engine_against_torch(env, monkeypatch, tmp_path, small_model, precision, error, passed):
    module, parity, dynamic_axes, lengths = small_model
    env.install(fake_tensorrt())
    monkeypatch.setattr(tensorrt_runner, "find_plugin_library", lambda: env.library)
    names = list(parity[0][1])
    runner = EchoRunner(module, names, error)
    monkeypatch.setattr(tensorrt_runner, "TensorRTRunner", lambda path, plugin_library=None: runner)
    result = api.build(module, parity[0][1], tmp_path / "out", dynamic_axes=dynamic_axes, parity_inputs=parity,
                       precision=precision)
    assert result.engine["path"] == str(tmp_path / "out" / "model.plan") and result.engine["reason"] == ""
    assert result.engine["precision"] == precision
    assert result.engine["manifest"] == str(tmp_path / "out" / "model.json")
    engine_rows = [p for p in result.parity if p.backend == "tensorrt"]
    assert [p.feeds for p in engine_rows] == [label for label, _ in parity]
    assert all(p.passed == passed for p in engine_rows)
    assert result.ok == passed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {row["backend"] for row in report["parity"]} >= {"onnxruntime", "tensorrt"}
    # default profile: one spanning the parity lengths
    assert result.engine["profiles"] == [{"input_ids": {"min": [1, min(lengths)], "opt": [1, lengths[0]],
                                                        "max": [1, max(lengths)]}}]


def test_api_build_with_buckets_runs_what_fits(env, monkeypatch, tmp_path, small_model):
    module, parity, dynamic_axes, lengths = small_model
    env.install(fake_tensorrt())
    monkeypatch.setattr(tensorrt_runner, "find_plugin_library", lambda: env.library)
    runner = EchoRunner(module, list(parity[0][1]))
    monkeypatch.setattr(tensorrt_runner, "TensorRTRunner", lambda path, plugin_library=None: runner)
    request = ProfileRequest.from_options(seq_lens=str(min(lengths)))  # one bucket: only the shortest fits
    result = api.build(module, parity[0][1], tmp_path / "out", dynamic_axes=dynamic_axes, parity_inputs=parity,
                       profiles=request)
    assert len(result.engine["profiles"]) == 1
    assert [shapes["input_ids"][1] for shapes in runner.seen] == [min(lengths)]
    assert "lie outside the engine's optimization profiles" in result.engine["parity_note"]


def test_api_build_refuses_bad_profiles_before_fusing(tmp_path, small_model):
    module, parity, dynamic_axes, _ = small_model
    request = ProfileRequest.from_options(opt_shapes="input_ids:1x64x3")
    with pytest.raises(UserError, match="'input_ids' has rank 2"):
        api.build(module, parity[0][1], tmp_path / "out", dynamic_axes=dynamic_axes, parity_inputs=parity,
                  profiles=request, engine=False)
    assert not (tmp_path / "out" / "model.fused.onnx").exists()


def test_engine_step_without_tensorrt_is_recorded(monkeypatch, tmp_path, small_model):
    module, parity, dynamic_axes, _ = small_model
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    result = api.build(module, parity[0][1], tmp_path / "out", dynamic_axes=dynamic_axes, parity_inputs=parity)
    assert result.engine == {"path": None, "reason": tensorrt_runner.NOT_INSTALLED}
    assert {p.backend for p in result.parity} == {"onnxruntime"} and result.ok
    np.testing.assert_equal(result.fusion.all_fused, True)
