"""Benchmark the CUDA kernels of plugins_trt/ against their torch references and against dense SDPA.

    python benchmarks/cuda_kernels.py                      # every op, 1k..16k tokens, fp16
    python benchmarks/cuda_kernels.py --ops BlockSparseAttention --lengths 4096 8192 --json out/kernels.json

Per op and sequence length it prints the kernel's median time (CUDA events), its effective TFLOP/s (only the
work it performs: the listed blocks of a block-sparse layout, the lower triangle of a causal one) and GB/s
(inputs read once plus the output written once), the contract's torch reference on the same inputs (skipped past
--ref-max-len, or when it runs out of memory) and torch's dense scaled_dot_product_attention at the op's
[B, H, N, D]. The closing lines check the goals: block-sparse >= 50% of SDPA's TFLOP/s at >= 4096 tokens,
linear attention >= 60% of DRAM bandwidth, every kernel faster than its reference.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attn_export.backends import cuda_ops  # noqa: E402
from attn_export.ops import OPS  # noqa: E402

# DRAM bandwidth (GB/s) by device name, for the bandwidth goal; --peak-gbps overrides.
PEAK_GBPS = {"H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H200": 4800.0, "A100-SXM4-80GB": 2039.0,
             "A100-SXM4-40GB": 1555.0, "A100-PCIE-40GB": 1555.0, "A100 80GB PCIe": 1935.0, "Orin": 204.8}


@dataclass
class Case:
    op_type: str
    label: str
    tensors: tuple
    attrs: dict
    flops: float  # work the kernel performs
    bytes: float  # inputs read once + output written once
    sdpa: tuple[int, int, int, int]  # [B, H, N, D] of the dense SDPA comparison
    extra: dict = field(default_factory=dict)


def nbytes(*tensors) -> float:
    return float(sum(t.numel() * t.element_size() for t in tensors if t is not None))


def bigbird_table(blocks: int, random_blocks: int, generator: torch.Generator) -> torch.Tensor:
    """[1, nb, 3 + r]: the window (i-1, i, i+1) and r random blocks per query block (repeats allowed)."""
    rows = torch.arange(blocks)
    window = torch.stack([rows - 1, rows, rows + 1], -1)
    window[0, 0], window[-1, -1] = -1, -1
    random = torch.randint(0, blocks, (blocks, random_blocks), generator=generator)
    return torch.cat([window, random], -1)[None].to(torch.int32)


def visible_block_pairs(table: torch.Tensor, blocks: int, global_blocks: int) -> int:
    pairs = 0
    for i, row in enumerate(table[0].tolist()):
        if i < global_blocks or i >= blocks - global_blocks:
            pairs += blocks
        else:
            pairs += len({b for b in row if 0 <= b < blocks})
    return pairs


def make_cases(n: int, args, device: str) -> list[Case]:
    dt = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    b, h, d = args.batch, args.heads, args.head_dim
    cases = []
    q, k, v = rand(b, n, h * d), rand(b, n, h * d), rand(b, n, h * d)
    out_bytes = nbytes(q)

    cases.append(Case("DenseAttention", "dense", (q, k, v), {"num_heads": h},
                      4.0 * b * h * n * n * d, nbytes(q, k, v) + out_bytes, (b, h, n, d)))

    bs, gb = args.block_size, 1
    if n % bs == 0:
        nb = n // bs
        table = bigbird_table(nb, 3, g)
        pairs = visible_block_pairs(table, nb, gb)
        cases.append(Case("BlockSparseAttention", f"bigbird bs={bs}", (q, k, v, table.to(device)),
                          {"num_heads": h, "block_size": bs, "global_blocks": gb},
                          4.0 * b * h * pairs * bs * bs * d, nbytes(q, k, v, table) + out_bytes, (b, h, n, d),
                          {"density": pairs / (nb * nb)}))

    m = args.features
    w = rand(m, d)
    for causal in (0, 1):
        flops = 2.0 * b * h * n * m * (2 * d + 2 * d)  # phi(q), phi(k), the state and its read-out
        if causal:
            flops += 2.0 * b * h * n * 64 * (m + d)  # the in-chunk quadratic part
        cases.append(Case("KernelizedAttention", f"favor M={m}" + (" causal" if causal else ""), (q, k, v, w),
                          {"num_heads": h, "feature_map": "favor_positive", "causal": causal},
                          flops, nbytes(q, k, v, w) + out_bytes, (b, h, n, d)))

    span = args.span
    rel_key, rel_query = rand(2 * span, h * d), rand(2 * span, h * d)
    cases.append(Case("DisentangledAttention", f"deberta span={span}", (q, k, v, rel_key, rel_query),
                      {"num_heads": h, "span": span, "max_position": 2 * span},
                      4.0 * b * h * n * n * d + 2 * 2.0 * b * h * n * 2 * span * d,
                      nbytes(q, k, v, rel_key, rel_query) + out_bytes, (b, h, n, d)))

    dm, f, e = args.model_dim, 4 * args.model_dim, args.experts
    x = rand(b, n, dm)
    router, w_in = rand(dm, e, scale=dm ** -0.5), rand(e, dm, f, scale=dm ** -0.5)
    w_out = rand(e, f, dm, scale=f ** -0.5)
    cases.append(Case("MixtureOfExperts", f"switch E={e} d={dm}", (x, router, w_in, w_out), {"capacity_factor": 1.0},
                      2.0 * b * n * dm * e + 4.0 * b * n * dm * f, nbytes(x, router, w_in, w_out) + nbytes(x),
                      (b, h, n, d)))

    c = args.channels
    u = rand(b, n, c)
    taps = (torch.randn(c, n, generator=g) * torch.exp(-torch.arange(n) / 100.0)).to(device=device, dtype=dt)
    cases.append(Case("LongConvolution", f"bidirectional C={c}", (u, taps, rand(c), taps.clone()), {"channels": c},
                      2.0 * b * c * n * n, nbytes(u, taps, taps) + nbytes(u), (b, h, n, d)))
    return [case for case in cases if not args.ops or case.op_type in args.ops]


def time_ms(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def run_reference(case: Case, n: int, args) -> float | str:
    if n > args.ref_max_len:
        return "skipped"
    reference = OPS[case.op_type].reference
    attrs = OPS[case.op_type].resolve_attrs(case.attrs)
    try:
        with torch.no_grad():
            return time_ms(lambda: reference(*case.tensors, **attrs), max(3, args.iters // 5), 1)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "oom"


def run_sdpa(shape, args) -> float:
    b, h, n, d = shape
    dt = getattr(torch, args.dtype)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dt) for _ in range(3))
    with torch.no_grad():
        return time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), args.iters, args.warmup)


def peak_gbps(args) -> float | None:
    if args.peak_gbps:
        return args.peak_gbps
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="*", choices=sorted(OPS), help="ops to run (default: all)")
    parser.add_argument("--lengths", nargs="*", type=int, default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--features", type=int, default=256, help="favor random features M")
    parser.add_argument("--span", type=int, default=256)
    parser.add_argument("--model-dim", type=int, default=768)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--ref-max-len", type=int, default=8192, help="longest sequence the torch reference runs at")
    parser.add_argument("--peak-gbps", type=float, help="DRAM bandwidth for the linear-attention goal")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    reason = cuda_ops.unavailable_reason()
    if reason:
        print(f"error: cannot benchmark the CUDA kernels: {reason}", file=sys.stderr)
        return 2
    cuda_ops.load_extension()
    torch.backends.cuda.matmul.allow_tf32 = False

    rows = []
    header = (f"{'op':<22}{'case':<24}{'N':>6}{'ms':>9}{'TFLOP/s':>9}{'GB/s':>8}{'ref ms':>9}{'speedup':>8}"
              f"{'sdpa ms':>9}{'sdpa TF/s':>10}{'vs sdpa':>8}")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}")
    print(header)
    print("-" * len(header))
    for n in args.lengths:
        sdpa_cache: dict[tuple, float] = {}
        for case in make_cases(n, args, "cuda"):
            ms = time_ms(lambda c=case: cuda_ops.run_op(c.op_type, *c.tensors, **c.attrs), args.iters, args.warmup)
            tflops = case.flops / ms / 1e9
            gbps = case.bytes / ms / 1e6
            ref = run_reference(case, n, args)
            if case.sdpa not in sdpa_cache:
                sdpa_cache[case.sdpa] = run_sdpa(case.sdpa, args)
            sdpa_ms = sdpa_cache[case.sdpa]
            b, h, _, d = case.sdpa
            sdpa_tflops = 4.0 * b * h * n * n * d / sdpa_ms / 1e9
            row = {"op": case.op_type, "case": case.label, "seq_len": n, "ms": ms, "tflops": tflops, "gbps": gbps,
                   "reference_ms": ref if isinstance(ref, float) else None, "reference_note": None
                   if isinstance(ref, float) else ref, "sdpa_ms": sdpa_ms, "sdpa_tflops": sdpa_tflops, **case.extra}
            rows.append(row)
            speedup = f"{ref / ms:7.1f}x" if isinstance(ref, float) else f"{ref:>8}"
            ref_ms = f"{ref:9.3f}" if isinstance(ref, float) else f"{'-':>9}"
            print(f"{case.op_type:<22}{case.label:<24}{n:>6}{ms:9.3f}{tflops:9.1f}{gbps:8.0f}{ref_ms}{speedup}"
                  f"{sdpa_ms:9.3f}{sdpa_tflops:10.1f}{tflops / sdpa_tflops:8.2f}")

    print()
    peak = peak_gbps(args)
    for row in rows:
        if row["op"] == "BlockSparseAttention" and row["seq_len"] >= 4096:
            ok = row["tflops"] >= 0.5 * row["sdpa_tflops"]
            print(f"goal block-sparse >= 50% SDPA TFLOP/s at N={row['seq_len']}: "
                  f"{row['tflops'] / row['sdpa_tflops']:.0%} {'ok' if ok else 'MISSED'}")
        if row["op"] == "KernelizedAttention" and peak:
            ok = row["gbps"] >= 0.6 * peak
            print(f"goal linear attention >= 60% of {peak:.0f} GB/s ({row['case']}, N={row['seq_len']}): "
                  f"{row['gbps'] / peak:.0%} {'ok' if ok else 'MISSED'}")
        if row["reference_ms"] is not None and row["reference_ms"] <= row["ms"]:
            print(f"goal faster than the reference MISSED: {row['op']} N={row['seq_len']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
                  "peak_gbps": peak, "results": rows}
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0 if all(math.isfinite(r["ms"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
