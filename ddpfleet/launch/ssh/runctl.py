"""Detached runs from the controller: short SSH fan-outs to run_ctl.py on the nodes, and the
controller's index of run ids (.ddpfleet/runs.jsonl beside the inventory: run id, nodes,
started; the truth is on the nodes)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ddpfleet.errors import NodeError
from ddpfleet.hygiene import state_dir
from ddpfleet.launch import sync
from ddpfleet.launch.ssh.runstate import RunView, fold
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


class Index:
    """The controller's list of run ids it started, one JSON line each."""

    def __init__(self, root: Path):
        self.path = root / ".ddpfleet" / "runs.jsonl"

    def entries(self) -> list[dict]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def add(self, run_id: str, nodes: Sequence[str], **more) -> None:
        """`more`: what another launcher needs to find the run (Slurm: launcher, job_id ...)."""
        state_dir(self.path.parent)
        entry = {"run_id": run_id, "nodes": list(nodes), "started": time.time(), **more}
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def entry(self, run_id: str) -> dict | None:
        return next((e for e in self.entries() if e.get("run_id") == run_id), None)

    def slurm(self, only: Sequence[str] = ()) -> list[dict]:
        """The Slurm runs (their state is Slurm's, not a supervisor's)."""
        return [e for e in self.entries() if e.get("launcher") == "slurm"
                and (not only or e["run_id"] in only)]  # fmt: skip

    def nodes(self, run_id: str) -> tuple[str, ...] | None:
        for e in self.entries():
            if e.get("run_id") == run_id:
                return tuple(e["nodes"])
        return None

    def drop(self, run_ids: Iterable[str]) -> None:
        gone = set(run_ids)
        kept = [e for e in self.entries() if e.get("run_id") not in gone]
        if self.path.exists():
            self.path.write_text("".join(json.dumps(e) + "\n" for e in kept))


def gather(
    fleet: Fleet, pythons: Mapping[str, str], ids: Sequence[str] = ()
) -> dict[str, dict | NodeError]:
    """Every node's record of the runs (all, or `ids`), in parallel."""
    return fleet.map(lambda c: node_call(c, pythons[c.name], "list", *ids))


def views(
    said: Mapping[str, dict | NodeError], index: Index, only: Sequence[str] = ()
) -> list[RunView]:
    """One view per run that any node or the index knows (or only `only`)."""
    known: dict[str, tuple[str, ...]] = {
        e["run_id"]: tuple(e["nodes"]) for e in index.entries() if e.get("launcher") != "slurm"
    }
    for answer in said.values():
        if isinstance(answer, dict):
            for run_id, part in answer.items():
                known.setdefault(run_id, tuple(part.get("meta", {}).get("nodes") or ()))
    out = []
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


def prune(fleet: Fleet, pythons: Mapping[str, str], keep: int) -> dict[str, list | NodeError]:
    return fleet.map(lambda c: node_call(c, pythons[c.name], "prune", str(keep)))
