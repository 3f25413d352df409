"""How each node's part of an attached run ended (SSH or Slurm), which failed first
(verdict.blame), and the words for it."""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ddpfleet.hygiene import clean
from ddpfleet.launch.verdict import Evidence, RunState, blame


@dataclass
class Outcome:
    """How one node's part ended, as the controller saw it."""

    node: str
    state: RunState = RunState.RUNNING  # -> SUCCEEDED | FAILED | STOPPED | LOST
    exit_code: int | None = None
    seconds: float = 0.0
    rank: int | None = None  # the rank that failed, from torchrun's root cause or a traceback
    evidence_at: float | None = None  # when the first sign of failure arrived (monotonic)
    last_lines: tuple[str, ...] = ()
    why: str = ""

    def evidence(self) -> Evidence:
        """What verdict.blame weighs: the failed rank's last lines are what it said."""
        return Evidence(self.node, self.state, at=self.evidence_at, exit_code=self.exit_code,
                        rank=self.rank, said=self.last_lines, why=self.why)  # fmt: skip


def first_failure(outcomes: Sequence[Outcome]) -> Outcome | None:
    """The node that failed first (verdict.blame): the earliest sign of failure (a rank's
    traceback, or the exit) among the surest causes; a node whose failed rank only says that a
    peer went away is a consequence while another node failed otherwise."""
    first = blame([o.evidence() for o in outcomes])
    return next((o for o in outcomes if first is not None and o.node == first.node), None)


def exit_text(code: int | None) -> str:
    """'exit 1', or 'SIGTERM' for a process a signal ended (Python's negative return code)."""
    if code is not None and code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            pass
    return f"exit {code}"


def summary_line(o: Outcome, first: Outcome | None, reason: str | None) -> str:
    secs = f"{o.seconds:.1f}s"
    if o.state is RunState.SUCCEEDED:
        return f"{o.node}: ok (exit 0, {secs})"
    if o.state is RunState.STOPPED:
        return f"{o.node}: stopped ({reason or 'by ddpfleet'}, {secs})"
    if o.state is RunState.LOST:
        return f"{o.node}: lost ({o.why}, {secs})" + (" <- first failure" if o is first else "")
    rank = f"rank {o.rank} " if o.rank is not None else ""
    mark = " <- first failure" if o is first else ""
    return f"{o.node}: failed ({rank}{exit_text(o.exit_code)}, {secs}){mark}"


def held_lines(
    held: Mapping[tuple, int], outcomes: Sequence[Outcome], first: Outcome | None, logs: Path
) -> list[str]:
    """One line per rank whose output was kept off the console once the first failure began
    (Output.hold): what became of it and where its lines are. The first failure's own rank is
    left out: its last lines are the error's block."""
    state = {o.node: o.state for o in outcomes}
    out = []
    for (node, rank), count in sorted(
        held.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])
    ):
        if first is not None and (node, rank) == (first.node, first.rank):
            continue
        who = f"[{node}]" if rank is None else f"[{node} r{rank}]"
        what = "torchrun" if rank is None else f"rank {rank}"
        how = (
            "stopped by the gang" if state.get(node) is RunState.STOPPED else "ended with the gang"
        )
        lines = f"{count} line{'s' if count != 1 else ''}"
        out.append(f"{who} {what} {how} after the first failure: {lines} in {logs / node}.log")
    return out


def failure_message(first: Outcome, outcomes: Sequence[Outcome]) -> str:
    """The first line names who failed first; a block of its last lines follows, one per line,
    indented as they were (a SyntaxError's caret stays under its column)."""
    rank = f" rank {first.rank}" if first.rank is not None else ""
    how = exit_text(first.exit_code) if first.state is RunState.FAILED else first.why
    others = ", ".join(f"{o.node} {o.state.word}" for o in outcomes if o is not first)
    lines = "\n    ".join(clean(line) for line in first.last_lines) or "(no output)"
    return (
        f"training failed: {first.node}{rank} failed first ({how})"
        f"{'; ' + others if others else ''}. Last lines of {first.node}{rank}:\n    {lines}"
    )
