"""`invoke slurm.status`: Slurm's nodes (state, reason) and jobs (their nodes), asked of one node.

Any node with the Slurm client and a munge key can answer; the master is asked first, and
another node when the master does not answer. One round trip, one pure parse:

    ---nodes
    node0|idle|none|2|24105|(null)
    node1|down*|Not responding|2|24105|gpu:8
    ---jobs
    12|ddpfleet-run1|root|RUNNING|0:42|2|node[0-1]|node[0-1]
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from ddpfleet import report
from ddpfleet.errors import DdpfleetError, NodeError
from ddpfleet.ssh.connection import Fleet

SCHEMA = "ddpfleet.slurm-status/1"
# %N node, %T state, %E reason, %c CPUs, %m memory MB, %G gres. %i id, %j name, %u user,
# %T state, %M time used, %D node count, %N nodes, %R nodes or why it waits.
SINFO = ["sinfo", "-h", "-N", "-o", "%N|%T|%E|%c|%m|%G"]
SQUEUE = ["squeue", "-h", "-o", "%i|%j|%u|%T|%M|%D|%N|%R"]
SCRIPT = f"echo ---nodes; {shlex.join(SINFO)} || exit 3; echo ---jobs; {shlex.join(SQUEUE)}"
# States that need a person (sinfo prints '*' after a state when the node does not respond).
TROUBLE = ("down", "drain", "fail", "not_responding", "unknown", "*")


@dataclass(frozen=True)
class SlurmNode:
    name: str
    state: str
    reason: str
    cpus: str
    memory_mb: str
    gres: str

    @property
    def healthy(self) -> bool:
        return not any(word in self.state for word in TROUBLE)


@dataclass(frozen=True)
class SlurmJob:
    id: str
    name: str
    user: str
    state: str
    time: str
    node_count: str
    nodes: str
    reason: str  # %R: the nodes once running, else why it waits ("(Resources)")


def parse(text: str) -> tuple[list[SlurmNode], list[SlurmJob]]:
    nodes: dict[str, SlurmNode] = {}  # a node in two partitions is listed twice
    jobs: list[SlurmJob] = []
    section = ""
    for line in text.splitlines():
        if line.startswith("---"):
            section = line[3:]
            continue
        cells = line.split("|")
        if section == "nodes" and len(cells) == 6:
            name, state, reason, cpus, mem, gres = cells
            reason = "" if reason == "none" else reason
            gres = "" if gres == "(null)" else gres
            nodes.setdefault(name, SlurmNode(name, state, reason, cpus, mem, gres))
        elif section == "jobs" and len(cells) == 8:
            jobs.append(SlurmJob(*cells))
    return list(nodes.values()), jobs


def query(fleet: Fleet, master: str) -> tuple[str, list[SlurmNode], list[SlurmJob]]:
    """(the node that answered, nodes, jobs); the master first, then the others in order."""
    order = [master] + [n.name for n in fleet.nodes if n.name != master]
    reasons = []
    for name in order:
        got = fleet.map(lambda conn: conn.run(SCRIPT, check=False), [name])[name]
        if isinstance(got, NodeError):
            reasons.append(str(got))
            continue
        if got.exit_code == 0:
            return (name, *parse(got.stdout))
        reasons.append(f"{name}: sinfo failed: {got.stderr.strip() or got.stdout.strip()}")
    raise DdpfleetError(
        "no node could tell Slurm's state (" + "; ".join(reasons) + "); is slurmctld running? "
        "invoke bootstrap --roles slurm sets it up"
    )


def document(asked: str, nodes: list[SlurmNode], jobs: list[SlurmJob]) -> dict:
    return {
        "schema": SCHEMA,
        "asked": asked,
        "nodes": [{**asdict(n), "healthy": n.healthy} for n in nodes],
        "jobs": [asdict(j) for j in jobs],
    }


def show(asked: str, nodes: list[SlurmNode], jobs: list[SlurmJob], as_json: bool) -> None:
    if as_json:
        print(json.dumps(document(asked, nodes, jobs)))
        return
    rows = [(n.name, n.state, n.reason, n.cpus, n.memory_mb, n.gres) for n in nodes]
    columns = ("node", "state", "reason", "cpus", "memory MB", "gres")
    report.show(report.table(f"Slurm nodes (asked {asked})", columns, rows))
    job_rows = [(j.id, j.name, j.user, j.state, j.time, j.node_count, j.reason) for j in jobs]
    columns = ("job", "name", "user", "state", "time", "nodes", "nodes / why waiting")
    report.show(report.table("Slurm jobs", columns, job_rows) if jobs else "Slurm jobs: none")


def unhealthy(nodes: list[SlurmNode]) -> list[str]:
    return [
        f"{n.name} {n.state}" + (f" ({n.reason})" if n.reason else "")
        for n in nodes
        if not n.healthy
    ]


def status(fleet: Fleet, as_json: bool = False) -> Mapping[str, object]:
    asked, nodes, jobs = query(fleet, fleet.inventory.cluster.master)
    show(asked, nodes, jobs, as_json)
    return {"nodes": nodes, "jobs": jobs}
