"""Terminal rendering of fusion reports and parity results (the JSON forms come from the objects' as_dict)."""
from __future__ import annotations

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


def bench_table(records) -> Table:
    settings = sorted({f"{r.device} {r.dtype}, batch {r.batch}" for r in records})
    table = Table(title=f"Latency in ms ({'; '.join(settings)})", title_justify="left")
    table.add_column("backend: graph", no_wrap=True)
    for column in ("seq", "min", "mean", "median", "p90", "p95", "p99", "per s", "peak MB"):
        table.add_column(column, justify="right")
    for r in records:
        lat = r.latency_ms
        peak = "-" if r.peak_memory_mb is None else f"{r.peak_memory_mb:.0f}"
        table.add_row(f"{r.backend}: {r.graph}", "-" if r.seq_len is None else str(r.seq_len),
                      *(f"{lat[k]:.3g}" for k in ("min", "mean", "median", "p90", "p95", "p99")),
                      f"{r.throughput_per_s:.3g}", peak)
    return table
