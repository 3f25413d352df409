"""Detached runs' tasks: `invoke runs`, `logs`, `stop`, and train's --detach/--resume flags.
ddpfleet/cli/tasks.py reads like a table of contents; these are its runs chapter."""

from __future__ import annotations

import json as json_mod
from collections.abc import Mapping
from dataclasses import dataclass

from invoke import Exit, task

from ddpfleet import inventory as inv
from ddpfleet import report
from ddpfleet.cli import select
from ddpfleet.cli.common import ASK_BECOME_HELP, INVENTORY_HELP, NODES_HELP, become_password, cli
from ddpfleet.errors import DdpfleetError

RUN_HELP = "the run id (invoke runs lists them)"
TRAIN_HELP = {
    "detach": "start the run and return: every node's part is supervised on the node; "
    "follow it with invoke runs / logs RUN -f / stop RUN",
    "max_restarts": "torchrun's elastic restarts after a rank failure (default: 0)",
    "resume": "start a new detached run in a copy of RUN's code snapshot, with its script, "
    "--args, --env, nodes, --nproc-per-node, launcher and master port unless given now; RUN's "
    "newest complete checkpoint is copied into the new run's DDPFLEET_CHECKPOINT_DIR first, "
    "for the script to resume from",
}


@dataclass(frozen=True)
class Resume:
    """train --resume RUN: the job's shape (RUN's, unless a flag given now says otherwise) and
    which of its values came from RUN, for the plan."""

    meta: Mapping  # the launcher's word on RUN: script, args, env, nodes, nproc, port
    launcher: str
    nodes: str  # comma-separated, RUN's order: node_rank by position, as RUN had it
    nproc_per_node: str
    master_port: str | int | None
    said: tuple[str, ...]  # "nodes: node0,node1 (from RUN)", one line a value
    spares: str | None = None  # comma-separated: RUN's (detached ssh runs), unless --spares now


def resume(inventory, run_id: str, password, launcher, nodes, nproc_per_node, master_port,
           spares=None):  # fmt: skip
    """RUN's shape for `train --resume RUN` (shape()), asked of the launcher that ran it."""
    from ddpfleet.launch.config import RUN_ID_RE
    from ddpfleet.launch.launcher import get, index, of_run, resumers

    if not RUN_ID_RE.match(run_id):  # it names a directory on every node
        raise DdpfleetError(f"--resume {run_id!r}: not a run id; see invoke runs for yours")
    full = inv.load(inventory)
    if launcher:
        how = get(launcher)
    elif index(full).entry(run_id) is not None:
        how = of_run(index(full), run_id)
    else:  # unknown to the index (its nodes may know it): the inventory's launcher
        how = get(full.launcher)
    if not how.resumes:
        can = resumers()
        raise DdpfleetError(
            f"--resume {run_id}: a run of the {how.name} launcher; --resume works for runs of "
            f"the {' or '.join(can)} launcher (use --launcher {can[0]} for new runs)"
        )
    meta = how.resumed(full, run_id, password)
    given = {"launcher": launcher, "nodes": nodes, "nproc-per-node": nproc_per_node,
             "master-port": master_port, "spares": spares}  # fmt: skip
    return shape(run_id, meta, how.name, [n.name for n in full.nodes], full.path.name, given)


def shape(run_id: str, meta: Mapping, launcher: str, known, where: str, given: Mapping) -> Resume:
    """RUN's nodes, --nproc-per-node, launcher, master port and spares, each unless `given` now (flag
    -> value, None: not given). A node of RUN the inventory (`known`, file `where`) no longer
    has is a one-line error naming it, unless --nodes says where instead; a --nodes entry that
    never ran RUN is one too (it has no copy of RUN's code)."""
    ran_on = list(meta.get("nodes") or ())  # its last generation's, after recoveries
    trained = list(meta.get("trained") or ran_on)  # every node that trained it
    nodes = given.get("nodes")
    gone = [n for n in ran_on if n not in known]
    if gone and not nodes:
        raise DdpfleetError(
            f"--resume {run_id}: its node {', '.join(gone)} is not in {where} any more; put it "
            f"back (its copy of the run is there), or pass --nodes with nodes of {run_id} "
            f"({','.join(ran_on)})"
        )
    elsewhere = [n for n in select.names(nodes) if trained and n not in trained]
    if elsewhere:
        raise DdpfleetError(
            f"--resume {run_id} --nodes {nodes}: {', '.join(elsewhere)} never ran {run_id}, so "
            f"it has no copy of its code; use nodes of {run_id} ({','.join(trained)})"
        )
    ran = {"launcher": launcher, "nodes": ",".join(ran_on) or None,
           "nproc-per-node": meta.get("nproc"), "master-port": meta.get("port"),
           "spares": ",".join(meta.get("spares") or ()) or None}  # fmt: skip
    values, said = {}, []
    for name, had in ran.items():
        now = given.get(name)
        if now not in (None, ""):
            values[name] = now
            said.append(f"{name}: {now} (--{name})")
        else:
            values[name] = had
            if had is not None:
                gen = meta.get("generation", 1) if name in ("nodes", "spares") else 1
                of = f"{run_id}'s generation {gen}" if gen > 1 else run_id
                said.append(f"{name}: {had} (from {of})")
    return Resume(meta, values["launcher"], values["nodes"],
                  str(values["nproc-per-node"] or "auto"), values["master-port"],
                  tuple(said), values["spares"])  # fmt: skip


def resumed(meta: Mapping, script, args, env):
    """train --resume: RUN's script, --args and --env (meta: the launcher's word on RUN),
    where this command line gives none."""
    return (
        script or meta.get("script"),
        args or meta.get("args", ""),
        list(env or ()) or meta.get("env", []),
    )


def _runs(inventory, nodes=None, ask_become_pass=False):
    from ddpfleet.launch.launcher import Runs

    return Runs.open(inv.load(inventory, nodes), become_password(ask_become_pass))


@task(
    help={
        "inventory": INVENTORY_HELP,
        "nodes": NODES_HELP,
        "json": "print one JSON document (a list of runs, newest first) instead of the table",
        "prune": "remove ended runs' directories on every node, keeping the newest --keep",
        "keep": "with --prune: how many ended runs to keep (default: 10)",
        "with_outputs": "with --prune: remove the pruned runs' checkpoints too (default: kept)",
        "ask_become_pass": ASK_BECOME_HELP,
    }
)
@cli
def runs(c, inventory=None, nodes=None, json=False, prune=False, keep=10, ask_become_pass=False,
         with_outputs=False):  # fmt: skip
    """List detached runs and their state."""
    from ddpfleet.launch import launcher
    from ddpfleet.launch.ssh import runstate

    if not str(keep).isdigit():
        raise DdpfleetError(f"--keep {keep!r}: give how many ended runs to keep, a number >= 0")
    with _runs(inventory, nodes, ask_become_pass) as r:
        views = launcher.views(r)
        if prune:
            removed = launcher.prune(r, int(keep), with_outputs)
            report.show(report.table(None, ("node", "removed", "checkpoints kept"),
                                     [(n, *_pruned(x)) for n, x in removed.items()]))  # fmt: skip
            if not with_outputs and any(getattr(x, "kept", None) for x in removed.values()):
                print("kept: /var/lib/ddpfleet/runs/<run-id>/checkpoints of the runs above; "
                      "runs --prune --with-outputs removes them too")  # fmt: skip
            report.exit_if_failed(removed, "runs --prune")
            return
    if json:
        print(json_mod.dumps([v.as_json() for v in views], indent=1))
        return
    # a narrow terminal leaves these out first (runs --json has everything)
    optional = ("started", "shape", "exit", "duration")
    report.show(report.table(None, runstate.COLUMNS, runstate.rows(views), optional))


def _pruned(said) -> tuple[str, str]:
    if isinstance(said, Exception):
        return str(said), ""
    return ", ".join(said.removed) or "-", ", ".join(said.kept) or "-"


@task(
    help={
        "run": RUN_HELP,
        "inventory": INVENTORY_HELP,
        "node": "only these nodes' lines (comma-separated: node0,node1)",
        "rank": "only this global rank's lines",
        "follow": "keep printing new lines until the run ends (Ctrl-C leaves the run alone)",
        "ask_become_pass": ASK_BECOME_HELP,
    }
)
@cli
def logs(c, run, inventory=None, node=None, rank=None, follow=False, ask_become_pass=False):
    """Print a detached run's lines by node and rank."""
    from ddpfleet.launch import launcher

    if rank is not None and not str(rank).isdigit():
        raise DdpfleetError(f"--rank {rank!r}: give a global rank, a number >= 0")
    with _runs(inventory, None, ask_become_pass) as r:
        problems = launcher.of_run(r.index, run).logs(
            r, run, node, None if rank is None else int(rank), follow
        )
    if problems:  # each was one line on stderr when it was found
        raise Exit(code=1)


@task(
    help={
        "run": RUN_HELP,
        "inventory": INVENTORY_HELP,
        "grace": "seconds between SIGTERM and SIGKILL (default: 3)",
        "ask_become_pass": ASK_BECOME_HELP,
    }
)
@cli
def stop(c, run, inventory=None, grace=3, ask_become_pass=False):
    """Stop a detached run on every node."""
    from ddpfleet.launch import launcher

    try:
        grace = float(grace)
    except ValueError:
        raise DdpfleetError(f"--grace {grace!r}: give seconds, e.g. 3") from None
    with _runs(inventory, None, ask_become_pass) as r:
        stopped = launcher.of_run(r.index, run).stop(r, run, grace)
    rows = [(node, _stop_row(s)) for node, s in stopped.nodes.items()]
    report.show(report.table(stopped.did or None, ("node", f"stop {run}"), rows))
    if bad := stopped.unconfirmed():
        raise DdpfleetError(f"stop {run}: not confirmed on {', '.join(bad)}")


def _stop_row(s) -> str:
    """One node's part of `stop`, as a table cell."""
    from ddpfleet.launch import launcher

    if s.state == launcher.UNREACHABLE:
        return s.error
    if s.state == launcher.NO_RECORD:
        return "no record of the run"
    killed = f", SIGKILLed leftovers {' '.join(s.killed)}" if s.killed else ""
    left = f"; STILL THERE: {' '.join(s.left)}" if s.left else ", nothing left"
    return f"{s.did}{killed}{left}"


TASKS = (runs, logs, stop)
