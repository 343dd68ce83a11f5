"""The TensorRT plugin sources against real TensorRT headers, with no TensorRT library and no GPU.

For every header set found (ATTN_EXPORT_TRT_HEADERS, or /work/trt_headers/release_*/include):
  - every plugin source compiles (-fsyntax-only, -Wall -Wextra -Werror; the headers' own warnings are silenced);
  - plugins_trt/trt/tests/fake_tensorrt.cpp, a stand-in for TensorRT's parser, builder and runtime with the kernels
    replaced by recorders, is built with the plugin sources (AddressSanitizer and UBSan where the compiler has
    them) and takes every plugin through creation, shapes, formats, workspace, enqueue, serialization and cloning;
    the creators, fields and output rules it reports must equal the op contracts.
TensorRT's headers are never committed here; without them these tests are skipped and the plugins are only
checked by tests/test_plugin_rules.py (their TensorRT-free half). Real engine builds need TensorRT and a GPU.
"""
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from attn_export import plugin_contracts
from attn_export.ops import OPS, PLUGIN_NAMESPACE

ROOT = Path(__file__).resolve().parents[1]
TRT_DIR = ROOT / "plugins_trt" / "trt"
KERNELS_DIR = ROOT / "plugins_trt" / "kernels"
HEADERS_ENV = "ATTN_EXPORT_TRT_HEADERS"
DEFAULT_HEADERS = Path("/work/trt_headers")
PLUGIN_SOURCES = sorted(p.name for p in TRT_DIR.glob("*.cpp"))


def _include_dirs(entry: Path) -> list[Path]:
    if (entry / "NvInferRuntime.h").is_file():
        return [entry]
    return sorted(p for p in entry.glob("*/include") if (p / "NvInferRuntime.h").is_file())


def header_sets() -> list[Path]:
    env = os.environ.get(HEADERS_ENV)
    entries = [Path(p) for p in env.split(os.pathsep) if p] if env else [DEFAULT_HEADERS]
    return [d for e in entries for d in _include_dirs(e)]


def tensorrt_version(include: Path) -> str:
    text = (include / "NvInferVersion.h").read_text()
    numbers = {}
    for part in ("MAJOR", "MINOR", "PATCH"):
        value = re.search(rf"#define NV_TENSORRT_{part} (\w+)", text).group(1)
        if not value.isdigit():  # 11.x: NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE
            value = re.search(rf"#define {value} (\d+)", text).group(1)
        numbers[part] = value
    return f"{numbers['MAJOR']}.{numbers['MINOR']}.{numbers['PATCH']}"


HEADERS = header_sets()
SKIP = f"TensorRT headers not found (set {HEADERS_ENV} to folders holding NvInferRuntime.h); the plugin sources " \
       "were not compiled against TensorRT"
pytestmark = pytest.mark.skipif(not HEADERS, reason=SKIP)


def cxx() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.skip("no C++ compiler (c++, g++ or clang++) on PATH")


def cuda_includes() -> list[str]:
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "include" / "cuda_runtime_api.h").is_file():
            return ["-isystem", str(Path(candidate) / "include")]
    pytest.skip("CUDA runtime headers not found (CUDA_HOME): TensorRT's headers include them")


@pytest.fixture(params=HEADERS, ids=lambda p: f"TensorRT-{tensorrt_version(p)}", scope="module")
def headers(request) -> Path:
    return request.param


def compile_command(include: Path) -> list[str]:
    return [cxx(), "-std=c++17", "-Wall", "-Wextra", "-Werror", "-isystem", str(include), "-I", str(KERNELS_DIR),
            "-I", str(TRT_DIR), *cuda_includes()]


def test_plugin_sources_compile(headers):
    assert {"creators.cpp", "plugin_base.cpp", "fields.cpp"} <= set(PLUGIN_SOURCES)
    result = subprocess.run([*compile_command(headers), "-fsyntax-only", *PLUGIN_SOURCES], cwd=TRT_DIR,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]


@pytest.fixture(scope="module")
def fake_run(headers, tmp_path_factory):
    binary = tmp_path_factory.mktemp("fake_trt") / "fake_tensorrt"
    base = [*compile_command(headers), "-g", "-O1", "tests/fake_tensorrt.cpp", *PLUGIN_SOURCES, "-o", str(binary)]
    sanitized = subprocess.run(base[:1] + ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"] + base[1:],
                               cwd=TRT_DIR, capture_output=True, text=True, timeout=600)
    if sanitized.returncode != 0:  # a compiler without sanitizer runtimes: build plain
        plain = subprocess.run(base, cwd=TRT_DIR, capture_output=True, text=True, timeout=600)
        assert plain.returncode == 0, plain.stderr[-6000:]
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300, env=env)
    return result


def test_fake_tensorrt_lifecycle(fake_run):
    failures = [line for line in fake_run.stdout.splitlines() if line.startswith("FAIL")]
    assert not failures, "\n".join(failures)
    assert fake_run.returncode == 0, fake_run.stdout[-3000:] + fake_run.stderr[-6000:]
    assert "0 failure(s)" in fake_run.stdout
    assert sum(line.startswith("ok ") for line in fake_run.stdout.splitlines()) > 150


def test_fake_tensorrt_sees_the_contracts(fake_run):
    creators, fields, rules = {}, {}, {}
    for line in fake_run.stdout.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "creator":
            name, version, namespace = rest.split()
            creators[name] = (version, namespace)
        elif kind == "field":
            op, name, field_kind, length, *default = rest.split(" ")
            fields.setdefault(op, []).append((name, field_kind, int(length), " ".join(default)))
        elif kind == "rule":
            op, *dims = rest.split()
            rules[op] = dims
    assert creators == {op: (str(c.version), PLUGIN_NAMESPACE) for op, c in OPS.items()}
    for op, contract in OPS.items():
        assert [f[0] for f in fields[op]] == [a.name for a in contract.attributes]
        for (name, kind, length, default), attribute in zip(fields[op], contract.attributes):
            assert kind == attribute.kind, name
            if kind == "float":
                assert length == 1 and math.isclose(float(default), attribute.default, rel_tol=1e-6), name
            elif kind == "int":
                assert length == 1 and int(default) == attribute.default, name
            else:  # as the ONNX parser passes a STRING attribute: characters and the NUL
                assert default == attribute.default and length == len(attribute.default) + 1, name
        rule = plugin_contracts.output_rule(contract)
        expected = [str(r) if isinstance(r, int) else f"in{r[0]}.d{r[1]}" for r in rule]
        assert rules[op] == expected, op


# ------------------------------------------------------------------------------------------------ the real library
def _version_key(include: Path) -> tuple:
    return tuple(int(p) for p in tensorrt_version(include).split("."))


@pytest.fixture(scope="module")
def built_library(tmp_path_factory):
    """plugins_trt built with CMake against the oldest header set found (the API the plugins target), for one
    architecture, in a cached folder under plugins_trt/build/. libnvinfer is a stand-in: the plugins need none of
    its symbols, which the link's -Wl,--no-undefined proves."""
    if shutil.which("cmake") is None or shutil.which("nvcc") is None:
        pytest.skip("cmake and nvcc are needed to build the plugin library")
    include = min(HEADERS, key=_version_key)
    build = ROOT / "plugins_trt" / "build" / f"trt-check-{tensorrt_version(include)}"
    root = build / "tensorrt-root"
    (root / "lib").mkdir(parents=True, exist_ok=True)
    if not (root / "include").exists():
        (root / "include").symlink_to(include.resolve(), target_is_directory=True)
    stub = root / "lib" / "libnvinfer.so"
    if not stub.exists():
        (root / "stub.c").write_text("int attn_export_stub_nvinfer;\n")
        subprocess.run(["cc", "-shared", "-fPIC", str(root / "stub.c"), "-o", str(stub)], check=True)
    configure = subprocess.run(["cmake", "-S", str(ROOT / "plugins_trt"), "-B", str(build), f"-DTENSORRT_ROOT={root}",
                                "-DCMAKE_CUDA_ARCHITECTURES=87-real"], capture_output=True, text=True, timeout=600)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    made = subprocess.run(["cmake", "--build", str(build), "-j", "2", "--target", "attn_export_plugins"],
                          capture_output=True, text=True, timeout=1800)
    assert made.returncode == 0, made.stdout[-4000:] + made.stderr[-4000:]
    return build / "libattn_export_plugins.so", tensorrt_version(include)


def test_plugin_library_builds_links_and_loads(built_library):
    import ctypes

    from attn_export.backends.engine_manifest import plugin_library_facts

    library, version = built_library
    exported = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True).stdout
    names = {line.split()[-1] for line in exported.splitlines() if line.split()[1] in "TDR"}
    assert names == {"getCreators", "setLoggerFinder", "attnExportPluginsVersion", "kAttnExportPluginsVersion"}
    facts = plugin_library_facts(library)
    assert facts["contracts"] == plugin_contracts.contracts_digest() and facts["tensorrt_headers"] == version
    try:
        handle = ctypes.CDLL(str(library))
    except OSError as e:  # e.g. no CUDA runtime library on this machine
        pytest.skip(f"the library built but cannot be loaded here: {e}")
    handle.attnExportPluginsVersion.restype = ctypes.c_char_p
    assert handle.attnExportPluginsVersion().decode() == \
        f"attn_export_plugins:contracts={plugin_contracts.contracts_digest()};tensorrt={version}"
    count = ctypes.c_int32(0)
    handle.getCreators.restype = ctypes.POINTER(ctypes.c_void_p)
    creators = handle.getCreators(ctypes.byref(count))
    assert count.value == len(OPS) and all(creators[i] for i in range(count.value))
