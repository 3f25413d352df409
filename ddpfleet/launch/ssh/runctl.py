"""Detached runs from the controller: short SSH fan-outs to run_ctl.py on the nodes; the
controller's index of run ids is launch/index.py (the truth is on the nodes)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from ddpfleet.errors import NodeError
from ddpfleet.launch import sync
from ddpfleet.launch.index import Index, holds
from ddpfleet.launch.ssh.runstate import RunView, fold, held
from ddpfleet.ssh.connection import Conn, Fleet

CTL = "run_ctl.py"
CTL_FILES = (CTL, "records.py", "proctree.py", "part.py")  # run_ctl.py and what it loads
CALL_TIMEOUT_S = 60


def ctl_command(python: str, *args: str) -> str:
    return sync.helper_command(python, CTL, *args)


def node_call(conn: Conn, python: str, *args: str, timeout: float = CALL_TIMEOUT_S):
    """run_ctl.py on the node (as root: it reads and signals the run's processes); its JSON."""
    r = conn.run(
        ctl_command(python, *args),
        stdin=sync.helper_sources(CTL_FILES),
        check=False,
        timeout=timeout,
        root=True,
    )
    if r.exit_code != 0:
        raise NodeError(conn.name, f"run_ctl.py {args[0]} failed: {(r.stderr or r.stdout)[-300:]}")
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise NodeError(conn.name, f"run_ctl.py {args[0]} said: {r.stdout[-300:]!r}") from None


def gather(
    fleet: Fleet, pythons: Mapping[str, str], ids: Sequence[str] = ()
) -> dict[str, dict | NodeError]:
    """Every node's record of the runs (all, or `ids`), in parallel."""
    return fleet.map(lambda c: node_call(c, pythons[c.name], "list", *ids))


def views(
    said: Mapping[str, dict | NodeError], index: Index, only: Sequence[str] = ()
) -> list[RunView]:
    """One view per run that any node or the index knows (or only `only`)."""
    # Only this launcher's: another's run (Slurm's) has no supervisor records, this fold would
    # call it LOST.
    entries = index.launched_by("ssh")
    # An attached run has no records on its nodes: the index's own word is all there is.
    attached = [e for e in entries if e.get("attached") and (not only or e["run_id"] in only)]
    known = {e["run_id"]: tuple(e["nodes"]) for e in entries if not e.get("attached")}
    for answer in said.values():
        if isinstance(answer, dict):
            for run_id, part in answer.items():
                known.setdefault(run_id, tuple(part.get("meta", {}).get("nodes") or ()))
    out = [held(e, holds(e)) for e in attached]
    for run_id, order in known.items():
        if only and run_id not in only:
            continue
        parts: dict[str, Mapping | str | None] = {}
        for node in order:
            answer = said.get(node)
            if answer is None:
                parts[node] = "not in this inventory or --nodes"
            elif isinstance(answer, NodeError):
                parts[node] = f"unreachable ({answer.message})"
            else:
                parts[node] = answer.get(run_id)
        out.append(fold(run_id, order, parts))
    return out


def stop(fleet: Fleet, pythons: Mapping[str, str], run_id: str, nodes: Sequence[str], grace: float):
    return fleet.map(lambda c: node_call(c, pythons[c.name], "stop", run_id, str(grace)), nodes)


def prune(
    fleet: Fleet, pythons: Mapping[str, str], keep: int, with_outputs: bool = False
) -> dict[str, dict | NodeError]:
    """{"removed": run ids, "kept": run ids whose checkpoints stayed} per node."""
    outputs = "1" if with_outputs else "0"
    return fleet.map(lambda c: node_call(c, pythons[c.name], "prune", str(keep), outputs))
