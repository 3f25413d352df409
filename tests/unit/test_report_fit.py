"""Tables on a narrow terminal (issue 25 item 5): no word cut in two, optional columns left out
before rows grow tall; as wide as their content off a terminal."""

from __future__ import annotations

import io

import pytest
from rich.console import Console, Group

from ddpfleet import report
from ddpfleet.launch.ssh import runstate

PING = (
    ("node", "address", "reachable", "os", "arch", "python3", "free disk", "nvidia-smi", "rtt"),
    [
        (f"node{i}", f"10.232.0.1{i}", "yes", "Debian GNU/Linux 12 (bookworm)", "x86_64",
         "3.11.2", "58.3 GiB", "no", "268.4")
        for i in range(3)
    ],
)  # fmt: skip
RUNS = [
    ("20261206-051233-ab12cd", "SUCCEEDED", "node[0-7]", "8x8", "2026-12-06 05:12:33", "1m02s",
     "node0=0 node1=0 node2=0", ""),
    ("restart1", "LOST", "node[0-1]", "2x2", "2026-12-06 05:12:33", "3m10s", "node0=- node1=-",
     "node2 unreachable: timeout: no answer from 10.232.0.12:22 within 5s"),
]  # fmt: skip


def rendered(renderable, width: int) -> str:
    out = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
    report.show(renderable, out=out)
    return out.file.getvalue()


def body_rows(text: str) -> list[list[str]]:
    """Each table row of the rendered text as its lines (rows start with a node/run cell)."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        if line.split("│")[1].strip():
            rows.append([line])
        elif rows:
            rows[-1].append(line)
    return rows


@pytest.mark.parametrize("width", [80, 100, 120, 200])
def test_no_word_is_cut_at_any_width(width):
    text = rendered(report.table(None, *PING, optional=("rtt", "arch")), width)
    assert max(map(len, text.splitlines())) <= width
    lines = text.splitlines()
    kept = [i for i, name in enumerate(PING[0]) if name.split()[0] in text]
    assert len(kept) >= len(PING[0]) - 2  # at most the two optional columns left out
    for row in PING[1]:
        for word in (w for i in kept for w in row[i].split()):
            assert any(word in line for line in lines), (word, text)


def test_a_plan_group_is_fitted_too():
    group = Group(report.text("run r1"), report.table(None, *PING))
    text = rendered(group, 100)
    assert all(f"10.232.0.1{i}" in text for i in range(3)), text


def test_runs_leave_out_optional_columns_before_rows_grow_tall():
    optional = ("started", "shape", "exit", "duration")  # as cli/runs.py says
    wide = rendered(report.table(None, runstate.COLUMNS, RUNS, optional), 200)
    assert "started" in wide and "2026-12-06 05:12:33" in wide
    assert all(len(r) == 1 for r in body_rows(wide))
    narrow = rendered(report.table(None, runstate.COLUMNS, RUNS, optional), 100)
    assert "started" not in narrow and "node0=-" not in narrow, narrow
    assert "duration" in narrow and "10.232.0.12:22" in narrow
    assert all(len(r) <= 2 for r in body_rows(narrow)), narrow


def test_off_a_terminal_a_row_is_one_line():
    out = Console(file=io.StringIO(), width=80, color_system=None)
    report.show(report.table(None, *PING), out=out)
    assert len(body_rows(out.file.getvalue())) == 3
    assert all(len(r) == 1 for r in body_rows(out.file.getvalue()))


def test_runs_rows_name_their_nodes_as_a_hostlist():
    nodes = tuple(f"n{i}" for i in range(8))
    view = runstate.RunView("r", "RUNNING", nodes, started=None, ended=None)
    assert runstate.rows([view])[0][2] == "n[0-7]"
