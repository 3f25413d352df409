"""The whole run: preflight, the plan shown, the code synced, the gang, the verdict."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ddpfleet import report
from ddpfleet.errors import NodeError, RunFailed
from ddpfleet.launch import sync
from ddpfleet.launch.config import TrainConfig
from ddpfleet.launch.display import render_plan
from ddpfleet.launch.outcome import (
    Outcome,
    failure_message,
    first_failure,
    held_lines,
    summary_line,
)
from ddpfleet.launch.output import Output
from ddpfleet.launch.plan import Plan
from ddpfleet.launch.preflight import (
    Probed,
    fail_if,
    fresh_run_dir,
    open_members,
    preflight,
    reused_run_id,
)
from ddpfleet.launch.ssh.gang import Gang
from ddpfleet.launch.ssh.member import Member
from ddpfleet.launch.ssh.ranklogs import fetch_rank_logs
from ddpfleet.launch.verdict import RunState
from ddpfleet.ssh.connection import Conn, Fleet


def push_code(
    fleet: Fleet, p: Plan, files: Mapping[str, sync.Entry], root: Path, probed: Mapping[str, Probed]
) -> dict[str, sync.SyncStats | NodeError]:
    """Only what changed, every node in parallel; each says whether the script is there."""

    def one(conn: Conn) -> sync.SyncStats:
        n = p.node(conn.name)
        remote = probed[conn.name].manifest
        change = sync.diff(files, remote)
        stats = sync.push(
            conn, n.argv[0], n.mirror, root, files, change, p.script, remote, p.run_id, n.user
        )
        if not stats.script:
            raise NodeError(conn.name, f"{n.mirror}/{p.script} is missing after the sync")
        return stats

    return fleet.map(one, [n.node for n in p.nodes])


def _sync_line(results: Mapping[str, sync.SyncStats | NodeError]) -> str:
    parts = []
    for name, s in results.items():
        if isinstance(s, sync.SyncStats):
            parts.append(
                f"{name} unchanged"
                if not (s.sent or s.deleted)
                else f"{name} {s.sent} sent ({s.bytes / 1024:.1f} KiB), {s.deleted} deleted"
            )
    return "code: " + "; ".join(parts)


def open_checked(
    fleet: Fleet, config: TrainConfig, out: Output
) -> tuple[dict[str, sync.Entry], dict[str, Member]]:
    """The project's files (mistakes here come before any connection), every node reached, and
    a runner per node probing it: what an attached and a detached run both start with."""
    files = sync.project_files(config.project_dir, config.keep_out)
    sync.require(files, config.script, config.project_dir)
    fail_if(
        [str(r) for r in fleet.open().values() if isinstance(r, NodeError)],
        "cannot reach every node",
    )
    return files, open_members(fleet, config, out)


def prepare(
    fleet: Fleet,
    config: TrainConfig,
    members: Mapping[str, Member],
    files: Mapping[str, sync.Entry],
    beside_slurm: bool = False,
) -> Plan:
    """Everything before launch: probes, the plan shown, the sync and the script check
    (beside_slurm: preflight's, for the Slurm launcher)."""
    p, probed = preflight(config, members, beside_slurm)
    fail_if(reused_run_id(fleet, p), "preflight failed")
    report.show(render_plan(p, config.env))
    results = push_code(fleet, p, files, config.project_dir, probed)
    fail_if([str(r) for r in results.values() if isinstance(r, NodeError)], "code sync failed")
    report.console.print(_sync_line(results), markup=False)
    return p


def train(fleet: Fleet, config: TrainConfig, out: Output | None = None, on=None) -> list[Outcome]:
    """Check, plan, sync, run as one gang, collect. Raises DdpfleetError naming the first
    failing node and rank; KeyboardInterrupt after an interrupt stopped every node. `on`: told
    when the gang starts (on.started(plan)) and ends (on.ended(plan, outcomes, reason, restart
    lines by node)): the controller's index (index.Attached)."""
    out = out or Output()
    fresh_run_dir(config.run_dir)  # made once the preflight passed
    files, members = open_checked(fleet, config, out)
    try:
        p = prepare(fleet, config, members, files)
        fresh_run_dir(config.run_dir, make=True)
    except BaseException:  # a refusal or Ctrl-C: every runner exits having started nothing
        for m in members.values():
            m.call_off()
        raise
    gang = Gang([members[n.node] for n in p.nodes], out)
    if on is not None:
        on.started(p)
    gang.run(p, config.run_dir)
    return verdict(fleet, p, gang, config.run_dir, out, on)


def verdict(
    fleet: Fleet, p: Plan, gang: Gang, run_dir: Path, out: Output, on=None
) -> list[Outcome]:
    """Rank logs back, one summary line per node, and the verdict."""
    outcomes = [m.outcome for m in gang.members]
    # Not from a lost node: SFTP to a peer that went silent would hang with it.
    fetched = fetch_rank_logs(
        fleet, p, run_dir, [o.node for o in outcomes if o.state is not RunState.LOST]
    )
    first = first_failure(outcomes)
    if on is not None:
        on.ended(p, outcomes, gang.reason, {m.name: m.restarts for m in gang.members})
    for line in held_lines(out.held(), outcomes, first, run_dir):
        out.line(line)
    for o in outcomes:
        out.line(summary_line(o, first, gang.reason))
    missing = [str(r) for r in fetched.values() if isinstance(r, NodeError)]
    out.line(f"logs: {run_dir}" + (f" (not copied: {'; '.join(missing)})" if missing else ""))
    if first is not None:
        raise RunFailed(failure_message(first, outcomes))
    if gang.handled:
        raise KeyboardInterrupt
