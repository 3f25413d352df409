"""Output for people: tables, per-node error rows, and the exit line when a node failed.

Text from nodes (os-release, jupyter's runtime files, stderr, errors) is data, never rich markup
and never raw terminal control: cells and messages go out as Text, cleaned (ddpfleet.hygiene).
"""

from __future__ import annotations

import sys
from typing import Iterable, Mapping, Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ddpfleet.errors import DdpfleetError, NodeError
from ddpfleet.hygiene import clean

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> Table:
    t = Table(title=None if title is None else text(title), title_justify="left",
              header_style="bold")
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*(v if isinstance(v, Text) else text(v) for v in row))
    return t


def text(value: object, style: str = "") -> Text:
    """A cell or line as literal text: '[/]' prints as itself, escapes are gone."""
    return Text("" if value is None else clean(str(value), keep_newlines=True), style=style)


def show(renderable) -> None:
    """Print a table or other renderable; a plain string is printed literally."""
    console.print(text(renderable) if isinstance(renderable, str) else renderable)


def failed(results: Mapping[str, object]) -> dict[str, NodeError]:
    return {n: r for n, r in results.items() if isinstance(r, NodeError)}


def exit_if_failed(results: Mapping[str, object], what: str) -> None:
    """Non-zero exit naming every failed node and why (after the table was shown)."""
    bad = failed(results)
    if bad:
        lines = "; ".join(clean(str(e)) for e in bad.values())
        raise DdpfleetError(f"{what} failed on {len(bad)} of {len(results)} node(s): {lines}")


def warn(message: str) -> None:
    err_console.print(text(message, style="yellow"))


def is_tty() -> bool:
    return sys.stdout.isatty()
