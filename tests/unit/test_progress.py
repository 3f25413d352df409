"""Transfer progress with a fake clock: lines every ~10% off a terminal, bars on one, and
nothing for a small or quick transfer; bootstrap's live "now" table on a terminal of a width."""

from __future__ import annotations

import io
import math
import re
import time

import pytest
from rich.console import Console

from ddpfleet import bootstrap, progress, report
from ddpfleet.progress import MIN_BYTES, Meter, duration, size

MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _send(out: Console, total: int, seconds: float, chunks: int = 100, sent: int | None = None):
    """Send `sent` (default: all of) `total` bytes in equal chunks over `seconds`."""
    clock = Clock()
    sent = total if sent is None else sent
    with progress.transfer("node0", "wheelhouse", total, out=out, clock=clock) as t:
        for _ in range(chunks):
            clock.now += seconds / chunks
            t.advance(sent // chunks)
    return t


def _plain() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=40), buf


def test_off_a_terminal_a_long_transfer_prints_a_line_every_tenth():
    out, buf = _plain()
    _send(out, 100 * MIB, seconds=20)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 10  # from 10% to 100%, one line each, never folded at 40 columns
    assert lines[0] == "[node0] wheelhouse: 10.0 MiB of 100.0 MiB (10%), 5.0 MiB/s, 0:18 left"
    assert lines[-1] == "[node0] wheelhouse: 100.0 MiB of 100.0 MiB (100%), 5.0 MiB/s, done"


def test_the_first_second_prints_nothing():
    out, buf = _plain()
    _send(out, 100 * MIB, seconds=2.5)  # 40% per second: 0.4 s in is already past 10%
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("[node0] wheelhouse: 40.0 MiB of 100.0 MiB (40%)")
    assert lines[-1].endswith("done")


def test_small_or_quick_transfers_print_nothing():
    out, buf = _plain()
    _send(out, MIN_BYTES - 1, seconds=30)  # small, however slow
    _send(out, 500 * MIB, seconds=0.9)  # big, but over at once
    assert buf.getvalue() == ""


def test_an_estimated_total_never_goes_past_100_percent():
    meter = Meter("node0", "code", 1000, clock=Clock())
    meter.advance(1500)
    assert meter.total == 1500 and meter.fraction == 1.0


def test_on_a_terminal_a_long_transfer_draws_a_bar_that_stays_when_done():
    buf = io.StringIO()
    terminal = Console(file=buf, width=100, force_terminal=True, color_system=None)
    _send(terminal, 100 * MIB, seconds=20)
    shown = buf.getvalue()
    assert "[node0] wheelhouse" in shown
    assert "100.0/100.0 MiB" in shown


def test_on_a_terminal_a_quick_transfer_draws_nothing():
    buf = io.StringIO()
    terminal = Console(file=buf, width=100, force_terminal=True, color_system=None)
    _send(terminal, 100 * MIB, seconds=0.5)
    assert "wheelhouse" not in buf.getvalue()


def test_units_and_durations():
    assert [size(n) for n in (512, 1536, 12 * MIB, 1.25 * 1024 * MIB)] == [
        "512 B",
        "1.5 KiB",
        "12.0 MiB",
        "1.25 GiB",
    ]
    assert [duration(s) for s in (7, 750, 3723, math.inf)] == ["0:07", "12:30", "1:02:03", "?"]


def test_the_wheelhouse_push_reports_every_byte_it_sends_under_the_node_name(tmp_path, monkeypatch):
    from contextlib import contextmanager

    from ddpfleet.engine import wheelhouse
    from tests.unit.test_wheelhouse import DirSFTP, node_run

    seen = []

    @contextmanager
    def transfer(node, what, total):
        meter = Meter(node, what, total, clock=Clock())
        seen.append(meter)
        yield progress.Transfer(meter, progress._Lines(meter, Console(file=io.StringIO())))

    monkeypatch.setattr(wheelhouse.progress, "transfer", transfer)
    (tmp_path / "node").mkdir()
    files = []
    for name, n in (("a.whl", 10), ("b.whl", 20)):
        files.append(tmp_path / name)
        files[-1].write_bytes(b"x" * n)
    wheelhouse.push(DirSFTP(), str(tmp_path / "node"), files, node_run, node="node1")
    [meter] = seen
    assert (meter.node, meter.what, meter.total, meter.done) == ("node1", "wheelhouse", 30, 30)


def test_the_code_sync_estimates_its_tar_close_to_what_it_sends(tmp_path):
    from ddpfleet.launch import sync

    (tmp_path / "big.bin").write_bytes(b"x" * 3_000_000)
    (tmp_path / "small.py").write_text("print(1)\n")
    (tmp_path / "link").symlink_to("small.py")
    files = sync.project_files(tmp_path)
    paths = tuple(sorted(files))
    buf = io.BytesIO()
    sync.write_tar(buf, tmp_path, files, paths)
    estimate, actual = sync.tar_size(tmp_path, paths), len(buf.getvalue())
    assert estimate <= actual < estimate + 10240  # the rest is the tar's last record padding


def test_on_a_terminal_bars_nest_under_bootstraps_live_table():
    from rich.live import Live

    buf = io.StringIO()
    terminal = Console(file=buf, width=100, force_terminal=True, color_system=None)
    with Live("node0  venv_env: wheelhouse", console=terminal, transient=True):
        _send(terminal, 100 * MIB, seconds=20)
    assert "[node0] wheelhouse" in buf.getvalue()


# --- the Board: bootstrap's live "now" table ------------------------------------------------

PIP = (
    "/opt/ddpfleet/venv/bin/python -m pip install --disable-pip-version-check --no-input "
    "--no-index --find-links /var/lib/ddpfleet/wheelhouse torch==2.13.0 numpy jupyterlab"
)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def _terminal(width: int) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=width, force_terminal=True, color_system=None), buf


def _now_cells(drawn: str, node: str) -> list[str]:
    """The "now" cells of a node's rows in everything drawn (every frame), control codes gone."""
    lines = ANSI.sub("\n", drawn).splitlines()
    return [line.split("│")[2].strip() for line in lines if f"│ {node} " in line]


def _whole_words(cell: str, text: str) -> bool:
    words = set(text.split()) | {"…"}
    return all(w in words or re.fullmatch(r"\(\d+:\d\d\)", w) for w in cell.split())


@pytest.mark.parametrize("width", [60, 100, 200])
def test_bootstrap_now_cell_never_cuts_a_word(width, tmp_path, monkeypatch) -> None:
    out, buf = _terminal(width)
    monkeypatch.setattr(report, "console", out)
    monkeypatch.setattr(report, "is_tty", lambda: True)
    with bootstrap.Progress(["node0", "node1"], tmp_path / "bootstrap.log") as p:
        p.doing("node0", PIP)
        time.sleep(0.6)  # the live display redraws on its own
    cells = _now_cells(buf.getvalue(), "node0")
    assert cells and "install" in cells[-1], buf.getvalue()
    assert all(_whole_words(c, PIP) for c in cells), cells
    for line in ANSI.sub("\n", buf.getvalue()).splitlines():
        assert len(line) <= width


def test_bootstrap_long_steps_show_elapsed_time(tmp_path, monkeypatch) -> None:
    out, buf = _terminal(100)
    monkeypatch.setattr(report, "console", out)
    clock = Clock()
    with bootstrap.Progress(["node0", "node1"], tmp_path / "bootstrap.log", clock=clock) as p:
        p.doing("node0", PIP)
        clock.now += 1
        p.board.live.refresh()
        first = _now_cells(buf.getvalue(), "node0")[-1]
        clock.now += 64  # pip is still installing, nothing new said
        p.board.live.refresh()
        later = _now_cells(buf.getvalue(), "node0")[-1]
        p.doing("node0", "venv_env: verify ok")
        p.board.live.refresh()
        after = _now_cells(buf.getvalue(), "node0")[-1]
    assert not re.search(r"\(\d+:\d\d\)", first), first
    assert later.endswith("(1:05)") and "pip install" in later, later
    assert after == "venv_env: verify ok"
    assert _now_cells(buf.getvalue(), "node1")[-1] == "waiting (1:05)"


def test_now_cell_and_shorten() -> None:
    assert progress.now_cell("venv_env: packages ok", 2.9, 40) == "venv_env: packages ok"
    assert progress.now_cell("venv_env: packages ok", 65, 40) == "venv_env: packages ok (1:05)"
    assert progress.now_cell(PIP, 65, 50) == "/opt/ddpfleet/venv/bin/python -m pip … (1:05)"
    assert report.shorten("a  b\nc", 10) == "a b c"
    assert report.shorten("abc defgh", 8) == "abc …"
    assert report.shorten("/a/very/long/path x", 6) == "…"  # never half a word


def test_off_a_terminal_the_board_draws_nothing() -> None:
    out, buf = _plain()
    with progress.Board(["node0"], out=out) as board:
        board.set("node0", PIP)
    assert board.live is None and buf.getvalue() == ""
