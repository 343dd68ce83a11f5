"""The JSON manifest written beside every engine, and the check that an engine can run on this machine.

A serialized engine only deserializes under the TensorRT version that built it, is compiled for one GPU
architecture (SM), and names plugins whose fields must mean what they meant at build time. The manifest records
those facts (plus CUDA, the GPU's name, precision and the optimization profiles) so that loading an engine on the
wrong machine fails with one line saying why, before TensorRT is asked. None of this needs TensorRT: the plugin
library's identity is read from the file itself (creators.cpp embeds "attn_export_plugins:contracts=...").
The timing cache lives in a per-user cache folder, one file per TensorRT version and SM.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..errors import UserError

FORMAT = "attn-export-engine/1"
_PLUGIN_TAG = re.compile(rb"attn_export_plugins:contracts=([0-9a-f]{16});tensorrt=([0-9]+\.[0-9]+\.[0-9]+)")
CACHE_DIR_ENV = "ATTN_EXPORT_CACHE_DIR"


def manifest_path(engine_path: str | os.PathLike) -> Path:
    """model.plan -> model.json, beside it."""
    return Path(engine_path).with_suffix(".json")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plugin_library_facts(path: str | os.PathLike | None) -> dict | None:
    """{"path", "sha256", "contracts", "tensorrt_headers"} for an attn_export plugin library, None for none.
    contracts/tensorrt_headers are None when the file carries no attn_export tag (another library)."""
    if path is None:
        return None
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read the plugin library: {e.strerror or e}") from None
    match = _PLUGIN_TAG.search(data)
    return {
        "path": str(path.resolve()),
        "sha256": hashlib.sha256(data).hexdigest(),
        "contracts": match.group(1).decode() if match else None,
        "tensorrt_headers": match.group(2).decode() if match else None,
    }


def sm_of(compute_capability: str | None) -> str | None:
    """"8.7" -> "sm_87"."""
    if not compute_capability:
        return None
    return "sm_" + compute_capability.replace(".", "")


def build_manifest(*, engine_path: str | os.PathLike, onnx_path: str | os.PathLike, tensorrt_version: str,
                   machine: dict, plugin_library: dict | None, precision: str, profiles_json: list[dict],
                   timing_cache: str | os.PathLike | None = None, workspace_mb: int | None = None,
                   engine_bytes: bytes | None = None) -> dict:
    """The manifest of a freshly built engine. `machine` is machine_facts()'s dict, `plugin_library`
    plugin_library_facts()'s."""
    try:
        from ..plugin_contracts import contracts_digest

        contracts = contracts_digest()
    except ImportError:  # the op contracts import torch; without it, the plugin library's tag says the same
        contracts = (plugin_library or {}).get("contracts")
    return {
        "format": FORMAT,
        "engine": Path(engine_path).name,
        "engine_sha256": hashlib.sha256(engine_bytes).hexdigest() if engine_bytes is not None else None,
        "onnx": str(onnx_path),
        "tensorrt": tensorrt_version,
        "cuda_runtime": machine.get("cuda_runtime"),
        "cuda_driver": machine.get("cuda_driver"),
        "gpu": machine.get("gpu"),
        "compute_capability": machine.get("compute_capability"),
        "sm": sm_of(machine.get("compute_capability")),
        "plugin_library": plugin_library,
        "contracts": contracts,
        "precision": precision,
        "profiles": profiles_json,
        "timing_cache": str(timing_cache) if timing_cache else None,
        "workspace_mb": workspace_mb,
    }


def load_manifest(engine_path: str | os.PathLike) -> dict | None:
    """The manifest beside `engine_path`, None when there is none; a malformed one is a UserError."""
    path = manifest_path(engine_path)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable engine manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not an attn-export engine manifest (format {FORMAT} expected)")
    return manifest


def compare(manifest: dict, *, tensorrt_version: str, machine: dict, plugin_library: dict | None,
            engine_sha256: str | None = None) -> list[str]:
    """Why the engine cannot run here (empty when it can): the manifest describing another engine, TensorRT
    version, SM, and the plugin library's contracts. A different GPU of the same SM, or another CUDA, is not a
    reason (TensorRT runs such engines)."""
    problems = []
    recorded = manifest.get("engine_sha256")
    if recorded and engine_sha256 and recorded != engine_sha256:
        problems.append("its manifest describes another engine (sha256 differs)")
    built = manifest.get("tensorrt")
    if built and built != tensorrt_version:
        problems.append(f"built with TensorRT {built}, this machine has TensorRT {tensorrt_version}")
    built_sm, here_sm = manifest.get("sm"), sm_of(machine.get("compute_capability"))
    if built_sm and here_sm and built_sm != here_sm:
        problems.append(f"built for {built_sm} ({manifest.get('gpu') or 'unknown GPU'}), this GPU is {here_sm} "
                        f"({machine.get('gpu') or 'unknown'})")
    needed = manifest.get("plugin_library") or {}
    if needed.get("contracts"):
        if plugin_library is None:
            problems.append("it uses the attn_export plugins and no plugin library is loaded "
                            "(build one with `attn-export plugins build` or set ATTN_EXPORT_PLUGIN_LIB)")
        elif plugin_library.get("contracts") != needed["contracts"]:
            have = plugin_library.get("contracts") or "no attn_export tag"
            problems.append(f"its plugins follow op contracts {needed['contracts']}, the plugin library "
                            f"{plugin_library.get('path')} follows {have} (rebuild one of them)")
    return problems


def mismatch_message(engine_path: str | os.PathLike, problems: list[str]) -> str:
    """One line: the engine, every reason, and what to do."""
    return f"{engine_path}: this engine cannot run here: {'; '.join(problems)}; rebuild it on this machine"


def check_engine(engine_path: str | os.PathLike, *, tensorrt_version: str, machine: dict,
                 plugin_library: dict | None) -> dict | None:
    """Raise a one-line UserError when the engine's manifest does not match this machine; return the manifest
    (None for an engine without one: TensorRT itself is then the only judge)."""
    manifest = load_manifest(engine_path)
    if manifest is None:
        return None
    engine_path = Path(engine_path)
    sha = sha256_file(engine_path) if engine_path.is_file() else None
    problems = compare(manifest, tensorrt_version=tensorrt_version, machine=machine, plugin_library=plugin_library,
                       engine_sha256=sha)
    if problems:
        raise UserError(mismatch_message(engine_path, problems))
    return manifest


# ------------------------------------------------------------------------------------- machine and cache
def machine_facts() -> dict:
    """CUDA runtime (torch's), driver, GPU name and compute capability, each None when unknown."""
    info: dict = {"cuda_runtime": None, "cuda_driver": cuda_driver_version(), "gpu": None, "compute_capability": None}
    try:
        import torch
    except ImportError:  # an edge device without PyTorch: ask the CUDA driver itself
        info["gpu"], info["compute_capability"] = driver_device() or (None, None)
        return info
    try:

        info["cuda_runtime"] = torch.version.cuda
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            info["gpu"] = torch.cuda.get_device_name()
            info["compute_capability"] = f"{major}.{minor}"
    except Exception:  # a broken CUDA setup must not stop a manifest from being written
        pass
    return info


def driver_device(index: int = 0) -> tuple[str, str] | None:
    """(name, "8.7") of CUDA device `index` through libcuda, None without a driver or a device (no torch needed)."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        name = ctypes.create_string_buffer(256)
        if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGet(ctypes.byref(device), index) != 0:
            return None
        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
        if (libcuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device) != 0
                or libcuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device) != 0):
            return None
        libcuda.cuDeviceGetName(name, len(name), device)
        return name.value.decode(errors="replace"), f"{major.value}.{minor.value}"
    except (OSError, AttributeError):
        return None


def cuda_driver_version() -> str | None:
    """The driver's CUDA version via libcuda's cuDriverGetVersion, if readable."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int()
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
        return f"{version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        return None


def cache_dir() -> Path:
    """$ATTN_EXPORT_CACHE_DIR, else $XDG_CACHE_HOME/attn-export, else ~/.cache/attn-export."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "attn-export"


def timing_cache_path(tensorrt_version: str, compute_capability: str | None, folder: Path | None = None) -> Path:
    """One timing cache per TensorRT version and SM (a cache from another version or GPU is useless or refused)."""
    sm = sm_of(compute_capability) or "sm_unknown"
    safe_version = re.sub(r"[^0-9A-Za-z.]+", "_", tensorrt_version)
    return (folder or cache_dir()) / "tensorrt" / f"timing-{safe_version}-{sm}.cache"
