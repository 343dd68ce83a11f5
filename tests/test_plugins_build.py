"""`attn-export plugins build` (attn_export/plugins_build.py) against a stand-in `cmake` on PATH, so the flow
(configure, TensorRT found or not, kernels-only, failures, progress, the printed path) is tested in seconds on
any machine. The real CMake build is exercised by tests/test_kernel_build.py (kernels) and, where TensorRT
headers exist, by building plugins_trt with them."""
import os
import stat
import sys
import textwrap

import pytest

from attn_export import plugins_build
from attn_export.errors import UserError
from conftest import run_cli as run

FAKE_CMAKE = textwrap.dedent("""\
    #!{python}
    import os, sys
    from pathlib import Path
    args = sys.argv[1:]
    if "--build" in args:
        build = Path(args[args.index("--build") + 1])
        (build / "calls.txt").open("a").write(" ".join(args) + "\\n")
        print("[ 10%] Building CUDA object kernels/dense_attention.cu.o")
        print("[ 55%] Building CXX object trt/creators.cpp.o")
        if os.environ.get("FAKE_BUILD_FAILS"):
            print("plugins_trt/trt/creators.cpp:3:10: error: something is wrong")
            sys.exit(2)
        (build / "libattn_export_kernels.a").write_bytes(b"!<arch>")
        if "--target" not in args:
            (build / "libattn_export_plugins.so").write_bytes(b"\\x7fELF")
        print("[100%] Built target attn_export_plugins")
        sys.exit(0)
    build = Path(args[args.index("-B") + 1])
    build.mkdir(parents=True, exist_ok=True)
    (build / "calls.txt").open("a").write(" ".join(args) + "\\n")
    if os.environ.get("FAKE_CONFIGURE_FAILS"):
        print("CMake Error at CMakeLists.txt:20 (project):")
        print("  No CMAKE_CUDA_COMPILER could be found.")
        sys.exit(1)
    found = os.environ.get("FAKE_TENSORRT") == "1" or any(a.startswith("-DTENSORRT_ROOT=") for a in args)
    include = "/opt/tensorrt/include" if found else "TENSORRT_INCLUDE_DIR-NOTFOUND"
    library = "/opt/tensorrt/lib/libnvinfer.so" if found else "TENSORRT_LIBRARY-NOTFOUND"
    cache = f"TENSORRT_INCLUDE_DIR:PATH={{include}}\\nTENSORRT_LIBRARY:FILEPATH={{library}}\\n"
    (build / "CMakeCache.txt").write_text(cache)
    if found:
        (build / "trt").mkdir(exist_ok=True)
    print("-- Configuring done")
""")


@pytest.fixture
def fake_cmake(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "cmake"
    script.write_text(FAKE_CMAKE.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for var in ("FAKE_TENSORRT", "FAKE_BUILD_FAILS", "FAKE_CONFIGURE_FAILS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "build"


def tensorrt_root(tmp_path):
    root = tmp_path / "TensorRT-10.3"
    (root / "include").mkdir(parents=True)
    (root / "include" / "NvInfer.h").write_text("// header")
    return root


def calls(build_dir):
    return (build_dir / "calls.txt").read_text().splitlines()


def test_parse_archs():
    assert plugins_build.parse_archs("80;87;90") == "80;87;90"
    assert plugins_build.parse_archs("80, 87,90-real") == "80;87;90-real"
    assert plugins_build.parse_archs(None) is None
    for bad in ("", "sm_80", "80;x", "8"):
        with pytest.raises(UserError, match="--cuda-archs takes SM numbers"):
            plugins_build.parse_archs(bad)


def test_configure_command(tmp_path):
    plain = plugins_build.configure_command(tmp_path / "b", tensorrt_root=None, cuda_archs=None)
    assert plain == ["cmake", "-S", str(plugins_build.SOURCE_DIR), "-B", str(tmp_path / "b")]
    root = tensorrt_root(tmp_path)
    full = plugins_build.configure_command(tmp_path / "b", tensorrt_root=root, cuda_archs="87")
    assert "-DCMAKE_CUDA_ARCHITECTURES=87" in full
    assert f"-DTENSORRT_ROOT={root.resolve()}" in full and f"-DTensorRT_ROOT={root.resolve()}" in full
    assert "-UTENSORRT_INCLUDE_DIR" in full and "-UTENSORRT_LIBRARY" in full  # re-search a new root


def test_progress_of():
    assert plugins_build.progress_of("[ 42%] Building CUDA object x.o") == 42
    assert plugins_build.progress_of("[3/12] Building CXX object y.o") == 25
    assert plugins_build.progress_of("-- Configuring done") is None


def test_build_with_tensorrt_prints_the_library(fake_cmake, tmp_path):
    lines = []
    outcome = plugins_build.build_plugins(build_dir=fake_cmake, tensorrt_root=tensorrt_root(tmp_path),
                                          cuda_archs="87", jobs=2, on_line=lines.append)
    assert outcome.plugin_library == fake_cmake / "libattn_export_plugins.so"
    assert outcome.kernel_library == fake_cmake / "libattn_export_kernels.a"
    configure, build = calls(fake_cmake)
    assert "-DCMAKE_CUDA_ARCHITECTURES=87" in configure
    assert build == f"--build {fake_cmake} -j 2"
    assert "[100%] Built target attn_export_plugins" in lines
    log = (fake_cmake / plugins_build.LOG_NAME).read_text()
    assert "$ cmake -S" in log and "$ cmake --build" in log and "[ 55%]" in log


def test_tensorrt_not_found_is_one_line(fake_cmake):
    with pytest.raises(UserError) as info:
        plugins_build.build_plugins(build_dir=fake_cmake)
    message = str(info.value)
    assert message.startswith("TensorRT not found (no NvInfer.h found in TENSORRT_ROOT or the default")
    assert "--tensorrt-root DIR, or --kernels-only" in message and "\n" not in message
    assert len(calls(fake_cmake)) == 1  # configured, nothing built


def test_kernels_only_without_tensorrt(fake_cmake):
    outcome = plugins_build.build_plugins(build_dir=fake_cmake, kernels_only=True)
    assert outcome.plugin_library is None and outcome.kernel_library.is_file()
    assert calls(fake_cmake)[1].endswith("--target attn_export_kernels")


def test_configure_failure_names_the_error(fake_cmake, monkeypatch):
    monkeypatch.setenv("FAKE_CONFIGURE_FAILS", "1")
    with pytest.raises(UserError, match=r"CMake configure failed: CMake Error at CMakeLists.txt:20 \(project\): "
                                        r"\(full log: .*attn-export-build.log\)"):
        plugins_build.build_plugins(build_dir=fake_cmake)


def test_build_failure_names_the_error(fake_cmake, monkeypatch):
    monkeypatch.setenv("FAKE_TENSORRT", "1")
    monkeypatch.setenv("FAKE_BUILD_FAILS", "1")
    with pytest.raises(UserError, match="the build failed: plugins_trt/trt/creators.cpp:3:10: error: something"):
        plugins_build.build_plugins(build_dir=fake_cmake)


def test_missing_cmake_and_bad_root(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="cmake not found on PATH"):
        plugins_build.build_plugins(build_dir=tmp_path / "b")
    monkeypatch.undo()
    (tmp_path / "root").mkdir()
    with pytest.raises(UserError, match="no include/NvInfer.h there"):
        plugins_build.check_tensorrt_root(tmp_path / "root")


def test_cli_prints_the_library_path(fake_cmake, tmp_path, capsys):
    code, out, err = run(capsys, "plugins", "build", "--tensorrt-root", tensorrt_root(tmp_path), "-o", fake_cmake,
                         "--cuda-archs", "80;87;90")
    assert code == 0, err
    assert out.strip().splitlines()[-1] == str(fake_cmake / "libattn_export_plugins.so")


def test_cli_without_tensorrt_exits_2_in_one_line(fake_cmake, capsys):
    code, out, err = run(capsys, "plugins", "build", "-o", fake_cmake)
    assert code == 2
    assert err.startswith("error: TensorRT not found") and err.count("\n") == 1
    code, out, err = run(capsys, "plugins", "build", "-o", fake_cmake, "--kernels-only")
    assert code == 0 and "kernels only" in out
