"""A detached run's state from what its nodes say (pure): one verdict per run, the table.

Each node's supervisor writes its own part's state (run_supervisor.py); `invoke runs` reads all
of them (run_ctl.py list) and folds them here into one of:

    RUNNING    every part runs
    SUCCEEDED  every part ended with exit 0
    FAILED     a part failed: the first one (the master's record of the gang, else the
               earliest), with the rank to blame read from that node's last lines
    STOPPED    stopped (invoke stop, or the gang stopped for a reason that is no failure)
    LOST       a node is unreachable, has no record of the run, its supervisor vanished
               while its state still said RUNNING, or was killed (its guardian says so); it comes before FAILED: a dead node makes
               its peers' ranks fail too (gloo/NCCL errors), sooner than any lifeline notices
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ddpfleet.launch.clues import Clues, peer_gone, split_rank

LIVE = ("RUNNING", "STARTING")


@dataclass(frozen=True)
class RunView:
    run_id: str
    state: str
    nodes: tuple[str, ...]
    started: float | None
    ended: float | None
    exits: Mapping[str, int | None] = field(default_factory=dict)
    why: str = ""
    failed_node: str | None = None
    failed_rank: int | None = None

    def as_json(self) -> dict:
        return {
            "run_id": self.run_id,
            "state": self.state,
            "nodes": list(self.nodes),
            "started": self.started,
            "ended": self.ended,
            "exits": dict(self.exits),
            "why": self.why,
            "failed_node": self.failed_node,
            "failed_rank": self.failed_rank,
        }


def blamed_rank(part: Mapping) -> int | None:
    """The failed rank from a node's last lines: its traceback, else torchrun's word."""
    nproc, node_rank = part.get("nproc") or 1, part.get("rank") or 0
    clues = Clues(node_rank, nproc)
    for line in part.get("tail") or ():
        rank, body = split_rank(line, node_rank, nproc)
        clues.feed(rank, body, 0.0)
    return clues.rank


def fold(run_id: str, order: Sequence[str], parts: Mapping[str, Mapping | str | None]) -> RunView:
    """`parts`: node -> its state (run_ctl.py list), a string (why it could not be asked), or
    None (the node has no record of the run)."""
    states = {n: p for n, p in parts.items() if isinstance(p, Mapping)}
    started = min((p["started"] for p in states.values() if p.get("started")), default=None)
    ends = [p.get("ended") for p in states.values()]
    ended = max(ends) if ends and all(ends) else None
    exits = {n: states[n].get("exit_code") if n in states else None for n in order}
    view = {"run_id": run_id, "nodes": tuple(order), "started": started, "ended": ended}
    lost = [
        f"{n}: {p}" if isinstance(p, str) else f"{n}: no record of the run"
        for n, p in ((n, parts.get(n)) for n in order)
        if not isinstance(p, Mapping)
    ]
    lost += [
        f"{n}: its supervisor vanished"
        for n, p in states.items()
        if p.get("status") in LIVE and not p.get("alive")
    ]
    lost += [
        p.get("reason") or f"{n}: lost" for n, p in states.items() if p.get("status") == "LOST"
    ]
    if lost:
        return RunView(**view, state="LOST", exits=exits, why="; ".join(lost))
    failed = [n for n in order if states.get(n, {}).get("status") == "FAILED"]
    # A part the gang stopped while its own rank had already failed (its torchrun was still
    # tearing down when the master's own failure came first) is a failure too, if its rank
    # says why itself: that rank, not the peer that only lost it, failed first.
    failed += [
        n
        for n in order
        if states.get(n, {}).get("status") == "STOPPED"
        and (said := _blamed_lines(states[n]))
        and not peer_gone(said)
    ]
    if failed:
        first = _first_failure(order, states, failed)
        part = states[first]
        rank = blamed_rank(part)
        said = f"rank {rank}" if rank is not None else "its torchrun"
        why = f"{first} {said} failed first (exit {part.get('exit_code')})"
        return RunView(**view, state="FAILED", exits=exits, why=why, failed_node=first,
                       failed_rank=rank)  # fmt: skip
    if any(p.get("status") in LIVE for p in states.values()):
        return RunView(**view, state="RUNNING", exits=exits)
    if all(p.get("status") == "SUCCEEDED" for p in states.values()):
        return RunView(**view, state="SUCCEEDED", exits=exits)
    reasons = [f"{n}: {p['reason']}" for n, p in states.items() if p.get("reason")]
    return RunView(**view, state="STOPPED", exits=exits, why=reasons[0] if reasons else "")


def _blamed_lines(part: Mapping) -> list[str]:
    """The blamed rank's own lines among a node's last lines."""
    rank, nproc, node_rank = blamed_rank(part), part.get("nproc") or 1, part.get("rank") or 0
    if rank is None:
        return []
    return [
        body
        for r, body in (split_rank(line, node_rank, nproc) for line in part.get("tail") or ())
        if r == rank
    ]


def _first_failure(order: Sequence[str], states: Mapping[str, Mapping], failed: list[str]) -> str:
    """The master's record of the gang, else the earliest; but a node whose failed rank only
    says that a peer went away is a consequence while another node failed otherwise (which of
    the two reaches the master first is a race). A node whose blamed rank says nothing in its
    last lines (torchrun's summary can push a traceback out of them) is a cause only when no
    node's rank says it failed for a reason of its own."""
    said = {n: _blamed_lines(states[n]) for n in failed}
    causes = (
        [n for n in failed if said[n] and not peer_gone(said[n])]
        or [n for n in failed if not said[n]]
        or failed
    )
    master = states.get(order[0], {}).get("first_failure") or {}
    if master.get("node") in causes:
        return master["node"]
    return min(causes, key=lambda n: states[n].get("ended") or float("inf"))


def duration(v: RunView, now: float | None = None) -> str:
    if v.started is None:
        return "-"
    seconds = int((v.ended or now or time.time()) - v.started)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def rows(views: Sequence[RunView], now: float | None = None) -> list[tuple[str, ...]]:
    """run id, state, nodes, started, duration, exit per node, why; newest first."""
    out = []
    for v in sorted(views, key=lambda v: v.started or 0, reverse=True):
        started = "-" if v.started is None else time.strftime("%Y-%m-%d %H:%M:%S",
                                                               time.localtime(v.started))  # fmt: skip
        exits = " ".join(f"{n}={'-' if c is None else c}" for n, c in v.exits.items())
        out.append((v.run_id, v.state, ",".join(v.nodes), started, duration(v, now), exits, v.why))
    return out


COLUMNS = ("run", "state", "nodes", "started", "duration", "exit", "why")
