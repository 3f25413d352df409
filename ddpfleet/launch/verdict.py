"""One verdict for a run, whatever launched it (pure): the states a run and each node's part of
it go through, what the controller read about each part, and the rule that blames one part.

Attached SSH and Slurm runs (outcome.py), detached SSH runs (ssh/runstate.py) and detached
Slurm runs (slurm/state.py) only turn what they read into one `Evidence` per node; `blame` names
the part that failed first and `fold` gives the run's state. The rule was written three times
before and fixed in one place at a time; a change to it belongs here, with a case in
tests/unit/test_verdict.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from ddpfleet.launch.clues import peer_gone


class RunState(str, Enum):
    """A run's state, and each node's part of it: the values the node programs write in
    state.json (ddpfleet/node/run_supervisor.py, run_guardian.py, run_ctl.py), `runs --json`
    prints and the `runs` table shows. Like torch elastic's WorkerState:

        STARTING -> RUNNING -> SUCCEEDED | FAILED | STOPPED
        STARTING | RUNNING  -> LOST

    STARTING   a node's supervisor is up, its torchrun not yet started
    RUNNING    torchrun runs; a Slurm job pending, configuring, suspended ... is RUNNING too,
               its why says which
    SUCCEEDED  ended with exit 0 (an attached run's summary line says "ok")
    FAILED     a rank failed; the run names the node and rank that failed first (`blame`)
    STOPPED    stopped by invoke stop, a signal or Ctrl-C, or by the gang after another part
               failed, with no failure of its own
    LOST       nothing accounts for the part: its node cannot be asked or has no record of the
               run, its connection dropped, its supervisor vanished or was killed. A run with a
               lost part is LOST before FAILED (`fold`): a dead node makes its peers' ranks fail
               too (gloo/NCCL errors), sooner than any lifeline notices.

    STARTING and RUNNING are live; the other four end a part and never change once written.
    """

    STARTING = "STARTING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    LOST = "LOST"

    def __str__(self) -> str:  # the value in f-strings and tables, not 'RunState.FAILED'
        return self.value

    @property
    def live(self) -> bool:
        return self in (RunState.STARTING, RunState.RUNNING)

    @property
    def final(self) -> bool:
        """SUCCEEDED, FAILED, STOPPED: what the run did, whatever its nodes say later (LOST is
        what can be said while something cannot be asked; it may still turn out otherwise)."""
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED)

    @property
    def word(self) -> str:
        """The word an attached run's summary line uses: ok, failed, stopped, lost."""
        return "ok" if self is RunState.SUCCEEDED else self.value.lower()

    @classmethod
    def read(cls, value: object, default: RunState) -> RunState:
        """A state a node wrote; `default` for a value this controller does not know (a newer
        node program), so one odd record never makes `runs` fail."""
        try:
            return cls(value)
        except ValueError:
            return default


@dataclass(frozen=True)
class Evidence:
    """What the controller read about one node's part of a run, whatever launched it."""

    node: str
    state: RunState  # how the part ended, or that it still runs
    at: float | None = None  # when the first sign of failure came (one clock per run)
    exit_code: int | None = None  # negative: the signal that ended it
    rank: int | None = None  # the rank to blame there (clues.py), when one is known
    said: tuple[str, ...] = ()  # that rank's own last lines: its error
    why: str = ""  # why the part is lost or stopped, as it was told
    named_first: bool = False  # the gang's own record names this part as the first failure
    reachable: bool = True  # its node could be asked now


def own_failure(said: Iterable[str]) -> bool:
    """A rank's own lines say it failed for a reason of its own, not that a peer went away."""
    said = tuple(said)
    return bool(said) and not peer_gone(said)


def failed(p: Evidence) -> bool:
    """FAILED, or STOPPED by the gang after its own rank had already failed: its torchrun was
    still tearing down when another node's failure (a peer gone) came first, so its stop says
    nothing about the cause."""
    if p.state is RunState.FAILED:
        return True
    return p.state is RunState.STOPPED and p.rank is not None and own_failure(p.said)


def _tier(p: Evidence) -> int:
    """How sure a part is the cause: 0 lost, or its rank says why it failed itself; 1 its rank
    says nothing (a segfault, the OOM killer, or torchrun's summary pushed the traceback out
    of the last lines); 2 its rank only says a peer went away, a consequence."""
    if p.state is RunState.LOST or own_failure(p.said):
        return 0
    return 1 if not p.said else 2


def blame(parts: Sequence[Evidence]) -> Evidence | None:
    """The part that failed first, or None.

    A rank that raises prints its traceback before it dies; its peers only hear of it after it
    died, so theirs say a peer went away, and which of the two the controller hears of first is
    a race between nodes. So: among the failed and lost parts, the surest causes (`_tier`);
    among those, the one the gang's own record names, else the earliest sign of failure."""
    failing = [p for p in parts if p.state is RunState.LOST or failed(p)]
    if not failing:
        return None
    best = min(_tier(p) for p in failing)
    causes = [p for p in failing if _tier(p) == best]
    return min(causes, key=lambda p: (not p.named_first, float("inf") if p.at is None else p.at))


def fold(parts: Sequence[Evidence]) -> RunState:
    """The run's state from its parts': LOST, FAILED, RUNNING, SUCCEEDED, else STOPPED, in
    that order (see RunState for why LOST comes before FAILED)."""
    if any(p.state is RunState.LOST for p in parts):
        return RunState.LOST
    if any(failed(p) for p in parts):
        return RunState.FAILED
    if any(p.state.live for p in parts):
        return RunState.RUNNING
    if all(p.state is RunState.SUCCEEDED for p in parts):
        return RunState.SUCCEEDED
    return RunState.STOPPED


def who(p: Evidence) -> str:
    """'node1 rank 3', or 'node1 its torchrun' when no rank is known."""
    return f"{p.node} rank {p.rank}" if p.rank is not None else f"{p.node} its torchrun"


# What a node's torchrun says at each --max-restarts restart (ddpfleet/node/part.py FRESH):
# "ddpfleet: restart 1 of 2 after rank 3 exit 1, rank 2 exit -15 at 1796547007.373".
RESTART_LINE = re.compile(r"^ddpfleet: restart (\d+) of \d+ after (.+) at ([0-9.]+)$")


def restarts(said: Mapping[str, Iterable[str]]) -> tuple[str, ...]:
    """Why each restart of the run happened, in order, from each node's restart lines: the node
    whose workers failed first in that attempt (its peers' only failed after), and how."""
    first: dict[int, tuple[float, str]] = {}
    for node, lines in said.items():
        for line in lines:
            m = RESTART_LINE.match(line.strip())
            if m:
                n, why, at = int(m.group(1)), m.group(2), float(m.group(3))
                if n not in first or at < first[n][0]:
                    first[n] = (at, f"{node} {why}")
    return tuple(first[n][1] for n in sorted(first))


@dataclass(frozen=True)
class RunView:
    """One run as `invoke runs` shows it (the table, `--json`), whatever launched it."""

    run_id: str
    state: RunState
    nodes: tuple[str, ...]
    started: float | None
    ended: float | None
    exits: Mapping[str, int | None] = field(default_factory=dict)
    why: str = ""
    failed_node: str | None = None
    failed_rank: int | None = None
    unasked: Mapping[str, str] = field(default_factory=dict)  # node -> why it cannot be asked now
    restarts: tuple[str, ...] = ()  # torchrun's restarts (--max-restarts), why each (restarts())
    # What the controller's index keeps of the run besides (launch/index.py): its shape
    # (nproc, port, launcher), attached or not, where its outputs are on each node.
    recorded: Mapping[str, object] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {
            "run_id": self.run_id,
            "state": self.state.value,
            "nodes": list(self.nodes),
            "started": self.started,
            "ended": self.ended,
            "exits": dict(self.exits),
            "why": self.why,
            "failed_node": self.failed_node,
            "failed_rank": self.failed_rank,
            "unreachable_now": dict(self.unasked),
            "restarts": len(self.restarts),
            "restart_why": list(self.restarts),
            **self.recorded,
        }
