"""Engine manifests, the "can this engine run here" check and the timing-cache path, without TensorRT
(attn_export/backends/engine_manifest.py)."""
import json

import pytest

from attn_export import plugin_contracts
from attn_export.backends import engine_manifest as em
from attn_export.backends import tensorrt_profiles as profiles
from attn_export.errors import UserError

ORIN = {"cuda_runtime": "12.6", "cuda_driver": "12.6", "gpu": "Orin", "compute_capability": "8.7"}
H100 = {"cuda_runtime": "12.8", "cuda_driver": "12.8", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def fake_library(path, contracts=None, tensorrt="10.3.0"):
    contracts = contracts or plugin_contracts.contracts_digest()
    path.write_bytes(b"\x7fELF....junk" + f"attn_export_plugins:contracts={contracts};tensorrt={tensorrt}".encode()
                     + b"\x00more")
    return path


def manifest_for(tmp_path, machine=ORIN, tensorrt="10.3.0.30", library=None):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"engine")
    return em.build_manifest(
        engine_path=engine, onnx_path=tmp_path / "model.fused.onnx", tensorrt_version=tensorrt, machine=machine,
        plugin_library=em.plugin_library_facts(library), precision="fp16",
        profiles_json=profiles.profiles_to_json(profiles.seq_len_profiles({"input_ids": ("batch", "seq")}, [128])),
        timing_cache=tmp_path / "t.cache", workspace_mb=1024, engine_bytes=b"engine")


def test_plugin_library_facts_read_the_embedded_tag(tmp_path):
    facts = em.plugin_library_facts(fake_library(tmp_path / "lib.so"))
    assert facts["contracts"] == plugin_contracts.contracts_digest()
    assert facts["tensorrt_headers"] == "10.3.0"
    assert len(facts["sha256"]) == 64 and facts["path"] == str((tmp_path / "lib.so").resolve())
    other = tmp_path / "libother.so"
    other.write_bytes(b"\x7fELF nothing to see")
    assert em.plugin_library_facts(other)["contracts"] is None
    assert em.plugin_library_facts(None) is None
    with pytest.raises(UserError, match="cannot read the plugin library"):
        em.plugin_library_facts(tmp_path / "missing.so")


def test_manifest_records_what_an_engine_depends_on(tmp_path):
    m = manifest_for(tmp_path, library=fake_library(tmp_path / "lib.so"))
    assert m["format"] == em.FORMAT and m["engine"] == "model.plan"
    assert m["tensorrt"] == "10.3.0.30" and m["sm"] == "sm_87" and m["gpu"] == "Orin"
    assert m["cuda_runtime"] == "12.6" and m["cuda_driver"] == "12.6"
    assert m["plugin_library"]["contracts"] == m["contracts"] == plugin_contracts.contracts_digest()
    assert m["precision"] == "fp16" and m["workspace_mb"] == 1024
    assert m["profiles"] == [{"input_ids": {"min": [1, 1], "opt": [1, 128], "max": [1, 128]}}]
    assert len(m["engine_sha256"]) == 64
    json.dumps(m)  # plain JSON


def test_same_machine_passes(tmp_path):
    library = fake_library(tmp_path / "lib.so")
    m = manifest_for(tmp_path, library=library)
    assert em.compare(m, tensorrt_version="10.3.0.30", machine=ORIN,
                      plugin_library=em.plugin_library_facts(library)) == []
    # another GPU of the same SM, another CUDA: TensorRT runs such engines
    same_sm = {**ORIN, "gpu": "Jetson AGX Orin 64GB", "cuda_runtime": "12.8"}
    assert em.compare(m, tensorrt_version="10.3.0.30", machine=same_sm,
                      plugin_library=em.plugin_library_facts(library)) == []


def test_mismatches_are_named(tmp_path):
    library = fake_library(tmp_path / "lib.so")
    stale = em.plugin_library_facts(fake_library(tmp_path / "old.so", contracts="0123456789abcdef"))
    m = manifest_for(tmp_path, library=library)
    problems = em.compare(m, tensorrt_version="10.16.1", machine=H100, plugin_library=stale)
    assert problems == [
        "built with TensorRT 10.3.0.30, this machine has TensorRT 10.16.1",
        "built for sm_87 (Orin), this GPU is sm_90 (NVIDIA H100 80GB HBM3)",
        f"its plugins follow op contracts {plugin_contracts.contracts_digest()}, the plugin library "
        f"{tmp_path / 'old.so'} follows 0123456789abcdef (rebuild one of them)",
    ]
    missing = em.compare(m, tensorrt_version="10.3.0.30", machine=ORIN, plugin_library=None)
    assert len(missing) == 1 and "no plugin library is loaded" in missing[0]


def test_check_engine_fails_in_one_line(tmp_path):
    m = manifest_for(tmp_path)
    em.manifest_path(tmp_path / "model.plan").write_text(json.dumps(m))
    assert em.check_engine(tmp_path / "model.plan", tensorrt_version="10.3.0.30", machine=ORIN,
                           plugin_library=None) == m
    with pytest.raises(UserError) as info:
        em.check_engine(tmp_path / "model.plan", tensorrt_version="11.1.0", machine=H100, plugin_library=None)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'model.plan'}: this engine cannot run here: built with TensorRT 10.3.0.30")
    assert "sm_90" in message and message.endswith("rebuild it on this machine")


def test_manifest_of_another_engine_is_refused(tmp_path):
    m = {**manifest_for(tmp_path), "engine_sha256": em.sha256_file(tmp_path / "model.plan")}
    em.manifest_path(tmp_path / "model.plan").write_text(json.dumps(m))
    assert em.check_engine(tmp_path / "model.plan", tensorrt_version="10.3.0.30", machine=ORIN, plugin_library=None)
    (tmp_path / "model.plan").write_bytes(b"another engine")
    with pytest.raises(UserError, match="its manifest describes another engine"):
        em.check_engine(tmp_path / "model.plan", tensorrt_version="10.3.0.30", machine=ORIN, plugin_library=None)


def test_engine_without_manifest_is_left_to_tensorrt(tmp_path):
    (tmp_path / "model.plan").write_bytes(b"x")
    assert em.check_engine(tmp_path / "model.plan", tensorrt_version="10.3.0", machine=ORIN,
                           plugin_library=None) is None


@pytest.mark.parametrize("text, message", [("{not json", "unreadable engine manifest"),
                                           ('{"format": "other"}', "not an attn-export engine manifest"),
                                           ("[1, 2]", "not an attn-export engine manifest")])
def test_malformed_manifest(tmp_path, text, message):
    (tmp_path / "model.json").write_text(text)
    with pytest.raises(UserError, match=message):
        em.load_manifest(tmp_path / "model.plan")


def test_manifest_path_and_sm():
    assert em.manifest_path("out/model.plan").as_posix() == "out/model.json"
    assert em.sm_of("8.7") == "sm_87" and em.sm_of("10.0") == "sm_100" and em.sm_of(None) is None


def test_timing_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv(em.CACHE_DIR_ENV, str(tmp_path / "cache"))
    assert em.cache_dir() == tmp_path / "cache"
    path = em.timing_cache_path("10.3.0.30", "8.7")
    assert path == tmp_path / "cache" / "tensorrt" / "timing-10.3.0.30-sm_87.cache"
    assert em.timing_cache_path("10.3.0.30", "9.0") != path  # one cache per SM
    assert em.timing_cache_path("10.16.1", "8.7") != path  # and per TensorRT version
    assert em.timing_cache_path("11.1.0+cuda13", None).name == "timing-11.1.0_cuda13-sm_unknown.cache"
    monkeypatch.delenv(em.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert em.cache_dir() == tmp_path / "xdg" / "attn-export"


def test_machine_facts_never_raise():
    facts = em.machine_facts()
    assert set(facts) == {"cuda_runtime", "cuda_driver", "gpu", "compute_capability"}
