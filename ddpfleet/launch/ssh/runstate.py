"""A detached SSH run's state from what its nodes say (pure), and the `runs` table.

Each node's supervisor writes its own part's state (ddpfleet/node/run_supervisor.py); `invoke
runs` reads all of them (run_ctl.py list) and turns each into verdict.Evidence here: a node
that cannot be asked, has no record of the run, or whose supervisor vanished while its state
still said RUNNING is LOST; the rank to blame comes from the node's last lines; the master's
record of the gang (its lifeline heard who failed first) names a part. verdict.fold and
verdict.blame decide, as for every other launcher (the states: verdict.RunState).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from ddpfleet.launch.clues import Clues, split_rank
from ddpfleet.launch.verdict import Evidence, RunState, RunView, blame, restarts, who
from ddpfleet.launch.verdict import fold as fold_states
from ddpfleet.names import hostlist


def blamed_rank(part: Mapping) -> int | None:
    """The failed rank from a node's last lines: its traceback, else torchrun's word."""
    nproc, node_rank = part.get("nproc") or 1, part.get("rank") or 0
    clues = Clues(node_rank, nproc)
    for line in part.get("tail") or ():
        rank, body = split_rank(line, node_rank, nproc)
        clues.feed(rank, body, 0.0)
    return clues.rank


def evidence(node: str, part: Mapping | str | None, named: str | None = None) -> Evidence:
    """One node's record of the run (run_ctl.py list), why it could not be asked (a string),
    or None (no record) -> Evidence. `named`: the node the master's record of the gang says
    failed first."""
    if not isinstance(part, Mapping):
        said = part if isinstance(part, str) else "no record of the run"
        return Evidence(node, RunState.LOST, why=f"{node}: {said}", reachable=part is None)
    # A status this controller does not know (a newer node program) reads as an ended part.
    state = RunState.read(part.get("status"), RunState.STOPPED)
    why = f"{node}: {part['reason']}" if part.get("reason") else ""
    if state.live and not part.get("alive"):
        started = " before its torchrun started" if state is RunState.STARTING else ""
        state, why = RunState.LOST, f"{node}: its supervisor vanished{started}"
    elif state is RunState.LOST:
        why = part.get("reason") or f"{node}: lost"  # the guardian's reason names the node
    rank = blamed_rank(part)
    return Evidence(node, state, at=part.get("ended"), exit_code=part.get("exit_code"),
                    rank=rank, said=_own_lines(part, rank), why=why,
                    named_first=named == node)  # fmt: skip


def fold(run_id: str, order: Sequence[str], parts: Mapping[str, Mapping | str | None]) -> RunView:
    """`parts`: node -> its state (run_ctl.py list), a string (why it could not be asked), or
    None (the node has no record of the run)."""
    master = parts.get(order[0]) if order else None
    named = (master.get("first_failure") or {}).get("node") if isinstance(master, Mapping) else None
    evidences = [evidence(n, parts.get(n), named) for n in order]
    unasked = {n: p for n, p in parts.items() if isinstance(p, str)}
    said = {n: p.get("restarts") or () for n, p in parts.items() if isinstance(p, Mapping)}
    view = {"run_id": run_id, "nodes": tuple(order), **_times(order, parts), "unasked": unasked,
            "restarts": restarts(said)}  # fmt: skip
    state = fold_states(evidences)
    if state is RunState.FAILED:
        first = blame(evidences)
        why = f"{who(first)} failed first (exit {first.exit_code})"
        return RunView(**view, state=state, why=why, failed_node=first.node,
                       failed_rank=first.rank)  # fmt: skip
    return RunView(**view, state=state, why=_why(state, evidences))


def held(entry: Mapping, alive: bool) -> RunView:
    """An attached run the index has no verdict for yet (index.Attached): RUNNING while the
    controller holding it lives, else LOST (that controller was killed before the verdict; the
    nodes' runners end its ranks when their channel drops). A recorded verdict replaces this
    view (Index.settle)."""
    order = tuple(entry.get("nodes") or ())
    why = "" if alive else "its controller ended before the run did (attached run, no verdict)"
    return RunView(run_id=entry["run_id"], state=RunState.RUNNING if alive else RunState.LOST,
                   nodes=order, started=entry.get("started"), ended=None,
                   exits=dict.fromkeys(order), why=why)  # fmt: skip


def _times(order: Sequence[str], parts: Mapping[str, Mapping | str | None]) -> dict:
    """started (the earliest part's), ended (the last part's, once every part ended), and each
    node's exit code."""
    states = {n: p for n, p in parts.items() if isinstance(p, Mapping)}
    ends = [p.get("ended") for p in states.values()]
    return {
        "started": min((p["started"] for p in states.values() if p.get("started")), default=None),
        "ended": max(ends) if ends and all(ends) else None,
        "exits": {n: states[n].get("exit_code") if n in states else None for n in order},
    }


def _why(state: RunState, evidences: Sequence[Evidence]) -> str:
    """LOST: every lost part's why; STOPPED: the first reason a part gives."""
    if state is RunState.LOST:
        return "; ".join(e.why for e in evidences if e.state is RunState.LOST)
    if state is RunState.STOPPED:
        return next((e.why for e in evidences if e.why), "")
    return ""


def _own_lines(part: Mapping, rank: int | None) -> tuple[str, ...]:
    """The blamed rank's own lines among a node's last lines."""
    nproc, node_rank = part.get("nproc") or 1, part.get("rank") or 0
    if rank is None:
        return ()
    return tuple(
        body
        for r, body in (split_rank(line, node_rank, nproc) for line in part.get("tail") or ())
        if r == rank
    )


def duration(v: RunView, now: float | None = None) -> str:
    """Until it ended, or now while it runs; '-' when unknown: a LOST run whose end nobody saw
    (it never started, or its nodes cannot say) does not grow older."""
    if v.started is None or (v.ended is None and not v.state.live):
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
        nodes = hostlist(v.nodes)  # node[0-7]: short, and never cut on a narrow terminal
        nproc = v.recorded.get("nproc")
        shape = f"{len(v.nodes)}x{nproc}" if nproc else "-"
        out.append((v.run_id, v.state, nodes, shape, started, duration(v, now), exits,
                    "; ".join(filter(None, [_restarted(v), v.why]))))  # fmt: skip
    return out


def _restarted(v: RunView) -> str:
    """'restarts 2 (node1 rank 3 exit 1; node0 rank 0 exit 1)': torchrun's restarts, why each."""
    if not v.restarts:
        return ""
    return f"restarts {len(v.restarts)} ({'; '.join(v.restarts)})"


COLUMNS = ("run", "state", "nodes", "shape", "started", "duration", "exit", "why")
