"""`invoke train --detach`: the same preflight, plan and sync as an attached run, then a
supervisor per node (ddpfleet/node/run_supervisor.py) that owns that node's part without the SSH
session; the controller returns once every node says its ranks started.

The master's supervisor starts first: it takes over the master port its preflight runner has
held since the check (torchrun's store adopts that socket, so the port is never free in
between; a failed hand-off fails the start, nothing started), listens for the workers'
lifelines on a free port and reports it; the workers' supervisors then start in parallel, each
connecting to it. A node that cannot start stops the parts already started (nothing is left
half-running).

With spares (config.spares) every spare is checked and synced like a node, its supervisor
stands by with no ranks (joined to the master's lifeline), and the master's supervisor may
replace a lost node by one (ddpfleet/node/generation.py).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Mapping

from ddpfleet.errors import NodeError
from ddpfleet.launch import sync
from ddpfleet.launch.config import TrainConfig
from ddpfleet.launch.index import shape
from ddpfleet.launch.output import Output
from ddpfleet.launch.plan import NodePlan, Plan
from ddpfleet.launch.preflight import fail_if
from ddpfleet.launch.ssh import runctl
from ddpfleet.launch.ssh.member import STOP_GRACE_S
from ddpfleet.launch.ssh.run import open_checked, prepare
from ddpfleet.ssh.connection import Conn, Fleet

SUPERVISOR_FILES = (  # run_supervisor.py and the helpers it loads, in that order
    "run_supervisor.py",
    "records.py",
    "proctree.py",
    "masterport.py",
    "part.py",  # the node's part, as an attached run's; its guardian too
    "run_lifeline.py",
    "run_snapshot.py",
    "run_unit.py",  # where PID 1 is systemd: the supervisor as a transient service
    "checkpoints.py",  # the run's checkpoint dir; --resume copies the old run's newest one
    "generation.py",  # with spares: fence, replace, restart
    "follower.py",  # with spares: a member's or spare's side
    "succession.py",  # with spares: the master's loss, a survivor leads
    "health_node.py",  # with spares: a spare's health, checked before it takes a place
)
START_TIMEOUT_S = 90


def node_spec(
    config: TrainConfig,
    p: Plan,
    n: NodePlan,
    port: int | None,
    secret: str,
    resume: str | None = None,
    hosts: Mapping[str, str] | None = None,
) -> dict:
    """What the node's supervisor runs: the plan's torchrun, and (resume) whose snapshot.
    `secret`: the run's lifeline secret (hex), which every supervisor proves to its peers; it
    travels on stdin and stays in the root-only spec.json. `hosts`: the spares' addresses."""
    hosts = dict(hosts or {})
    return {
        "run_id": p.run_id,
        "node": n.node,
        "rank": n.rank,
        "nnodes": p.nnodes,
        "nproc": p.nproc,
        "argv": list(n.argv),
        "env": dict(n.env),
        "cwd": n.mirror,  # the supervisor copies it into the run's code/ (n.cwd) and runs there
        "user": n.user,
        "grace": STOP_GRACE_S,
        "master_host": p.master_addr,
        "lifeline_port": port,
        "lifeline_secret": secret,
        "resume_from": resume,
        "workers": [w.node for w in p.nodes[1:]] if n.rank == 0 else [],
        "spares": list(config.spares) if n.rank == 0 else [],
        "spare": n.node in config.spares,
        "recovery": {
            "max_recoveries": config.max_recoveries,
            "expected_gpus": config.gpus.get(n.node),
            # every node's: whoever may lead after the master's loss (node/succession.py)
            "gang": [m.node for m in p.nodes],
            "spares": list(config.spares),
            "hosts": {**{m.node: m.host for m in p.nodes}, **hosts},
        }
        if config.spares
        else None,
        "meta": {
            "nodes": [m.node for m in p.nodes],
            "script": p.script,
            "args": list(config.args),
            "env": [list(kv) for kv in config.env],
            "nproc": p.nproc,
            "port": p.master_port,  # train --resume keeps the job's shape
            "spares": list(config.spares),  # and its spares
        },
    }


def start_node(conn: Conn, python: str, spec: Mapping) -> dict:
    """The node's launcher: its sources and the spec on stdin; its one JSON line back."""
    stdin = sync.helper_sources(SUPERVISOR_FILES) + json.dumps(spec).encode()
    r = conn.run(
        sync.helper_command(python, SUPERVISOR_FILES[0]),
        stdin=stdin + b"\n",
        check=False,
        timeout=START_TIMEOUT_S,
        root=True,  # the supervisor is root: the run dir, the cgroup; ranks drop to n.user
    )
    try:
        said = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        said = {"ok": False, "error": (r.stderr or r.stdout).strip()[-300:] or "no answer"}
    if not said.get("ok"):
        raise NodeError(conn.name, f"the run's supervisor did not start: {said.get('error')}")
    return said


def train_detached(
    fleet: Fleet,
    config: TrainConfig,
    index: runctl.Index,
    out: Output | None = None,
    resume: str | None = None,
) -> Plan:
    """Check, plan, sync; then start every node's supervisor and return. Raises
    DdpfleetError naming the node that could not start (the others' parts are stopped).
    With `resume` (a run id) every node runs in a copy of that run's code snapshot."""
    out = out or Output()
    everyone = dataclasses.replace(config, order=config.order + config.spares)
    files, members = open_checked(fleet, everyone, out)
    try:
        p, spares = without_spares(prepare(fleet, everyone, members, files), config.spares)
        began = time.monotonic()
        master = p.nodes[0]
        secret = secrets.token_hex(32)  # this run's only: a worker proves it to join the gang
        # The master's runner holds the port from the preflight on and hands the socket to the
        # master's supervisor, whose torchrun adopts it: no local user can take it in between.
        hosts = {name: sp.host for name, sp in spares.items()}  # where a spare could be reached
        spec = node_spec(config, p, master, None, secret, resume, hosts)
        name = f"ddpfleet-port.{p.run_id}.{secrets.token_hex(8)}"
        spec["port_from"] = {**members[master.node].hand_off(name), "port": config.port}
        said = start_node(fleet.conns[master.node], config.python[master.node], spec)
    except NodeError as e:
        fail_if([str(e)], "detached start failed")
    finally:
        # The runners only checked: they free the code dir's lock; the master's runner frees
        # the port too, unless its supervisor took it.
        for m in members.values():
            m.call_off()
    port = said["lifeline_port"]
    results = fleet.map(
        lambda c: start_node(
            c,
            config.python[c.name],
            node_spec(config, p, spares.get(c.name) or p.node(c.name), port, secret, resume, hosts),
        ),
        [n.node for n in p.nodes[1:]] + list(config.spares),
    )
    problems = [str(r) for r in results.values() if isinstance(r, NodeError)]
    if problems:
        started = [master.node] + [n for n, r in results.items() if isinstance(r, dict)]
        runctl.stop(fleet, config.python, p.run_id, started, STOP_GRACE_S)
        fail_if(problems, "detached start failed; the parts already started were stopped")
    index.add(p.run_id, [n.node for n in p.nodes] + list(config.spares), launcher="ssh", **shape(p))
    if resume:
        out.line(resumed_line(resume, {master.node: said, **results}))
    took = time.monotonic() - began
    standby = f"; spares standing by: {', '.join(config.spares)}" if config.spares else ""
    out.line(
        f"run {p.run_id}: started detached on {', '.join(config.order)}{standby} ({took:.2f}s)"
    )
    return p


def without_spares(p: Plan, spares: tuple[str, ...]) -> tuple[Plan, dict[str, NodePlan]]:
    """The gang's plan (the spares planned like nodes for the checks and the sync, then taken
    out: --nnodes counts the gang only) and each spare's NodePlan (its node_rank a stand-in
    until it takes a lost node's place)."""
    if not spares:
        return p, {}
    nnodes = str(len(p.nodes) - len(spares))

    def fixed(n: NodePlan) -> NodePlan:
        argv = list(n.argv)
        argv[argv.index("--nnodes") + 1] = nnodes
        return dataclasses.replace(n, argv=tuple(argv))

    gang = tuple(fixed(n) for n in p.nodes if n.node not in spares)
    standby = {n.node: fixed(n) for n in p.nodes if n.node in spares}
    return dataclasses.replace(p, nodes=gang), standby


def resumed_line(old: str, said: Mapping[str, dict]) -> str:
    """What each node's supervisor put in the new run's DDPFLEET_CHECKPOINT_DIR from `old`."""
    steps: dict[object, list[str]] = {}
    for node, s in said.items():
        steps.setdefault((s.get("resumed") or {}).get("step"), []).append(node)
    if list(steps) == [None]:
        return f"resume: run {old} has no complete checkpoint; the script starts from step 0"
    parts = [
        f"step {step} on {', '.join(nodes)}" if step is not None else f"none on {', '.join(nodes)}"
        for step, nodes in steps.items()
    ]
    return f"resume: run {old}'s newest complete checkpoint (verified) copied: {'; '.join(parts)}"
