"""Output for people: tables, per-node error rows, and the exit line when a node failed.

Text from nodes (os-release, jupyter's runtime files, stderr, errors) is data, never rich markup
and never raw terminal control: cells and messages go out as Text, cleaned (ddpfleet.hygiene).

Tables have two layouts. On a terminal a table fits the window: long cells wrap inside their
column, the first column (the node) never does. Off a terminal (CI logs, pipes, `| less`, a file)
there is no window to fit, and rich's fallback of 80 columns would fold every long row into
several: there a table is as wide as its content and a row is one line.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence

from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ddpfleet.errors import DdpfleetError, NodeError
from ddpfleet.hygiene import clean

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

# Wider than any row we print; only bounds the measuring of an unfolded table.
UNBOUNDED = 100_000


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> Table:
    """Cells as literal text (see text()); the first column is the key (the node) and keeps its
    line on a narrow terminal while the others wrap."""
    t = Table(
        title=None if title is None else text(title), title_justify="left", header_style="bold"
    )
    for i, col in enumerate(columns):
        t.add_column(col, overflow="fold", no_wrap=i == 0)
    for row in rows:
        t.add_row(*(v if isinstance(v, Text) else text(v) for v in row))
    return t


def text(value: object, style: str = "") -> Text:
    """A cell or line as literal text: '[/]' prints as itself, escapes are gone."""
    return Text("" if value is None else clean(str(value), keep_newlines=True), style=style)


def show(renderable: RenderableType, out: Console | None = None) -> None:
    """Print a table or other renderable; a plain string is printed literally. Off a terminal
    the output is as wide as its content (see the module docstring)."""
    out = out or console
    item = text(renderable) if isinstance(renderable, str) else renderable
    if out.is_terminal:
        out.print(item)
        return
    width = natural_width(item, out)
    # A console of that width for this one print: the shared one keeps its own width, and
    # Console.print(width=...) can only narrow it.
    Console(
        file=out.file,
        width=width,
        highlight=False,
        soft_wrap=True,
        color_system=None,
        force_terminal=False,
    ).print(item)


def natural_width(renderable: RenderableType, out: Console | None = None) -> int:
    """Columns the renderable takes when nothing is wrapped (at least 1)."""
    out = out or console
    measured = Measurement.get(out, out.options.update_width(UNBOUNDED), renderable)
    return max(1, measured.maximum)


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
