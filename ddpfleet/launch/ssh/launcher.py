"""The SSH launcher (ddpfleet.launch.launcher.Launcher): torchrun on every node over SSH.

Attached, a runner per node holds its part over an SSH channel (run.py); detached, a supervisor
per node holds it without one (detach.py). A started run lives in the nodes' records, read and
acted on by short fan-outs to run_ctl.py (runctl.py, runlogs.py).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence

from ddpfleet.errors import BecomeError, DdpfleetError, NodeError, PlanError
from ddpfleet.inventory import Inventory
from ddpfleet.launch.config import TrainConfig
from ddpfleet.launch.index import Attached
from ddpfleet.launch.launcher import (
    NO_RECORD,
    NodeStop,
    Pruned,
    Runs,
    Stopped,
    check_ranks,
    missing,
    pythons,
)
from ddpfleet.launch.outcome import Outcome
from ddpfleet.launch.ssh import detach, run, runctl, runlogs
from ddpfleet.launch.verdict import RunView
from ddpfleet.shell import Secret
from ddpfleet.ssh.connection import Fleet


class SshLauncher:
    name = "ssh"
    resumes = True

    def train(self, fleet: Fleet, config: TrainConfig) -> list[Outcome]:
        """Attached; recorded in the controller's index from its start, with its verdict."""
        return run.train(fleet, config, on=Attached(runctl.Index(fleet.inventory.root), self.name))

    def train_detached(
        self, fleet: Fleet, config: TrainConfig, index: runctl.Index, resume: str | None = None
    ) -> None:
        detach.train_detached(fleet, config, index, resume=resume)

    def resumed(self, inventory: Inventory, run_id: str, become_password: Secret | None) -> dict:
        """RUN's script, args, env and shape (nodes, nproc, master port, spares) from its spec,
        asked of every node of RUN (spares too) the inventory still has: the first in RUN's
        order that knows it answers. After recoveries (node/generation.py) the nodes are RUN's
        last generation's in node_rank order, and its spares those no generation took."""
        index = runctl.Index(inventory.root)
        nodes = index.nodes(run_id) or tuple(n.name for n in inventory.nodes)
        py = pythons(inventory)
        here = [inventory.node(n) for n in nodes if n in py]
        if not here:
            raise PlanError(
                f"--resume {run_id}: none of its nodes ({', '.join(nodes)}) is in "
                f"{inventory.path.name} any more; put them back to resume it"
            )
        with Fleet(inventory, here, become_password=become_password) as fleet:
            said = fleet.map(lambda c: runctl.node_call(c, py[c.name], "resume", run_id))
        answers = [said[n.name] for n in here]
        spec = next((a["spec"] for a in answers if isinstance(a, dict) and a["spec"]), None)
        if spec is None:
            failed = [a for a in answers if isinstance(a, NodeError)]
            if failed:
                raise failed[0]
            raise PlanError(f"--resume {run_id}: no such run on {here[0].name}; see invoke runs")
        records = {n: a["runs"] if isinstance(a, dict) else a for n, a in said.items()}
        views = runctl.views(records, index, only=(run_id,))
        gens = list(views[0].generations) if views else []
        # What to resume from reaches the script through DDPFLEET_CHECKPOINT_DIR (the
        # supervisors copy RUN's newest complete checkpoint there), whatever its flags are.
        meta = spec.get("meta", {})
        first = list(meta.get("nodes") or index.nodes(run_id) or ())
        last = list(gens[-1]["nodes"]) if len(gens) > 1 else first
        trained = list(dict.fromkeys([*first, *(n for g in gens for n in g.get("nodes", ()))]))
        return {
            "script": meta.get("script"),
            "args": shlex.join(meta.get("args", ())),
            "env": [f"{k}={v}" for k, v in meta.get("env", ())],
            "nodes": last,
            "generation": max(len(gens), 1),
            "trained": trained,  # every node with RUN's code and checkpoints of its own
            # the shape: a run started before meta had its port says it in the master's spec
            "nproc": meta.get("nproc") or spec.get("nproc"),
            "port": meta.get("port") or (spec.get("port_from") or {}).get("port"),
            "spares": [s for s in meta.get("spares") or () if s not in trained],
        }

    def views(self, runs: Runs, only: Sequence[str] = ()) -> list[RunView]:
        return runctl.views(_ask(runs, only), runs.index, only)

    def prune(
        self, runs: Runs, keep: int, with_outputs: bool = False
    ) -> dict[str, Pruned | NodeError]:
        said = runctl.prune(runs.fleet, pythons(runs.inventory), keep, with_outputs)
        removed = {n: r if isinstance(r, NodeError) else Pruned(r["removed"], r["kept"])
                   for n, r in said.items()}  # fmt: skip
        # A run removed from any of its nodes leaves the index (its history is gone there: it
        # would only ever show as LOST); attached runs (no records on the nodes) the same way,
        # the newest `keep` ended ones kept.
        gone = {r for p in removed.values() if isinstance(p, Pruned) for r in p.removed}
        ended = [e for e in runs.index.launched_by(self.name) if e.get("attached")
                 and "verdict" in e]  # fmt: skip
        ended.sort(key=lambda e: e.get("started") or 0, reverse=True)
        runs.index.drop(gone | {e["run_id"] for e in ended[keep:]})
        return removed

    def logs(
        self, runs: Runs, run_id: str, node: str | None, rank: int | None, follow: bool
    ) -> list[str]:
        said, view = _one(runs, run_id)
        only = [n.strip() for n in (node or "").split(",") if n.strip()]
        check_ranks(run_id, runlogs.ranks_of(said, run_id, view.nodes) or
                    dict.fromkeys(view.nodes, ()), rank, only)  # fmt: skip
        parts, problems = runlogs.nodes_of(said, run_id, only or view.nodes)
        for problem in problems:
            missing(run_id, problem)
        py = pythons(runs.inventory)
        late = runlogs.show(runs.fleet, py, run_id, parts, rank, follow)
        return problems + [missing(run_id, p) for p in late]

    def stop(self, runs: Runs, run_id: str, grace: float) -> Stopped:
        _, view = _one(runs, run_id)
        py = pythons(runs.inventory)
        said = runctl.stop(runs.fleet, py, run_id, [n for n in view.nodes if n in py], grace)
        return Stopped(run_id, {node: _stopped(r) for node, r in said.items()})


def _ask(runs: Runs, ids: Sequence[str] = ()) -> dict[str, dict | NodeError]:
    """Every node's records of the runs (all, or `ids`)."""
    said = runctl.gather(runs.fleet, pythons(runs.inventory), ids)
    refused = [str(r) for r in said.values() if isinstance(r, BecomeError)]
    if refused:  # not a lost node: the run's records are there, root work was not allowed
        raise DdpfleetError("; ".join(refused))
    return said


def _one(runs: Runs, run_id: str) -> tuple[dict[str, dict | NodeError], RunView]:
    said = _ask(runs, (run_id,))
    views = runctl.views(said, runs.index, only=(run_id,))
    if not views:
        raise DdpfleetError(f"{run_id}: no such run on any node; see invoke runs")
    return said, views[0]


def _stopped(said: Mapping | NodeError) -> NodeStop:
    """run_ctl.py stop's answer as data."""
    if isinstance(said, NodeError):
        return NodeStop.failed(said)
    if not said.get("found"):
        return NodeStop(NO_RECORD)
    did = "stopped its part" if said["supervisor"] else f"was {said['was']}"
    return NodeStop.of(did, said["killed"], said["left"])


LAUNCHER = SshLauncher()
