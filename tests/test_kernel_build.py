"""CI's CUDA build: every kernel compiles for sm_80, sm_87 and sm_90, and ptxas spills no register.

Runs `cmake -S plugins_trt -B plugins_trt/build` (a cached, git-ignored folder: only changed sources recompile)
with ptxas -v. The build itself fails on a spill (-Xptxas -warn-spills,-Werror), so a cached object never spilled;
the freshly compiled ones are also checked here from the ptxas report. Needs nvcc and cmake, not a GPU.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins_trt"
BUILD = PLUGINS / "build"
ARCHITECTURES = "80-real;87-real;90"
EXPECTED_SM = {"sm_80", "sm_87", "sm_90"}


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA kernel build needs the CUDA toolkit")


@pytest.fixture(scope="module")
def build():
    BUILD.mkdir(parents=True, exist_ok=True)
    with open(BUILD / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest runs side by side share the folder
        configure = subprocess.run(
            ["cmake", "-S", str(PLUGINS), "-B", str(BUILD), f"-DCMAKE_CUDA_COMPILER={NVCC}",
             f"-DCMAKE_CUDA_ARCHITECTURES={ARCHITECTURES}", "-DATTN_EXPORT_FAIL_ON_SPILLS=ON",
             "-DATTN_EXPORT_PTXAS_VERBOSE=ON"],
            capture_output=True, text=True)
        log = configure.stdout + configure.stderr
        rc = configure.returncode
        if rc == 0:
            made = subprocess.run(["cmake", "--build", str(BUILD), "-j", "2"], capture_output=True, text=True)
            log += made.stdout + made.stderr
            rc = made.returncode
        (BUILD / "last_build.log").write_text(log)
    return rc, log


def compiled_kernels(log: str) -> list[tuple[str, str, str]]:
    """(kernel, sm, properties line) for every kernel ptxas compiled in this build."""
    out = []
    lines = log.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            props = next((x for x in lines[i + 1:i + 4] if "spill" in x), "")
            out.append((m.group(1), m.group(2), props))
    return out


def test_kernel_library_builds(build):
    rc, log = build
    errors = [x for x in log.splitlines() if "error" in x.lower()]
    assert rc == 0, "CUDA kernel build failed:\n" + "\n".join(errors[:30] or log.splitlines()[-30:])
    assert (BUILD / "libattn_export_kernels.a").is_file()


def test_no_kernel_spills_registers(build):
    rc, log = build
    spills = [x for x in log.splitlines() if re.search(r"[1-9]\d* bytes spill (stores|loads)", x)
              or "Registers are spilled" in x]
    assert not spills, "ptxas spilled registers:\n" + "\n".join(spills[:20])
    for kernel, sm, props in compiled_kernels(log):
        assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", props), f"{kernel} on {sm}: {props}"


def test_built_for_sm80_sm87_sm90(build):
    rc, log = build
    assert rc == 0
    cache = (BUILD / "CMakeCache.txt").read_text()
    assert re.search(rf"^CMAKE_CUDA_ARCHITECTURES:\w+={re.escape(ARCHITECTURES)}$", cache, re.M)
    compiled = compiled_kernels(log)
    if compiled:  # something was (re)compiled in this run: every kernel went to every architecture
        by_kernel: dict[str, set[str]] = {}
        for kernel, sm, _ in compiled:
            by_kernel.setdefault(kernel, set()).add(sm)
        missing = {k: EXPECTED_SM - sms for k, sms in by_kernel.items() if sms != EXPECTED_SM}
        assert not missing, f"kernels not built for every architecture: {missing}"
