"""Fused graph against reference graph on onnxruntime CPU, per zoo model, and how long fusion itself takes.

    python benchmarks/fusion.py                      # every zoo model, default config, its default length
    python benchmarks/fusion.py --models bigbird,vit --layers 12 --iters 20 --json out/fusion.json
    python benchmarks/fusion.py --threads 1         # one onnxruntime thread: steadier on a shared machine

For each model: export (dynamo, dynamic axes), fuse (timed), then the median latency of both graphs on the same
inputs in one process, called in turns, and their ratio (fused / reference: below 1 means the fused graph is
faster), the median of the ratios of neighbouring calls.
The fused graph runs as model.fused.portable.onnx holds it: each custom op's decomposition as a model-local function,
which is what plain onnxruntime and Triton's onnxruntime backend run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from attn_export import api  # noqa: E402
from attn_export.backends import OnnxRuntimeRunner  # noqa: E402
from attn_export.export import export_onnx  # noqa: E402


def interleaved_ms(runners, feeds, iters: int) -> list[list[float]]:
    """Latencies of each runner, the runners taking turns call by call: a change in machine load hits all."""
    for runner in runners:
        runner.run(feeds)  # warm-up
    samples = [[] for _ in runners]
    for _ in range(iters):
        for runner, times in zip(runners, samples):
            start = time.perf_counter()
            runner.run(feeds)
            times.append((time.perf_counter() - start) * 1e3)
    return samples


def bench_model(name: str, layers: int | None, iters: int, threads: int | None = None) -> dict:
    entry = models.get(name)
    config = entry.make_config({"num_layers": layers} if layers else {})
    torch.manual_seed(0)
    module = entry.build(config).eval()
    seq_len = entry.default_seq_len(config)
    probe = [{k: list(v.shape) for k, v in entry.example_inputs(config, 1, n).items()}
             for n in entry.parity_seq_lens(config)]
    inputs = entry.example_inputs(config, 1, seq_len)
    probe = probe if len(probe) > 1 else probe * 2  # a fixed-length model is probed twice at its one length
    reference = export_onnx(module, inputs, dynamic_axes=entry.dynamic_axes, probe_shapes=probe)
    timed, report = fuse_and_time(reference, {k: v.numpy() for k, v in inputs.items()}, iters, threads)
    return {"model": name, "layers": config.num_layers, "seq_len": seq_len, "fused_layers": report.fused,
            "attention_layers": report.attention_layers, **timed}


def fuse_and_time(reference, feeds: dict, iters: int, threads: int | None = None):
    """Fuse `reference` (timed), then time both graphs run in turns call by call. The ratio is the median of the
    ratios of neighbouring calls, which share the machine's load; the latencies are medians.
    Returns ({fuse_seconds, reference_ms, fused_ms, ratio}, the fusion report)."""
    start = time.perf_counter()
    fused, report = api.fuse(reference)
    fuse_s = time.perf_counter() - start
    runners = [OnnxRuntimeRunner(reference, "model.onnx", threads=threads),
               OnnxRuntimeRunner(fused, "model.fused.onnx", threads=threads)]
    ref, fus = (np.array(t) for t in interleaved_ms(runners, feeds, 3 * iters))
    return {"fuse_seconds": fuse_s, "reference_ms": float(np.median(ref)), "fused_ms": float(np.median(fus)),
            "ratio": float(np.median(fus / ref))}, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(sorted(models.ZOO)))
    parser.add_argument("--layers", type=int, help="override num_layers (e.g. 12 to time fusing a deep model)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: one per core); 1 is "
                        "the steadier measure on a shared machine")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    print(f"{'model':15s} {'len':>5s} {'fused':>7s} {'fuse s':>7s} {'ref ms':>8s} {'fused ms':>9s} {'ratio':>6s}")
    for name in args.models.split(","):
        row = bench_model(name, args.layers, args.iters, args.threads)
        rows.append(row)
        print(f"{name:15s} {row['seq_len']:5d} {row['fused_layers']:3d}/{row['attention_layers']:<3d} "
              f"{row['fuse_seconds']:7.1f} {row['reference_ms']:8.1f} {row['fused_ms']:9.1f} {row['ratio']:6.2f}",
              flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
