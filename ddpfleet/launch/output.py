"""Node output on our stdout: bounded line splitting, one writer at a time, escapes cleaned.

Once a run starts failing, the console keeps to the rank that failed first: hold((node, rank))
keeps showing that rank's lines, while every other keyed line (the ranks the gang then stops,
their torchruns) goes to its node's log only and is counted; held() says how many per rank, for
one line each at the end. A crash then reads as its traceback and a line per stopped rank, not
the ~200 lines of its peers' tracebacks (issue 24)."""

from __future__ import annotations

import sys
import threading

from ddpfleet.hygiene import clean

MAX_LINE = 64 * 1024  # a node's output line longer than this is shown in pieces


class LineSplitter:
    """Bytes in, lines out; a line longer than MAX_LINE (a progress bar redrawn with \\r,
    binary output) comes out in MAX_LINE pieces, so memory stays bounded and the work linear."""

    def __init__(self, limit: int = MAX_LINE):
        self.limit = limit
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        start = len(self.buf)
        self.buf += data
        out, begin = [], 0
        while True:
            end = self.buf.find(b"\n", max(begin, start))
            if end < 0 or end - begin > self.limit:
                if len(self.buf) - begin <= self.limit:
                    break
                end = begin + self.limit  # a piece of an over-long line, without a newline
                out.append(bytes(self.buf[begin:end]))
                begin = end
                continue
            out.append(bytes(self.buf[begin:end]))
            begin = end + 1
        del self.buf[:begin]
        return out

    def end(self) -> list[bytes]:
        rest, self.buf = bytes(self.buf), bytearray()
        return [rest] if rest else []


Key = tuple  # (node, rank): rank None for torchrun's own lines


class Output:
    """Lines from every node on our stdout, as they come, one writer at a time."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.lock = threading.Lock()
        self.kept: Key | None = None  # the rank whose lines still show once a failure began
        self.counts: dict[Key, int] = {}  # lines of every other rank since then: log only

    def hold(self, key: Key) -> None:
        """A failure began at `key`: from now on only its lines (and unkeyed ones) show."""
        with self.lock:
            self.kept = self.kept or key

    def release(self) -> None:
        """torchrun restarts its workers (--max-restarts): every rank shows again."""
        with self.lock:
            self.kept = None

    def held(self) -> dict[Key, int]:
        with self.lock:
            return dict(self.counts)

    def line(self, text: str, log=None, key: Key | None = None, show: bool = True) -> None:
        """One line to the console and to `log`; to the log only when show is False, or when
        a failure elsewhere is being held to (key is the line's node and rank)."""
        # Training output is node-controlled: escapes could forge lines, retitle or write the
        # operator's clipboard (OSC 52), on the terminal and in whatever later cats the log.
        text = clean(text)
        with self.lock:
            if key is not None and self.kept is not None and key != self.kept:
                self.counts[key] = self.counts.get(key, 0) + 1
                show = False
            if show:
                self.stream.write(text + "\n")
                self.stream.flush()
            if log is not None and not log.closed:  # closed: a node given up on, still talking
                log.write(text + "\n")
                log.flush()
