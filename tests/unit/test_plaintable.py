"""plaintable draws what report.show draws off a terminal, byte for byte, or refuses."""

from __future__ import annotations

import io
import random
import string

import pytest
from rich.console import Console

from ddpfleet import ping, plaintable, report

PING_ROWS = [
    ("node0", "10.0.0.1", "yes", "Debian GNU/Linux 12 (bookworm)", "x86_64", "3.11.2",
     "12.3 GiB", "no", "1.2"),
    ("node1", "10.0.0.2", "no (unreachable): connection refused", "", "", "", "", "", ""),
]  # fmt: skip


def by_rich(columns, rows) -> str:
    """report.show's drawing to a pipe."""
    buf = io.StringIO()
    out = Console(file=buf, highlight=False, soft_wrap=True, force_terminal=False)
    report.show(report.table(None, columns, rows), out)
    return buf.getvalue()


def test_a_ping_table_is_rich_s_own():
    assert plaintable.draw(ping.COLUMNS, PING_ROWS) == by_rich(ping.COLUMNS, PING_ROWS)
    assert plaintable.draw(ping.COLUMNS, []) == by_rich(ping.COLUMNS, [])


def test_any_plain_table_is_rich_s_own():
    rng = random.Random(25)
    alphabet = string.ascii_letters + string.digits + " .:/()-_[]'\""
    drawn = 0
    for _ in range(300):
        n = rng.randint(1, 6)
        columns = [
            "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 9))) for _ in "x" * n
        ]
        rows = [
            ["".join(rng.choices(alphabet, k=rng.randint(0, 24))).strip() for _ in columns]
            for _ in range(rng.randint(0, 5))
        ]
        got = plaintable.draw(columns, rows)
        assert got == by_rich(columns, rows), (columns, rows)
        drawn += 1
    assert drawn == 300


@pytest.mark.parametrize("cell", ["two\nlines", " padded", "trailing ", "wide 日本", "tab\there"])
def test_what_rich_may_draw_otherwise_is_left_to_rich(cell: str):
    assert plaintable.draw(["node", "cell"], [["node0", cell]]) is None


def test_cells_are_cleaned_as_report_cleans_them():
    rows = [["node0", "\x1b[31mred\x1b[0m"]]
    assert plaintable.draw(["node", "cell"], rows) == by_rich(["node", "cell"], rows)


def test_a_terminal_or_a_forced_one_is_rich_s(monkeypatch):
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert plaintable.usable()
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert not plaintable.usable()
    monkeypatch.delenv("FORCE_COLOR")
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert not plaintable.usable()
