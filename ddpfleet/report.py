"""Output for people: tables, per-node error rows, and the exit line when a node failed."""

from __future__ import annotations

import sys
from typing import Iterable, Mapping, Sequence

from rich.console import Console
from rich.table import Table

from ddpfleet.errors import DdpfleetError, NodeError

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold")
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    return t


def show(renderable) -> None:
    console.print(renderable)


def failed(results: Mapping[str, object]) -> dict[str, NodeError]:
    return {n: r for n, r in results.items() if isinstance(r, NodeError)}


def exit_if_failed(results: Mapping[str, object], what: str) -> None:
    """Non-zero exit naming every failed node and why (after the table was shown)."""
    bad = failed(results)
    if bad:
        lines = "; ".join(str(e) for e in bad.values())
        raise DdpfleetError(f"{what} failed on {len(bad)} of {len(results)} node(s): {lines}")


def warn(message: str) -> None:
    err_console.print(f"[yellow]{message}[/yellow]")


def is_tty() -> bool:
    return sys.stdout.isatty()
