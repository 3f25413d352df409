"""Tables as people read them: unfolded off a terminal, wrapped in their column on one."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ddpfleet import report

ROOT = Path(__file__).resolve().parents[2]
LONG = (
    "python -m torch.distributed.run --nnodes 2 --node_rank 0 --master_addr 10.0.0.10 "
    "--master_port 29500 --nproc_per_node 4 scripts/train_ddp.py --epochs 3 --lr 0.1"
)
ROWS = [("node0", LONG, "ok"), ("node-with-a-long-name", "short", "[run r1] [bold]x")]


def _pipe(code: str, columns: str | None) -> str:
    """stdout of a child whose stdout is a pipe, as in CI logs and `| less`."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns is not None:
        env["COLUMNS"] = columns
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout


def _data_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("│")]


SHOW_TABLE = (
    "from ddpfleet import report\n"
    f"report.show(report.table('plan', ('node', 'command', 'state'), {ROWS!r}))\n"
)


def test_off_a_terminal_a_row_is_one_line_whatever_columns_says():
    for columns in (None, "40", "80"):
        rows = _data_lines(_pipe(SHOW_TABLE, columns))
        assert len(rows) == len(ROWS), (columns, rows)
        assert LONG in rows[0]
        assert "node-with-a-long-name" in rows[1]
        assert "[run r1] [bold]x" in rows[1]  # cells are text, never markup


def test_off_a_terminal_rich_tables_built_elsewhere_are_unfolded_too():
    # gpustatus and doctor build their own rich Table inside a Group, shown through report.show
    table = Table("node", "detail")
    table.add_row("node0", Text(LONG))
    out = io.StringIO()
    report.show(Group(table, Text("a note " * 30)), out=Console(file=out, width=80))
    lines = out.getvalue().splitlines()
    assert [line for line in lines if LONG in line]
    assert ("a note " * 30).rstrip() in lines[-1]


def test_off_a_terminal_a_plain_string_is_one_line():
    out = io.StringIO()
    report.show("x" * 300, out=Console(file=out, width=80))
    assert out.getvalue() == "x" * 300 + "\n"


def test_on_a_terminal_long_cells_wrap_in_their_column_and_the_node_never_does():
    out = io.StringIO()
    terminal = Console(file=out, width=60, force_terminal=True, color_system=None)
    report.show(report.table(None, ("node", "command", "state"), ROWS), out=terminal)
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 60
    assert any("node-with-a-long-name" in line for line in lines)  # whole, on one line
    assert len(_data_lines(out.getvalue())) > len(ROWS)  # the command wrapped
    data = _data_lines(out.getvalue())
    second = next(i for i, line in enumerate(data) if "node-with-a-long-name" in line)
    first_row = [line.split("│") for line in data[:second]]
    command = "".join(cells[2] for cells in first_row).replace(" ", "")
    assert command == LONG.replace(" ", "")  # wrapped, nothing cut


def test_natural_width_is_the_longest_line():
    assert report.natural_width(Text("abc\nabcdef")) == 6
    assert report.natural_width(Text("")) == 1
