"""`train --dry-run`: everything an attached or detached run checks before it starts, and the
plan, with nothing synced and nothing started.

The same steps as launch/ssh/run.py up to the sync: the project's files and the script, every
node reached, a runner per node probing it (env, torch, GPUs, addresses, the code dir claimed,
the master port bound and reached from every worker, versions compared), the run id fresh, the
plan shown; then what the sync would send and delete, and every runner called off. The only
trace on a node is the code dir itself, made (0700, empty) where it did not exist yet, as the
claim of any run makes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ddpfleet import report
from ddpfleet.launch import sync
from ddpfleet.launch.config import TrainConfig
from ddpfleet.launch.display import render_plan
from ddpfleet.launch.output import Output
from ddpfleet.launch.plan import Plan
from ddpfleet.launch.preflight import fail_if, fresh_run_dir, preflight, reused_run_id
from ddpfleet.launch.ssh.run import open_checked
from ddpfleet.ssh.connection import Fleet


def dry_run(fleet: Fleet, config: TrainConfig, out: Output | None = None) -> Plan:
    """Preflight and plan; a failed check raises PlanError (one line per problem)."""
    out = out or Output()
    fresh_run_dir(config.run_dir)
    config = dataclasses.replace(config, order=config.order + config.spares)  # checked too
    files, members = open_checked(fleet, config, out)
    try:
        p, probed = preflight(config, members)
        fail_if(reused_run_id(fleet, p), "preflight failed")
        report.show(render_plan(p, config.env))
        changes = {n.node: sync.diff(files, probed[n.node].manifest) for n in p.nodes}
    finally:  # each runner frees the master port and exits, having started nothing
        for m in members.values():
            m.call_off()
    report.console.print(would_sync(changes), markup=False)
    report.show("dry run: every check passed; nothing was synced or started")
    return p


def would_sync(changes: Mapping[str, sync.Change]) -> str:
    parts = [
        f"{name} unchanged"
        if not (c.send or c.delete)
        else f"{name} {len(c.send)} to send, {len(c.delete)} to delete"
        for name, c in changes.items()
    ]
    return "code (not sent): " + "; ".join(parts)
