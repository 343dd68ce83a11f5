"""`attn-export plugins build`: configure and build plugins_trt/ with CMake, and say where the plugin library is.

    cmake -S plugins_trt -B plugins_trt/build [-DTENSORRT_ROOT=DIR] [-DCMAKE_CUDA_ARCHITECTURES=80;87;90]
    cmake --build plugins_trt/build -j N

The top-level CMakeLists always builds the CUDA kernels and adds the TensorRT plugin library (trt/) when it finds
NvInfer.h and libnvinfer (TENSORRT_ROOT or the usual include/lib folders). When TensorRT is not found this stops
after the configure step with one line, unless kernels-only was asked for. The full CMake output goes to
<build dir>/attn-export-build.log; the default build folder is where the TensorRT backend looks for the library.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIR = ROOT / "plugins_trt"
DEFAULT_BUILD_DIR = SOURCE_DIR / "build"
LIBRARY_NAME = "libattn_export_plugins.so"
KERNEL_LIBRARY_NAME = "libattn_export_kernels.a"
LOG_NAME = "attn-export-build.log"
_PERCENT = re.compile(r"^\[\s*(\d+)%\]")  # Makefile generator
_STEPS = re.compile(r"^\[(\d+)/(\d+)\]")  # Ninja


@dataclass
class BuildOutcome:
    build_dir: Path
    plugin_library: Path | None  # None for a kernels-only build
    kernel_library: Path
    log: Path


def parse_archs(text: str | None) -> str | None:
    """'80;87;90' or '80,87,90' (each optionally with -real/-virtual) -> the CMake list '80;87;90'."""
    if text is None:
        return None
    items = [item.strip() for item in re.split(r"[;,\s]+", text) if item.strip()]
    if not items or not all(re.fullmatch(r"\d{2,3}[a-z]?(-real|-virtual)?", item) for item in items):
        raise UserError(f"--cuda-archs takes SM numbers such as 80;87;90 (optionally 90-real), got '{text}'")
    return ";".join(items)


def check_tensorrt_root(root: Path | None) -> None:
    if root is None:
        return
    if not root.is_dir():
        raise UserError(f"--tensorrt-root {root}: no such folder")
    if not (root / "include" / "NvInfer.h").is_file():
        raise UserError(f"--tensorrt-root {root}: no include/NvInfer.h there (give the folder that holds include/ "
                        "and lib/ of a TensorRT 10.3+ release)")


def configure_command(build_dir: Path, *, tensorrt_root: Path | None, cuda_archs: str | None,
                      source_dir: Path = SOURCE_DIR) -> list[str]:
    command = ["cmake", "-S", str(source_dir), "-B", str(build_dir)]
    if cuda_archs:
        command.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs}")
    if tensorrt_root is not None:
        root = str(tensorrt_root.resolve())
        # forget an earlier search so the new root is searched (find_path keeps a found value in the cache)
        command += [f"-DTENSORRT_ROOT={root}", f"-DTensorRT_ROOT={root}", "-UTENSORRT_INCLUDE_DIR",
                    "-UTENSORRT_LIBRARY"]
    return command


def tensorrt_found(build_dir: Path) -> tuple[bool, str]:
    """(found, where or why not) from the configured build's CMake cache."""
    cache = build_dir / "CMakeCache.txt"
    values = {}
    if cache.is_file():
        for line in cache.read_text(errors="replace").splitlines():
            match = re.match(r"^(TENSORRT_INCLUDE_DIR|TENSORRT_LIBRARY):\w+=(.*)$", line)
            if match:
                values[match.group(1)] = match.group(2)
    include, library = values.get("TENSORRT_INCLUDE_DIR", ""), values.get("TENSORRT_LIBRARY", "")
    if not include or include.endswith("NOTFOUND"):
        return False, "no NvInfer.h found"
    if not library or library.endswith("NOTFOUND"):
        return False, f"NvInfer.h found in {include} but no libnvinfer"
    if not (build_dir / "trt").is_dir():
        return False, "plugins_trt/CMakeLists.txt did not add trt/"
    return True, include


def progress_of(line: str) -> int | None:
    """Percent done from a CMake build line, if it has one."""
    match = _PERCENT.match(line)
    if match:
        return int(match.group(1))
    match = _STEPS.match(line)
    if match and int(match.group(2)):
        return 100 * int(match.group(1)) // int(match.group(2))
    return None


def _run(command: list[str], log, on_line: Callable[[str], None]) -> tuple[int, list[str]]:
    log.write("$ " + " ".join(command) + "\n")
    log.flush()
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace")
    except OSError as e:
        raise UserError(f"cannot run {command[0]}: {e.strerror or e}") from None
    tail: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        log.write(line)
        line = line.rstrip()
        tail = (tail + [line])[-200:]
        on_line(line)
    return process.wait(), tail


def _first_error(lines: list[str]) -> str:
    for line in lines:
        if re.search(r"\berror\b|CMake Error|No CMAKE_CUDA_COMPILER", line, re.I):
            return " ".join(line.split())[:300]
    return " ".join(lines[-1].split())[:300] if lines else "no output"


def build_plugins(*, build_dir: Path = DEFAULT_BUILD_DIR, tensorrt_root: Path | None = None,
                  cuda_archs: str | None = None, jobs: int = 2, kernels_only: bool = False,
                  on_line: Callable[[str], None] = lambda line: None) -> BuildOutcome:
    """Configure and build; return the libraries' paths. Every failure is one UserError line."""
    if shutil.which("cmake") is None:
        raise UserError("cmake not found on PATH (CMake 3.18 or newer builds plugins_trt/)")
    check_tensorrt_root(tensorrt_root)
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    log_path = build_dir / LOG_NAME
    with open(build_dir / ".build.lock", "w") as lock, open(log_path, "w") as log:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the kernel build test and other runs may share the folder
        command = configure_command(build_dir, tensorrt_root=tensorrt_root, cuda_archs=cuda_archs)
        rc, tail = _run(command, log, on_line)
        if rc != 0:
            raise UserError(f"CMake configure failed: {_first_error(tail)} (full log: {log_path})")
        found, detail = tensorrt_found(build_dir)
        if not found and not kernels_only:
            where = f"under {tensorrt_root}" if tensorrt_root else "in TENSORRT_ROOT or the default include/lib folders"
            raise UserError(f"TensorRT not found ({detail} {where}): pass --tensorrt-root DIR, or --kernels-only to "
                            "build the CUDA kernels alone")
        target = [] if found else ["--target", "attn_export_kernels"]
        rc, tail = _run(["cmake", "--build", str(build_dir), "-j", str(jobs), *target], log, on_line)
        if rc != 0:
            raise UserError(f"the build failed: {_first_error(tail)} (full log: {log_path})")
    kernels = build_dir / KERNEL_LIBRARY_NAME
    library = build_dir / LIBRARY_NAME if found else None
    if library is not None and not library.is_file():
        raise UserError(f"the build finished but {library} is missing (full log: {log_path})")
    return BuildOutcome(build_dir=build_dir, plugin_library=library, kernel_library=kernels, log=log_path)


def default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))
