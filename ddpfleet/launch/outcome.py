"""How each node's part of a run ended, which node failed first, and the words for it."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass

from ddpfleet.launch.clues import peer_gone


@dataclass
class Outcome:
    """How one node's part ended, as the controller saw it."""

    node: str
    state: str = "running"  # running -> ok | failed | stopped | lost
    exit_code: int | None = None
    seconds: float = 0.0
    rank: int | None = None  # the rank that failed, from torchrun's root cause or a traceback
    evidence_at: float | None = None  # when the first sign of failure arrived (monotonic)
    last_lines: tuple[str, ...] = ()
    why: str = ""


def first_failure(outcomes: Sequence[Outcome]) -> Outcome | None:
    """The node that failed first: the earliest sign of failure (a rank's traceback, or the
    exit). A rank that raises prints its traceback before it dies; its peers only hear of it
    after it died, so their tracebacks come later. A node whose failed rank only says that a
    peer went away is a consequence while another node failed otherwise (the order in which the
    controller hears of the two is a race between nodes)."""
    failed = [o for o in outcomes if o.state in ("failed", "lost")]
    causes = [o for o in failed if o.state == "lost" or not peer_gone(o.last_lines)] or failed
    return min(causes, key=lambda o: o.evidence_at or float("inf")) if causes else None


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
    if o.state == "ok":
        return f"{o.node}: ok (exit 0, {secs})"
    if o.state == "stopped":
        return f"{o.node}: stopped ({reason or 'by ddpfleet'}, {secs})"
    if o.state == "lost":
        return f"{o.node}: lost ({o.why}, {secs})" + (" <- first failure" if o is first else "")
    rank = f"rank {o.rank} " if o.rank is not None else ""
    mark = " <- first failure" if o is first else ""
    return f"{o.node}: failed ({rank}{exit_text(o.exit_code)}, {secs}){mark}"


def failure_message(first: Outcome, outcomes: Sequence[Outcome]) -> str:
    rank = f" rank {first.rank}" if first.rank is not None else ""
    how = exit_text(first.exit_code) if first.state == "failed" else first.why
    others = ", ".join(f"{o.node} {o.state}" for o in outcomes if o is not first)
    lines = "\n    ".join(first.last_lines) or "(no output)"
    return (
        f"training failed: {first.node}{rank} failed first ({how})"
        f"{'; ' + others if others else ''}. Last lines of {first.node}{rank}:\n    {lines}"
    )
