"""A table off a terminal, drawn as report.show draws it there, without loading rich.

Off a terminal report.show prints a table as wide as its content, a row a line, with no colour
(see report's docstring): rich's heavy-head box around plain text, which needs none of rich's
layout. The lean path (ddpfleet/__main__.py) draws `ping` with this and saves rich's ~30 ms
of imports; the output is byte for byte rich's (tests/unit/test_plaintable.py draws both).
Anything rich could draw differently is refused (None), and then rich draws it: a terminal, an
environment variable that makes rich treat a pipe as one, a cell that is not printable ASCII
on one line, or one with a space at either end.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence

from ddpfleet.hygiene import clean

# rich's Console treats a pipe as a terminal when one of these is set
TERMINAL_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "JUPYTER_COLUMNS")
_PLAIN = re.compile(r"(?:[!-~](?:[ -~]*[!-~])?)?")  # printable ASCII, no space at either end


def usable() -> bool:
    """Whether report.show would draw to stdout off a terminal, without colour."""
    if any(os.environ.get(name) for name in TERMINAL_ENV) or "idlelib" in sys.modules:
        return False
    try:
        return not sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def draw(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str | None:
    """The table's text, every line ending in a newline; None when rich must draw it. Cells
    are cleaned as report.text cleans them."""
    cells = [list(columns), *([clean(str(c), keep_newlines=True) for c in row] for row in rows)]
    if any(len(row) != len(columns) for row in cells):
        return None
    if not all(_PLAIN.fullmatch(cell) for row in cells for cell in row):
        return None
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]

    def rule(left: str, fill: str, cross: str, right: str) -> str:
        return left + cross.join(fill * (w + 2) for w in widths) + right + "\n"

    def line(bar: str, row: Sequence[str]) -> str:
        return bar + bar.join(f" {cell.ljust(w)} " for cell, w in zip(row, widths)) + bar + "\n"

    return "".join(
        [
            rule("┏", "━", "┳", "┓"),
            line("┃", cells[0]),
            rule("┡", "━", "╇", "┩"),
            *(line("│", row) for row in cells[1:]),
            rule("└", "─", "┴", "┘"),
        ]
    )
