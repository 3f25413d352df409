"""What a node's torchrun output says about a failure (pure): the global rank of a line,
the rank to blame, each failed rank's exit code."""

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
