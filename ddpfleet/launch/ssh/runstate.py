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

LIVE = (RunState.STARTING.value, RunState.RUNNING.value)


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
    master = leader(order, parts)
    named = (master.get("first_failure") or {}).get("node") if isinstance(master, Mapping) else None
    # With spares the master's record says who is in the gang now (node/generation.py): a node
    # replaced, or a spare still standing by, is not part of the verdict; its generations are.
    gens = master.get("generations") or [] if isinstance(master, Mapping) else []
    gang = gens[-1]["nodes"] if gens else order
    evidences = [evidence(n, parts.get(n), named) for n in order if n in gang]
    unasked = {n: p for n, p in parts.items() if isinstance(p, str)}
    said = {n: p.get("restarts") or () for n, p in parts.items() if isinstance(p, Mapping)}
    now = {n: p for n, p in parts.items() if n in gang}
    view = {"run_id": run_id, "nodes": tuple(order), **_times([n for n in order if n in gang], now),
            "unasked": unasked, "restarts": restarts(said), "generations": tuple(gens)}  # fmt: skip
    state = fold_states(evidences)
    if state is RunState.LOST and gens and master.get("alive") and master.get("status") in LIVE:
        # a run with spares whose master's supervisor lives: it replaces the lost node (or is
        # about to notice the loss), and the run goes on or ends with its word
        lost = master.get("recovering") or _why(state, evidences)
        return RunView(**view, state=RunState.RUNNING, why=f"recovering: {lost}")
    gave_up = master.get("gave_up") if isinstance(master, Mapping) else None
    if gave_up and not state.live:  # the master's own word: a loss it could not recover from
        lines = [gave_up, *map(generation_line, gens[1:])]
        return RunView(**view, state=RunState.FAILED, why="; ".join(lines))
    if state is RunState.FAILED:
        first = blame(evidences)
        why = f"{who(first)} failed first (exit {first.exit_code})"
        return RunView(**view, state=state, why=why, failed_node=first.node,
                       failed_rank=first.rank)  # fmt: skip
    why = _why(state, evidences)
    if len(gens) > 1:  # which node replaced which, and how long it took
        why = "; ".join(filter(None, [why, *map(generation_line, gens[1:])]))
    return RunView(**view, state=state, why=why)


def leader(order: Sequence[str], parts: Mapping[str, Mapping | str | None]) -> Mapping | None:
    """The record that speaks for the run: the first node's, unless the run has spares and its
    master moved (node/succession.py): then the record with the most generations, a live one
    first, then the master's (node_rank 0), then the first in `order`. While no new master
    leads yet, a survivor's record (the roster it was told) stands in."""
    first = parts.get(order[0]) if order else None
    records = [(n, p) for n, p in parts.items() if isinstance(p, Mapping) and p.get("generations")]
    if not records:
        return first

    def rank(item):
        n, p = item
        where = order.index(n) if n in order else len(order)
        return (len(p["generations"]), bool(p.get("alive")), p.get("rank") == 0, -where)

    return max(records, key=rank)[1]


def generation_line(g: Mapping) -> str:
    """'gen 2: node3 for node1 (its lifeline closed ...), 23.4s to the first step'; where the
    master was lost, 'gen 2: node1 the master for node0, node3 for node0 (...)'."""
    took = g.get("recovery_s")
    swaps = ", ".join(f"{r['by']} for {r['lost']} ({r['why']})" for r in g.get("replaced", ()))
    if g.get("master_lost"):
        swaps = f"{g.get('master')} the master for {g['master_lost']}, {swaps}"
    return f"gen {g['generation']}: {swaps}" + (f", {took:.1f}s to the first step" if took else "")


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
