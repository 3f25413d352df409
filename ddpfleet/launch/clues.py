"""What a node's torchrun output says (pure): the global rank of a line, the rank to blame,
each failed rank's exit code, and which lines are the exit barrier's harmless noise."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

RANK_LINE = re.compile(r"^\[([A-Za-z_][\w-]*?)(\d+)\]:(.*)$")
# torchrun's ChildFailedError summary: '  rank      : 3 (local_rank: 1)', '  exitcode  : 1 (pid...'
SUMMARY_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
SUMMARY_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
# torch >= 2.4 prefixes a worker's uncaught exception with '[rank3]: '.
TRACEBACK = re.compile(r"^(\[rank\d+\]:\s*)?Traceback \(most recent call last\)")
# The agent's own word that a worker died, logged as soon as it sees it, seconds before its
# own exit (teardown of an interpreter with torch loaded): the earliest reliable signal.
# What a rank prints when a peer went away under it (its collective's transport or the store):
# the consequence of another rank's failure, never the first cause while another node failed too.
PEER_GONE = re.compile(
    r"Connection (?:closed|reset) by peer|Broken pipe|gloo::IoException|"
    r"NCCL communicator was aborted|DistNetworkError|recvValue"
)
AGENT_SAW_FAILURE = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")


def split_rank(line: str, node_rank: int, nproc: int) -> tuple[int | None, str]:
    """torchrun --tee prefixes a worker's lines with '[default<local rank>]:'; give back the
    global rank (node_rank * nproc + local rank) and the text. Agent lines have no rank."""
    m = RANK_LINE.match(line)
    if not m:
        return None, line
    return node_rank * nproc + int(m.group(2)), m.group(3)


@dataclass
class Clues:
    """What one node's output says about a failure, fed line by line (pure).

    The blamed rank is the first to print a traceback: a rank that raises prints it before it
    dies, its peers only fail after it died. Without one (a segfault, the OOM killer), torchrun's
    word: its 'failed (exitcode: ...)' line, or the root cause of its summary. The summary also
    gives each failed rank's exit code.
    """

    node_rank: int = 0
    nproc: int = 1
    traceback_rank: int | None = None
    agent_rank: int | None = None
    first_at: float | None = None  # when the first clue arrived (monotonic)
    exits: dict[int, int] = field(default_factory=dict)
    _summary_rank: int | None = None

    @property
    def rank(self) -> int | None:
        return self.traceback_rank if self.traceback_rank is not None else self.agent_rank

    def feed(self, rank: int | None, body: str, now: float) -> bool:
        """Take one line; True when it is torchrun saying that one of its workers failed."""
        if rank is not None:
            if self.traceback_rank is None and TRACEBACK.match(body):
                self.traceback_rank = rank
                self.first_at = now if self.first_at is None else self.first_at
            return False
        if m := AGENT_SAW_FAILURE.search(body):
            failed = self.node_rank * self.nproc + int(m.group(2))
            self.agent_rank = failed if self.agent_rank is None else self.agent_rank
            self.exits.setdefault(failed, int(m.group(1)))
            self.first_at = now if self.first_at is None else self.first_at
            return True
        if m := SUMMARY_RANK.match(body):
            self._summary_rank = int(m.group(1))
        elif (m := SUMMARY_EXIT.match(body)) and self._summary_rank is not None:
            self.exits[self._summary_rank] = int(m.group(1))
            self._summary_rank = None
        return False


def peer_gone(lines) -> bool:
    """True when a failed rank's own lines say a peer went away (see PEER_GONE)."""
    return any(PEER_GONE.search(line) for line in lines)


# torchrun's exit barrier: after its workers finished, each agent waits on the master's store for
# the others; the master's torchrun may exit first and take the store with it, and the others log
# the lost connection with a traceback (~1 run in 10 on a fast finish). c10d warns first, then
# the agent's "Error waiting on exit barrier" and its traceback follow.
EXIT_BARRIER = re.compile(r"Error waiting on exit barrier")
STORE_WARNING = re.compile(r"recvValueWithTimeout failed|Failed to recv, got 0 bytes")
# A traceback's own lines: its header, indented frames, C++ frames, the exception's last line.
TRACEBACK_PART = re.compile(
    r"^($|Traceback \(most recent|\s|During handling of|The above exception|Exception raised from|"
    r"frame #\d+:|[\w.]+(Error|Exception)\b)"
)
# torch's log prefix, on every line of a record (its traceback's too): 'E1206 08:10:00.124000 77
# torch/distributed/elastic/agent/server/api.py:1008] '.
GLOG = re.compile(r"^\[?[VIWEC]\d{4} [\d:.]+ \d+ \S+:\d+\]\s?")
EXIT_BARRIER_SAID = (
    "torchrun: the exit barrier lost the master's store (the master's torchrun had already "
    "exited): harmless once this node's ranks finished; the full text is in the log"
)


@dataclass
class ExitBarrier:
    """Keeps the exit barrier's noise off the console (pure): feed each line, get back
    (rank, text, show) for what to write now. The noise goes to the log only, with one line
    saying what it was; a c10d store warning waits for the next line to tell whether it was."""

    inside: bool = False
    said: bool = False
    waiting: list[tuple[int | None, str]] = field(default_factory=list)

    def feed(self, rank: int | None, body: str) -> list[tuple[int | None, str, bool]]:
        if rank is None and EXIT_BARRIER.search(body):
            self.inside = True
            out = [(r, t, False) for r, t in self.waiting] + [(rank, body, False)]
            self.waiting = []
            if not self.said:
                self.said = True
                out.append((None, EXIT_BARRIER_SAID, True))
            return out
        if rank is None and self.inside and TRACEBACK_PART.match(GLOG.sub("", body)):
            return [(rank, body, False)]
        self.inside = False
        if rank is None and STORE_WARNING.search(body):
            self.waiting.append((rank, body))
            return []
        return self.end() + [(rank, body, True)]

    def end(self) -> list[tuple[int | None, str, bool]]:
        """What still waits, shown: no barrier error followed it."""
        out, self.waiting = [(r, t, True) for r, t in self.waiting], []
        return out
