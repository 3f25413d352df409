"""Detached runs' tasks: `invoke runs`, `logs`, `stop`, and train's --detach/--resume halves.
ddpfleet/cli/tasks.py reads like a table of contents; these are its runs chapter."""

from __future__ import annotations

import json as json_mod
import shlex

from invoke import task

from ddpfleet import inventory as inv
from ddpfleet import report
from ddpfleet.cli.common import ASK_BECOME_HELP, INVENTORY_HELP, NODES_HELP, become_password, cli
from ddpfleet.errors import BecomeError, DdpfleetError, NodeError, PlanError

RUN_HELP = "the run id (invoke runs lists them)"
TRAIN_HELP = {
    "detach": "start the run and return: every node's part is supervised on the node; "
    "follow it with invoke runs / logs RUN -f / stop RUN",
    "max_restarts": "torchrun's elastic restarts after a rank failure (default: 0)",
    "resume": "start a new detached run in a copy of RUN's code snapshot, with its script, "
    "--args and --env (its --checkpoint-dir): the script resumes from the last checkpoint",
}


def _pythons(loaded) -> dict[str, str]:
    from ddpfleet import envs

    return {n.name: envs.env_python(loaded, n) for n in loaded.nodes}


def _index(loaded):
    from ddpfleet.launch.ssh import runctl

    return runctl.Index(loaded.root)


def detached(loaded, fleet, config, resume=None) -> None:
    from ddpfleet.launch.ssh import detach

    detach.train_detached(fleet, config, _index(loaded), resume=resume)


def slurm_detached(loaded, fleet, config) -> None:
    from ddpfleet.launch.slurm import detach as slurm_detach

    slurm_detach.train_detached(fleet, config, _index(loaded))


def resumed(loaded, run_id, script, args, env, password=None):
    """RUN's script, --args and --env (what is given on this command line wins); `password`:
    --ask-become-pass's."""
    from ddpfleet.launch.ssh import runctl
    from ddpfleet.ssh.connection import Fleet

    nodes = _index(loaded).nodes(run_id) or tuple(n.name for n in loaded.nodes)
    pythons = _pythons(loaded)
    first = [loaded.node(n) for n in nodes if n in pythons][:1]
    with Fleet(loaded, first, become_password=password) as fleet:
        said = fleet.map(lambda c: runctl.node_call(c, pythons[c.name], "spec", run_id))
    spec = next(iter(said.values()))
    if isinstance(spec, NodeError):
        raise spec
    if not spec:
        raise PlanError(f"--resume {run_id}: no such run on {nodes[0]}; see invoke runs")
    meta = spec.get("meta", {})
    if "--checkpoint-dir" not in " ".join(meta.get("args", ())):
        raise PlanError(
            f"--resume {run_id}: that run had no --checkpoint-dir in its --args, so there is "
            "nothing to resume from; start a new run with --args '... --checkpoint-dir DIR'"
        )
    given_env = list(env or ())
    return (
        script or meta.get("script"),
        args or shlex.join(meta.get("args", ())),
        given_env or [f"{k}={v}" for k, v in meta.get("env", ())],
    )


def _gather(inventory, nodes, ids=(), ask_become_pass=False):
    from ddpfleet.launch.ssh import runctl
    from ddpfleet.ssh.connection import Fleet

    loaded = inv.load(inventory, nodes)
    pythons = _pythons(loaded)
    fleet = Fleet(loaded, become_password=become_password(ask_become_pass))
    said = runctl.gather(fleet, pythons, ids)
    refused = [str(r) for r in said.values() if isinstance(r, BecomeError)]
    if refused:  # not a lost node: the run's records are there, root work was not allowed
        fleet.close()
        raise DdpfleetError("; ".join(refused))
    return loaded, pythons, fleet, said


@task(
    help={
        "inventory": INVENTORY_HELP,
        "nodes": NODES_HELP,
        "json": "print one JSON document (a list of runs, newest first) instead of the table",
        "prune": "remove ended runs' directories on every node, keeping the newest --keep",
        "keep": "with --prune: how many ended runs to keep (default: 10)",
        "ask_become_pass": ASK_BECOME_HELP,
    }
)
@cli
def runs(c, inventory=None, nodes=None, json=False, prune=False, keep=10, ask_become_pass=False):
    """List detached runs and their state."""
    from ddpfleet.launch.ssh import runctl, runstate

    if not str(keep).isdigit():
        raise DdpfleetError(f"--keep {keep!r}: give how many ended runs to keep, a number >= 0")
    loaded, pythons, fleet, said = _gather(inventory, nodes, (), ask_become_pass)
    with fleet:
        views = runctl.views(said, _index(loaded)) + _slurm_views(fleet, _index(loaded))
        if prune:
            removed = runctl.prune(fleet, pythons, int(keep))
            rows = [(n, ", ".join(r) if isinstance(r, list) else str(r) or "-")
                    for n, r in removed.items()]  # fmt: skip
            report.show(report.table(None, ("node", "removed"), rows))
            lists = [set(r) for r in removed.values() if isinstance(r, list)]
            _index(loaded).drop(set.intersection(*lists) if lists else ())
            report.exit_if_failed(removed, "runs --prune")
            return
    views.sort(key=lambda v: v.started or 0, reverse=True)
    if json:
        print(json_mod.dumps([v.as_json() for v in views], indent=1))
        return
    report.show(report.table(None, runstate.COLUMNS, runstate.rows(views)))


def _slurm_views(fleet, index):
    from ddpfleet.launch.slurm import detach as slurm_detach

    return slurm_detach.views(fleet, index.slurm())


def _slurm_run(inventory, run_id):
    """(the inventory, the run's index entry) when RUN went through Slurm, else None."""
    loaded = inv.load(inventory)
    entry = _index(loaded).entry(run_id)
    return (loaded, entry) if entry and entry.get("launcher") == "slurm" else None


def _slurm_logs(loaded, entry, node, rank, follow, ask_become_pass) -> None:
    from ddpfleet.launch.slurm import detach as slurm_detach
    from ddpfleet.ssh.connection import Fleet

    with Fleet(loaded, become_password=become_password(ask_become_pass)) as fleet:
        slurm_detach.logs(fleet, entry, node, rank, follow)


def _slurm_stop(loaded, entry, grace, ask_become_pass) -> None:
    from ddpfleet.launch.slurm import detach as slurm_detach
    from ddpfleet.ssh.connection import Fleet

    with Fleet(loaded, become_password=become_password(ask_become_pass)) as fleet:
        did, rows = slurm_detach.stop(fleet, _pythons(loaded), entry, grace)
    run = entry["run_id"]
    report.show(report.table(did, ("node", f"stop {run}"), [(n, str(r)) for n, r in rows.items()]))
    bad = [n for n, r in rows.items() if isinstance(r, NodeError) or "STILL THERE" in r]
    if bad:
        raise DdpfleetError(f"stop {run}: not confirmed on {', '.join(bad)}")


def _run_parts(inventory, nodes, run_id, ask_become_pass=False):
    from ddpfleet.launch.ssh import runctl

    loaded, pythons, fleet, said = _gather(inventory, None, (run_id,), ask_become_pass)
    views = runctl.views(said, _index(loaded), only=(run_id,))
    if not views:
        fleet.close()
        raise DdpfleetError(f"{run_id}: no such run on any node; see invoke runs")
    only = [n.strip() for n in (nodes or "").split(",") if n.strip()]
    return pythons, fleet, said, views[0], only


@task(
    help={
        "run": RUN_HELP,
        "inventory": INVENTORY_HELP,
        "node": "only this node's lines",
        "rank": "only this global rank's lines",
        "follow": "keep printing new lines until the run ends (Ctrl-C leaves the run alone)",
        "ask_become_pass": ASK_BECOME_HELP,
    }
)
@cli
def logs(c, run, inventory=None, node=None, rank=None, follow=False, ask_become_pass=False):
    """Print a detached run's lines by node and rank."""
    from ddpfleet.launch.ssh import runlogs

    if rank is not None and not str(rank).isdigit():
        raise DdpfleetError(f"--rank {rank!r}: give a global rank, a number >= 0")
    if slurm := _slurm_run(inventory, run):
        return _slurm_logs(
            *slurm, node, None if rank is None else int(rank), follow, ask_become_pass
        )
    pythons, fleet, said, _view, only = _run_parts(inventory, node, run, ask_become_pass)
    with fleet:
        parts = runlogs.nodes_of(said, run, only)
        problems = runlogs.show(fleet, pythons, run, parts,
                                None if rank is None else int(rank), follow)  # fmt: skip
    if problems:
        raise DdpfleetError("logs not read from: " + "; ".join(problems))


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
    from ddpfleet.launch.ssh import runctl

    try:
        grace = float(grace)
    except ValueError:
        raise DdpfleetError(f"--grace {grace!r}: give seconds, e.g. 3") from None
    if slurm := _slurm_run(inventory, run):
        return _slurm_stop(*slurm, grace, ask_become_pass)
    pythons, fleet, _said, view, _ = _run_parts(inventory, None, run, ask_become_pass)
    with fleet:
        results = runctl.stop(fleet, pythons, run, [n for n in view.nodes if n in pythons],
                              grace)  # fmt: skip
    rows = []
    for node, r in results.items():
        if isinstance(r, NodeError):
            rows.append((node, str(r)))
        elif not r.get("found"):
            rows.append((node, "no record of the run"))
        else:
            did = "stopped its part" if r["supervisor"] else f"was {r['was']}"
            killed = f", SIGKILLed leftovers {r['killed']}" if r["killed"] else ""
            left = f"; STILL THERE: {r['left']}" if r["left"] else ", nothing left"
            rows.append((node, f"{did}{killed}{left}"))
    report.show(report.table(None, ("node", f"stop {run}"), rows))
    bad = [n for n, r in results.items() if isinstance(r, NodeError) or r.get("left")]
    if bad:
        raise DdpfleetError(f"stop {run}: not confirmed on {', '.join(bad)}")


TASKS = (runs, logs, stop)
