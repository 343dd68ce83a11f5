"""Terminal rendering of fusion reports and parity results (the JSON forms come from the objects' as_dict)."""
from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

console = Console(stderr=False, highlight=False)


def fusion_table(report) -> Table:
    table = Table(title=f"Fusion: {report.fused} of {report.attention_layers} attention layers fused",
                  title_justify="left")
    for column in ("layer", "op", "status", "reason"):
        table.add_column(column)
    for layer in report.layers:
        status = "[green]fused[/]" if layer.status == "fused" else "[red]not fused[/]"
        table.add_row(layer.name, layer.op or "-", status, layer.reason)
    return table


def parity_table(results) -> Table:
    table = Table(title="Parity against the reference", title_justify="left")
    for column in ("backend: graph", "inputs", "output", "max abs / rel err", "atol / rtol", "result"):
        table.add_column(column, overflow="fold")
    for result in results:
        for c in result.comparisons:
            verdict = "[green]pass[/]" if c.passed else f"[red]FAIL[/] {c.reason}"
            table.add_row(f"{result.backend}: {result.graph}", result.feeds, c.name,
                          f"{c.max_abs_err:.2g} / {c.max_rel_err:.2g}", f"{c.atol:g} / {c.rtol:g}", verdict)
    return table


def _figure(value: float) -> str:
    """At most 7 characters: three significant digits, whole numbers from 1000 on, an exponent only outside
    [1e-3, 1e7) (a narrow column never cuts a figure short)."""
    if value == 0 or 1e-3 <= abs(value) < 1e3:
        return f"{value:.3g}"
    if 1e3 <= abs(value) < 1e7:
        return f"{value:.0f}"
    return f"{value:.0e}"


def bench_table(records) -> Table:
    """Median and tail latency per backend and length, readable in an 80-column terminal (every figure, min,
    mean and p95 included, is in the JSON). 'GPU' marks GPU Compute Time (CUDA events, device-resident buffers),
    'e2e' a wall-clock Latency with host copies or on the CPU."""
    settings = sorted({f"{r.device} {r.dtype}, batch {r.batch}" for r in records})
    table = Table(title=f"Latency in ms ({'; '.join(settings)})", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    table.add_column("backend: graph", overflow="fold", ratio=1)
    for column in ("time", "seq", "median", "p90", "p99", "per s", "peak MB"):
        table.add_column(column, justify="right", no_wrap=True, min_width=len(column))
    for r in records:
        lat = r.latency_ms
        peak = "-" if r.peak_memory_mb is None else f"{r.peak_memory_mb:.0f}"
        kind = "GPU" if r.trtexec_name == "GPU Compute Time" else "e2e"
        table.add_row(f"{r.backend}: {r.graph}", kind, "-" if r.seq_len is None else str(r.seq_len),
                      *(_figure(lat[k]) for k in ("median", "p90", "p99")), _figure(r.throughput_per_s), peak)
    return table
