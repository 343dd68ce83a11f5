"""The device check for a lent GPU: one command, bounded to fit a 15-minute loan (machine start included).

    PYTHONPATH=. python benchmarks/gpu_check.py            # on the GPU machine: about 5 minutes on an H200
    PYTHONPATH=. python benchmarks/gpu_check.py --dry-run  # anywhere: what it would run, nothing run or written

Steps, each with its own time budget (a step past its budget is stopped and recorded as such, the rest still run):
  1. build   the torch extension over plugins_trt/kernels for this GPU's architecture only (sm_90 on an H200;
             TORCH_CUDA_ARCH_LIST, MAX_JOBS = the cores);
  2. tests   the `cuda`-marked tests (tests/test_kernels_cuda.py), counted passed / failed / skipped;
  3. kernels benchmarks/cuda_kernels.py at a few lengths (1k, 4k, 16k tokens) in fp16 and bf16: ms, TFLOP/s, GB/s,
             against the op's torch reference and dense SDPA;
  4. zoo     the fused custom nodes of the twelve zoo models (small configs, dynamo export) through the CUDA
             kernels (fp32 and fp16) against the contracts' torch references in eager float32.
Writes benchmarks/results/gpu-<device>-<date>.json: device, torch, cuda, arch, elapsed per step, cuda_tests
{passed, failed, skipped}, kernels [{op, case, seq_len, dtype, ms, tflops, gbps, vs_reference, vs_sdpa}], zoo
[{model, nodes, max_error_fp32, max_error_fp16}]. Runs unchanged on the device (PYTHONPATH=., torch with CUDA,
nvcc, no network).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
LENGTHS = (1024, 4096, 16384)
DTYPES = ("float16", "bfloat16")
# seconds per step; together under 6 minutes, leaving the loan's machine start and a rerun margin
BUDGET = {"build": 140, "tests": 60, "kernels": 80, "zoo": 50}
ZOO = ("bigbird", "deberta", "evolving", "flash", "hypercube", "mgk", "performer", "spade", "switch",
       "transformer-ls", "treeformer", "vit")


def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (a file-name part)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def result_path(device: str, date: datetime.date) -> Path:
    return RESULTS / f"gpu-{device_slug(device)}-{date.isoformat()}.json"


def plan(arch: str, jobs: int) -> list[tuple[str, str]]:
    """(step, what it runs) in order."""
    lengths = " ".join(str(n) for n in LENGTHS)
    return [
        ("build", f"torch extension over plugins_trt/kernels, TORCH_CUDA_ARCH_LIST={arch}, MAX_JOBS={jobs}"),
        ("tests", "python -m pytest -q -m cuda tests/test_kernels_cuda.py (junit counts)"),
        ("kernels", f"benchmarks/cuda_kernels.py --lengths {lengths} --dtype {' and '.join(DTYPES)} --iters 20 "
                    "--warmup 5 --ref-max-len 4096"),
        ("zoo", f"fused nodes of {len(ZOO)} zoo models ({', '.join(ZOO)}) on the CUDA kernels (fp32, fp16) "
                "vs torch eager float32"),
    ]


# ------------------------------------------------------------------------------------------------ steps
def run_build(arch: str, jobs: int) -> dict:
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    os.environ.setdefault("MAX_JOBS", str(jobs))
    from attn_export.backends import cuda_ops

    reason = cuda_ops.unavailable_reason()
    if reason:
        return {"ok": False, "reason": reason}
    cuda_ops.load_extension()
    return {"ok": True}


def run_tests(timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "cuda.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                   f"--junitxml={report}", str(ROOT / "tests" / "test_kernels_cuda.py")]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"passed": 0, "failed": 0, "skipped": 0, "error": f"stopped after {timeout:.0f} s"}
        counts = junit_counts(report.read_text()) if report.is_file() else {"passed": 0, "failed": 0, "skipped": 0}
        failures = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
        return {**counts, "failures": failures[:20], "exit_code": done.returncode}


def junit_counts(xml_text: str) -> dict:
    root = ElementTree.fromstring(xml_text)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}


def kernel_rows(report: dict, dtype: str) -> list[dict]:
    """benchmarks/cuda_kernels.py rows in the schema of the results file."""
    rows = []
    for r in report["results"]:
        rows.append({"op": r["op"], "case": r["case"], "seq_len": r["seq_len"], "dtype": dtype, "ms": r["ms"],
                     "tflops": r["tflops"], "gbps": r["gbps"],
                     "vs_reference": r["reference_ms"] / r["ms"] if r.get("reference_ms") else None,
                     "vs_sdpa": r["tflops"] / r["sdpa_tflops"] if r.get("sdpa_tflops") else None})
    return rows


def run_kernels(deadline: float) -> list[dict]:
    from benchmarks import cuda_kernels as kernels

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in DTYPES:
            if time.monotonic() > deadline:
                rows.append({"dtype": dtype, "skipped": "step budget spent"})
                continue
            out = Path(tmp) / f"{dtype}.json"
            kernels.main(["--lengths", *map(str, LENGTHS), "--dtype", dtype, "--iters", "20", "--warmup", "5",
                          "--ref-max-len", "4096", "--json", str(out)])
            if out.is_file():
                rows += kernel_rows(json.loads(out.read_text()), dtype)
    return rows


def run_zoo(deadline: float) -> list[dict]:
    import numpy as np
    import torch

    from attn_export.backends import cuda_ops
    from attn_export.export import export_onnx
    from attn_export.ops import DOMAIN, OPS
    from attn_export.passes import fuse_graph
    from attn_export.passes.probe import probe_shapes, random_inputs, run_all_tensors
    import models

    rows = []
    for name in ZOO:
        if time.monotonic() > deadline:
            rows.append({"model": name, "skipped": "step budget spent"})
            continue
        entry = models.get(name)
        config = entry.make_config(entry.small)
        module = entry.build(config).eval()
        n = entry.parity_seq_lens(config)[0]
        inputs = entry.example_inputs(config, 1, n)
        model = export_onnx(module, inputs, dynamic_axes=None, exporter="dynamo",
                            probe_shapes=[{k: list(v.shape) for k, v in inputs.items()}] * 2)
        fused, _ = fuse_graph(model)
        values = run_all_tensors(fused, random_inputs(fused, probe_shapes(fused)[0], seed=0))
        errors = {"float32": 0.0, "float16": 0.0}
        nodes = [node for node in fused.graph.node if node.domain == DOMAIN]
        for node in nodes:
            contract = OPS[node.op_type]
            attrs = contract.node_attrs(node)
            args = [torch.from_numpy(np.asarray(values[i])) if i else None for i in node.input]
            expected = contract.reference(*args, **attrs).float()
            scale = float(expected.abs().max().clamp_min(1e-6))
            for dtype, torch_dtype in (("float32", torch.float32), ("float16", torch.float16)):
                cast = [a.to("cuda", torch_dtype) if a is not None and a.is_floating_point() else
                        (a.to("cuda") if a is not None else None) for a in args]
                got = cuda_ops.run_op(node.op_type, *cast, **attrs).float().cpu()
                errors[dtype] = max(errors[dtype], float((got - expected).abs().max()) / scale)
        rows.append({"model": name, "nodes": len(nodes), "max_error_fp32": errors["float32"],
                     "max_error_fp16": errors["float16"]})
    return rows


# ------------------------------------------------------------------------------------------------ driver
def timed(name: str, budget: float, elapsed: dict, call):
    start = time.monotonic()
    try:
        return call()
    except Exception as e:  # a failing step is a finding, recorded; the others still run
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    finally:
        elapsed[name] = round(time.monotonic() - start, 1)
        if elapsed[name] > budget:
            print(f"warning: step {name} took {elapsed[name]} s, over its {budget} s budget", file=sys.stderr)


def dry_run(args, jobs: int) -> int:
    """Say what the check would run, after checking here what can be checked without a GPU: the sources, the
    test file, the benchmark module and every zoo model's small config and example inputs."""
    import textwrap

    import models
    from benchmarks import cuda_kernels  # noqa: F401  (imports cleanly: the step can start)

    arch = args.arch or "9.0 (on the device: its own; an H200 is sm_90)"
    print(f"gpu_check dry run: {len(BUDGET)} steps, {sum(BUDGET.values())} s budget")
    for step, what in plan(arch, jobs):
        print(textwrap.fill(what, 78, initial_indent=f"  {step:<8}{BUDGET[step]:>4} s  ",
                            subsequent_indent=" " * 18))
    missing = [p for p in (ROOT / "tests" / "test_kernels_cuda.py", ROOT / "plugins_trt" / "torch_ext",
                           ROOT / "plugins_trt" / "kernels" / "launch_plan.h") if not p.exists()]
    if missing:
        print(f"error: missing {missing[0]}", file=sys.stderr)
        return 2
    for name in ZOO:
        entry = models.get(name)
        config = entry.make_config(entry.small)
        n = entry.parity_seq_lens(config)[0]
        shapes = ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in entry.example_inputs(config, 1, n).items())
        print(f"  zoo {name:<15} {shapes}"[:80])
    target = args.output or result_path("NVIDIA H200", datetime.date.today())
    shown = target.relative_to(ROOT) if target.is_relative_to(ROOT) else target
    print(f"would write {shown}")  # whole, however long: a path broken over two lines cannot be copied
    print(textwrap.fill("with device, torch, cuda, arch, elapsed_s, cuda_tests {passed, failed, skipped}, kernels "
                        "[{op, case, seq_len, dtype, ms, tflops, gbps, vs_reference, vs_sdpa}], zoo [{model, nodes, "
                        "max_error_fp32, max_error_fp16}]", 80))
    print("dry run: nothing was run on a GPU and nothing was written")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print what would run; run and write nothing")
    parser.add_argument("--arch", help="CUDA architecture for the build, e.g. 9.0 [default: this GPU's]")
    parser.add_argument("-o", "--output", type=Path, help="results file [default: benchmarks/results/gpu-...]")
    args = parser.parse_args(argv)
    jobs = os.cpu_count() or 4

    if args.dry_run:
        return dry_run(args, jobs)

    import torch

    if not torch.cuda.is_available():
        print("error: gpu_check needs a CUDA GPU (use --dry-run to see what it runs)", file=sys.stderr)
        return 2
    major, minor = torch.cuda.get_device_capability()
    arch = args.arch or f"{major}.{minor}"
    device = torch.cuda.get_device_name()
    elapsed: dict[str, float] = {}
    started = time.monotonic()
    build = timed("build", BUDGET["build"], elapsed, lambda: run_build(arch, jobs))
    ready = build.get("ok", False)
    tests = timed("tests", BUDGET["tests"], elapsed, lambda: run_tests(BUDGET["tests"] + 30)) if ready else \
        {"passed": 0, "failed": 0, "skipped": 0, "error": "not run: the build failed"}
    kernels = timed("kernels", BUDGET["kernels"], elapsed,
                                 lambda: run_kernels(time.monotonic() + BUDGET["kernels"])) if ready else []
    zoo = timed("zoo", BUDGET["zoo"], elapsed, lambda: run_zoo(time.monotonic() + BUDGET["zoo"])) if ready else []
    result = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "arch": arch,
              "date": datetime.date.today().isoformat(), "elapsed_s": {**elapsed,
                                                                      "total": round(time.monotonic() - started, 1)},
              "build": build, "cuda_tests": {k: tests.get(k, 0) for k in ("passed", "failed", "skipped")},
              "cuda_test_details": {k: v for k, v in tests.items() if k not in ("passed", "failed", "skipped")},
              "kernels": kernels if isinstance(kernels, list) else [], "kernels_error": None
              if isinstance(kernels, list) else kernels.get("error"),
              "zoo": zoo if isinstance(zoo, list) else [],
              "zoo_error": None if isinstance(zoo, list) else zoo.get("error")}
    path = args.output or result_path(device, datetime.date.today())
    path.parent.mkdir(parents=True, exist_ok=True)
    from attn_export.atomic import write_json

    write_json(path, result)
    t = result["cuda_tests"]
    print(f"{device}: cuda tests {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped; "
          f"{len(result['kernels'])} kernel figures; {len(result['zoo'])} zoo models; "
          f"{result['elapsed_s']['total']} s; wrote {path}")
    return 0 if ready and t["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
