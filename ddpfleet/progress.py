"""Progress for people while nodes work in parallel threads: long transfers (the wheelhouse
push, the code sync) with bytes, rate and time left, and a Board of what each node is doing now.

    with progress.transfer("node0", "code", total_bytes) as sent:
        for chunk in chunks:
            ...
            sent.advance(len(chunk))

On a terminal every transfer in flight gets a live bar in one shared display (rich Progress;
inside bootstrap's own live table it nests below it). Off a terminal (CI logs, pipes, a file) a
transfer prints a plain line at every ~10%, since a redrawn bar there would be hundreds of
lines. A small or quick transfer (under MIN_BYTES, or done within MIN_SECONDS) prints nothing:
the one-line summary after it says enough, and a bar that flashes for a moment is noise.

    with progress.Board(["node0", "node1"]) as board:   # bootstrap's live "now" table
        board.set("node0", "venv_env: python -m pip install ...")

On a terminal a Board is one live row per node, redrawn a few times a second: the text cut
between words to the window's width, and once it has not changed for ELAPSED_AFTER_S, how long
it has lasted (a pip install of torch is a minute without a new line). Off a terminal it
draws nothing (its caller prints the lines that matter).
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from ddpfleet import report

MIN_BYTES = 1 << 20
MIN_SECONDS = 1.0
STEPS = 10  # plain lines: one per tenth

Clock = Callable[[], float]


def size(n: float) -> str:
    """Bytes for people, binary units: '512 B', '1.5 KiB', '12.0 MiB', '1.25 GiB'."""
    if n < 1024:
        return f"{n:.0f} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    if n < 1024**3:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024**3:.2f} GiB"


def duration(seconds: float) -> str:
    """'0:07', '12:30', '1:02:03'; '?' before there is a rate to go by."""
    if math.isinf(seconds) or math.isnan(seconds):
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class Meter:
    """One node's transfer: bytes sent of a total, the average rate and the time left."""

    node: str
    what: str
    total: int
    clock: Clock = time.monotonic
    done: int = 0
    start: float = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.clock()

    def advance(self, n: int) -> None:
        self.done += n
        # The total may be an estimate (a tar's headers and padding): never past 100%.
        self.total = max(self.total, self.done)

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def rate(self) -> float:
        """Bytes per second since the start."""
        elapsed = self.elapsed
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float:
        rate = self.rate
        return (self.total - self.done) / rate if rate else math.inf

    @property
    def worth_showing(self) -> bool:
        return self.total >= MIN_BYTES and self.elapsed >= MIN_SECONDS

    def line(self) -> str:
        """'[node0] wheelhouse: 80.0 MiB of 800.0 MiB (10%), 40.0 MiB/s, 0:18 left': prefixed like
        the node's other lines (bootstrap steps, streamed training output)."""
        left = "done" if self.done >= self.total else f"{duration(self.eta)} left"
        return (
            f"[{self.node}] {self.what}: {size(self.done)} of {size(self.total)} "
            f"({self.fraction:.0%}), {size(self.rate)}/s, {left}"
        )


class _Lines:
    """Off a terminal: a line at every tenth reached once the transfer is worth showing."""

    def __init__(self, meter: Meter, out: Console):
        self.meter, self.out, self.shown = meter, out, 0

    def update(self) -> None:
        step = math.floor(self.meter.fraction * STEPS)
        if step > self.shown and self.meter.worth_showing:
            self.shown = step
            self.out.print(self.meter.line(), markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        pass


class _RateColumn(ProgressColumn):
    """The rate in the same binary units as the bytes column (rich's own says MB/s)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{size(speed)}/s")


class _Bars:
    """The live display shared by the transfers in flight on one console: started by the first
    bar, stopped (the finished bars left on screen) when the last transfer ends."""

    def __init__(self, out: Console, clock: Clock):
        self.out, self.clock = out, clock
        self.lock = threading.Lock()
        self.progress: Progress | None = None
        self.active = 0

    def add(self, meter: Meter) -> TaskID:
        with self.lock:
            if self.progress is None:
                self.progress = Progress(
                    TextColumn("{task.description}", markup=False),  # '[node0]' is no tag
                    BarColumn(),
                    DownloadColumn(binary_units=True),
                    _RateColumn(),
                    TimeRemainingColumn(),
                    console=self.out,
                    get_time=self.clock,
                )
                self.progress.start()
            self.active += 1
            return self.progress.add_task(
                f"[{meter.node}] {meter.what}", total=meter.total, completed=meter.done
            )

    def update(self, task: TaskID, meter: Meter) -> None:
        if self.progress is not None:
            self.progress.update(task, total=meter.total, completed=meter.done)

    def finish(self) -> None:
        with self.lock:
            self.active -= 1
            if self.active == 0 and self.progress is not None:
                self.progress.stop()
                self.progress = None


_shared: weakref.WeakKeyDictionary[Console, _Bars] = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def _bars_for(out: Console, clock: Clock) -> _Bars:
    with _shared_lock:
        if out not in _shared:
            _shared[out] = _Bars(out, clock)
        return _shared[out]


class _Bar:
    """On a terminal: this transfer's bar in the shared display, once it is worth showing."""

    def __init__(self, meter: Meter, bars: _Bars):
        self.meter, self.bars = meter, bars
        self.task: TaskID | None = None

    def update(self) -> None:
        if self.task is None and self.meter.worth_showing:
            self.task = self.bars.add(self.meter)
        if self.task is not None:
            self.bars.update(self.task, self.meter)

    def close(self) -> None:
        if self.task is not None:
            self.bars.finish()


class Transfer:
    """What the sending loop holds: advance() after each chunk sent."""

    def __init__(self, meter: Meter, view: _Lines | _Bar):
        self.meter, self.view = meter, view

    def advance(self, n: int) -> None:
        self.meter.advance(n)
        self.view.update()


@contextmanager
def transfer(
    node: str, what: str, total: int, out: Console | None = None, clock: Clock = time.monotonic
) -> Iterator[Transfer]:
    """Progress of sending about `total` bytes to `node`; see the module docstring."""
    out = out or report.console
    meter = Meter(node, what, total, clock)
    view = _Bar(meter, _bars_for(out, clock)) if out.is_terminal else _Lines(meter, out)
    try:
        yield Transfer(meter, view)
    finally:
        view.close()


ELAPSED_AFTER_S = 3.0  # a node's "now" older than this shows how long it has lasted
BOARD_REFRESH_PER_S = 4  # the elapsed time ticks by the second; 4 keeps it from lagging


class Board:
    """What each node is doing now: a live table on a terminal (see the module docstring);
    set() from any thread."""

    def __init__(self, nodes: list[str], out: Console | None = None, clock: Clock = time.monotonic):
        self.out, self.clock = out or report.console, clock
        self.state = {n: ("waiting", clock()) for n in nodes}
        self.lock = threading.Lock()
        self.live: Live | None = None

    def __enter__(self) -> Board:
        if self.out.is_terminal:
            # get_renderable: every refresh draws anew, so the elapsed time ticks between set()s
            self.live = Live(
                console=self.out,
                get_renderable=self.render,
                refresh_per_second=BOARD_REFRESH_PER_S,
                transient=True,
            )
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.stop()

    def set(self, node: str, text: str) -> None:
        with self.lock:
            self.state[node] = (text, self.clock())

    def render(self) -> Table:
        with self.lock:
            items = sorted(self.state.items())
        now = self.clock()
        # the "now" cell's room: the window less the node column, borders and padding
        key = max(len("node"), *(len(name) for name, _ in items))
        room = self.out.width - key - 7
        rows = [(name, now_cell(text, now - since, room)) for name, (text, since) in items]
        return report.table(None, ("node", "now"), rows)


def now_cell(text: str, elapsed: float, width: int) -> str:
    """'venv_env: python -m pip install … (1:05)': the text cut between words to leave room
    for the elapsed time, which shows once it reaches ELAPSED_AFTER_S."""
    tail = f" ({duration(elapsed)})" if elapsed >= ELAPSED_AFTER_S else ""
    return report.shorten(text, width - len(tail)) + tail
