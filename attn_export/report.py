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
