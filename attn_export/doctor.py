"""`attn-export doctor`: what this machine can do, on one screen, and whether the pieces a user needs work.

Each check returns a Finding; none of them raises, because a broken install is exactly what the doctor is for
(importing a damaged onnxruntime or TensorRT wheel can fail in any way).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .backends import tensorrt_runner
from .errors import UserError, one_line
from .ops import OPS
from .ops.contract import PLUGIN_NAMESPACE

# pieces a user can require with --require; torch, onnx and onnxruntime are always required
OPTIONAL = ("tensorrt", "cuda", "plugins")


@dataclass
class Finding:
    name: str
    ok: bool
    detail: str


def check_torch() -> Finding:
    import torch

    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    return Finding("torch", True, f"{torch.__version__} ({build})")


def check_onnx() -> Finding:
    import onnx

    return Finding("onnx", True, f"{onnx.__version__} (opset up to {onnx.defs.onnx_opset_version()})")


def check_onnxruntime() -> Finding:
    import onnxruntime as ort

    return Finding("onnxruntime", True, f"{ort.__version__}, providers: {', '.join(ort.get_available_providers())}")


def check_cuda() -> Finding:
    import torch

    driver = tensorrt_runner._cuda_driver_version()
    if not torch.cuda.is_available():
        why = ("torch is a CPU build" if not torch.version.cuda else
               f"torch (CUDA {torch.version.cuda}) sees no GPU" + ("" if driver else " and no NVIDIA driver"))
        return Finding("cuda", False, f"no CUDA GPU: {why}")
    major, minor = torch.cuda.get_device_capability()
    return Finding("cuda", True, f"{torch.cuda.get_device_name()} (sm_{major}{minor}), CUDA runtime "
                                 f"{torch.version.cuda}, driver {driver or 'version unknown'}")


def check_tensorrt() -> Finding:
    ok, reason = tensorrt_runner.tensorrt_status()
    return Finding("tensorrt", ok, reason)


def _creators(trt) -> list[tuple[str, str, str]]:
    registry = trt.get_plugin_registry()
    creators = getattr(registry, "all_creators", None)
    if creators is None:
        creators = getattr(registry, "plugin_creator_list", [])
    return [(str(getattr(c, "name", "?")), str(getattr(c, "plugin_version", "?")),
             str(getattr(c, "plugin_namespace", ""))) for c in creators]


def check_plugins() -> Finding:
    """The plugin library (found as the TensorRT backend finds it) and the creators it registers."""
    try:
        library = tensorrt_runner.find_plugin_library()
    except UserError as e:
        return Finding("plugins", False, str(e))
    if library is None:
        where = " or ".join(str(p.parent) for p in tensorrt_runner._PLUGIN_BUILD_PATHS)
        return Finding("plugins", False, f"not built: no {tensorrt_runner.PLUGIN_LIB_NAME} in {where} (run "
                                         f"`attn-export plugins build`, or set {tensorrt_runner.PLUGIN_LIB_ENV})")
    trt, why = tensorrt_runner.importable_tensorrt()
    if trt is None:
        return Finding("plugins", False, f"{library}; its creators cannot be listed: {why}")
    try:
        tensorrt_runner._load_plugin_library(trt, library)
        ours = sorted(c for c in _creators(trt) if c[2] == PLUGIN_NAMESPACE)
    except UserError as e:
        return Finding("plugins", False, str(e))
    registered = {(name, version) for name, version, _ in ours}
    expected = {(op.op_type, str(op.version)) for op in OPS.values()}
    listed = ", ".join(f"{name} v{version}" for name, version, _ in ours) or "none"
    missing = sorted(expected - registered)
    if missing:
        absent = ", ".join(f"{name} v{version}" for name, version in missing)
        return Finding("plugins", False, f"{library} registers {listed}; missing {absent}")
    return Finding("plugins", True, f"{library} registers {listed}")


CHECKS: tuple[tuple[str, Callable[[], Finding]], ...] = (
    ("torch", check_torch), ("onnx", check_onnx), ("onnxruntime", check_onnxruntime),
    ("tensorrt", check_tensorrt), ("cuda", check_cuda), ("plugins", check_plugins),
)


def diagnose() -> list[Finding]:
    findings = []
    for name, check in CHECKS:
        try:
            findings.append(check())
        except ImportError as e:
            findings.append(Finding(name, False, one_line(f"cannot be imported: {e}")[:300]))
        except Exception as e:  # a broken install: say what broke, keep going
            findings.append(Finding(name, False, one_line(f"check failed: {type(e).__name__}: {e}")[:300]))
    return findings


def unmet(findings: list[Finding], required: tuple[str, ...]) -> list[str]:
    """Names of the pieces that are needed (always the core ones, plus `required`) but do not work."""
    needed = {f.name for f in findings if f.name not in OPTIONAL} | set(required)
    return [f.name for f in findings if f.name in needed and not f.ok]


def report_lines(findings: list[Finding], required: tuple[str, ...]) -> list[str]:
    """One line per piece: `ok`, `MISSING` (needed and not working) or `no` (optional, not here), then a verdict."""
    missing = unmet(findings, required)
    width = max(len(f.name) for f in findings)
    lines = []
    for f in findings:
        mark = "ok" if f.ok else "MISSING" if f.name in missing else "no"
        lines.append(f"{mark:<8}{f.name:<{width}}  {f.detail}")
    if missing:
        lines.append(f"cannot work here: {', '.join(missing)}")
    else:
        lines.append("export, fuse and check on onnxruntime work here" + (
            f"; so do {', '.join(required)}" if required else ""))
    return lines
