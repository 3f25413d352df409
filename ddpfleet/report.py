"""Output for people: tables, per-node error rows, and the exit line when a node failed.

Text from nodes (os-release, jupyter's runtime files, stderr, errors) is data, never rich markup
and never raw terminal control: cells and messages go out as Text, cleaned (ddpfleet.hygiene).

Tables have two layouts. On a terminal a table fits the window: long cells wrap inside their
column, the first column (the node) never does, and no column is narrower than its longest word
(fit(): an address or a node list is never cut in two; the prose columns give up the room, and a
table that still cannot fit drops the columns its caller marked optional, least useful first).
Off a terminal (CI logs, pipes, `| less`, a file) there is no window to fit, and rich's fallback
of 80 columns would fold every long row into several: there a table is as wide as its content
and a row is one line.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterable, Mapping, Sequence

from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ddpfleet.errors import DdpfleetError, NodeError
from ddpfleet.hygiene import clean

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

# Wider than any row we print; only bounds the measuring of an unfolded table.
UNBOUNDED = 100_000


def table(
    title: str | None,
    columns: Sequence[str],
    rows: Iterable[Sequence[object]],
    optional: Sequence[str] = (),
) -> Table:
    """Cells as literal text (see text()); the first column is the key (the node) and keeps its
    line on a narrow terminal while the others wrap. `optional`: columns a terminal too narrow
    for the table may leave out, the least useful first (see fit())."""
    t = Table(
        title=None if title is None else text(title), title_justify="left", header_style="bold"
    )
    t.optional = tuple(optional)  # read by fit()
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
        out.print(fit(item, out.width))
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


def fit(renderable: RenderableType, width: int) -> RenderableType:
    """A table (or the tables of a Group) sized for `width` columns without cutting a word.

    Each column gets at least its longest word (its header's too); the spare room is shared,
    short cells getting all they want. The table's optional columns go, least useful first,
    while its tallest row would take more than TALL lines; if even the words do not fit
    without them, a table is left to rich."""
    if isinstance(renderable, Group):
        for i, part in enumerate(renderable.renderables):
            renderable.renderables[i] = fit(part, width)
        return renderable
    if not isinstance(renderable, Table) or not all(
        isinstance(cell, (str, Text)) for c in renderable.columns for cell in (c.header, *c._cells)
    ):
        return renderable  # words are counted in text; anything else is rich's to lay out
    t = renderable
    optional = [c for name in getattr(t, "optional", ()) for c in t.columns if c.header == name]
    best = None  # (tallest row, columns dropped, widths)
    for k in range(len(optional) + 1):
        kept = [c for c in t.columns if c not in optional[:k]]
        widths = _layout(kept, width)
        if widths is None:
            continue
        tall = _tallest(kept, widths)
        if best is None or tall < best[0]:
            best = (tall, k, widths)
        if tall <= TALL:
            break
    if best is None:
        return t
    _, k, widths = best
    t.columns[:] = [c for c in t.columns if c not in optional[:k]]
    for i, (column, w) in enumerate(zip(t.columns, widths)):
        column._index = i
        column.width = w
    return t


TALL = 2  # lines a table row may take on a narrow terminal before optional columns go


def _layout(columns, width: int) -> list[int] | None:
    """Content widths for the columns within `width`, none narrower than its longest word;
    None when even that does not fit."""
    room = width - (len(columns) + 1) - 2 * len(columns)  # borders, cell padding
    least, most = zip(*(_word_widths(c, first=c._index == 0) for c in columns))
    if sum(most) <= room:
        return list(most)
    if sum(least) > room:
        return None
    widths = list(least)
    spare = room - sum(widths)
    todo = sorted(range(len(widths)), key=lambda i: most[i] - least[i])
    for n, i in enumerate(todo):
        give = min(most[i] - least[i], spare // (len(todo) - n))
        widths[i] += give
        spare -= give
    return widths


def _lines(column) -> list[list[str]]:
    """Each of the column's cells (the header first) as its lines."""
    cells = (column.header, *column._cells)
    return [(c.plain if isinstance(c, Text) else str(c)).splitlines() or [""] for c in cells]


def _word_widths(column, first: bool) -> tuple[int, int]:
    """(the longest word, the longest line) of a column's header and cells; the key column
    (never wrapped) needs its longest line."""
    lines = [line for cell in _lines(column) for line in cell]
    longest = max([1, *map(len, lines)])
    words = max([1, *(len(w) for line in lines for w in line.split())])
    return (longest if first or column.no_wrap else min(words, longest)), longest


def _tallest(columns, widths: Sequence[int]) -> int:
    """Lines the tallest body row takes, each cell wrapped at its words."""
    heights = [
        [sum(max(1, len(textwrap.wrap(line, w))) for line in cell) for cell in _lines(c)[1:]]
        for c, w in zip(columns, widths)
    ]
    return max((max(row) for row in zip(*heights)), default=1)


def shorten(value: str, width: int) -> str:
    """`value` on one line of at most `width` columns, cut only between words: the words that
    fit, then ' …' ('pip install torch …'). A first word longer than the whole room is left
    out rather than cut (a '…' alone): half a path reads as another path."""
    words = value.split()
    line = " ".join(words)
    if len(line) <= width:
        return line
    kept = ""
    for word in words:
        if len(f"{kept} {word} …".lstrip()) > width:
            break
        kept = f"{kept} {word}".lstrip()
    return f"{kept} …".lstrip() if width >= len(kept) + 2 else kept


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
