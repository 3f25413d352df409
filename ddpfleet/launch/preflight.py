"""Before anything starts, every node at once: facts, the code dir claimed, the master port
bound and reached, versions compared, the run id fresh. Nothing is started on a failure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from ddpfleet.errors import NodeError, PlanError, Refusals
from ddpfleet.hygiene import clean, private_dir
from ddpfleet.launch import sync
from ddpfleet.launch.config import TrainConfig
from ddpfleet.launch.output import Output
from ddpfleet.launch.plan import NodeFacts, Plan, check_versions, plan
from ddpfleet.launch.ssh.member import Member
from ddpfleet.ssh.connection import NODE_IO_ERRORS, Conn, Fleet

CONNECT_CHECK_S = 10.0  # a worker's connect to the master's port; its runner may start later


@dataclass(frozen=True)
class Probed:
    facts: NodeFacts
    manifest: Mapping[str, list]
    code: Mapping[str, object]  # the code dir: claimed and locked for this run, or why not
    listen: Mapping[str, object] | None  # the master's bind test
    reach: Mapping[str, object] | None  # a worker's connect to the master's port
    slurm_jobs: tuple[tuple[str, str], ...] = ()  # ddpfleet's Slurm jobs running there: id, name


def _probed(conn: Conn, python: str, got: Mapping) -> Probed:
    facts = NodeFacts(
        python=python,
        home=got["home"],
        ssh_host=conn.host,
        torch=got["torch"],
        cuda=got["cuda"],
        nccl=got["nccl"],
        gpus=got["gpus"],
        addrs=MappingProxyType({k: tuple(v) for k, v in got["addrs"].items()}),
        master_resolved=got["master_resolved"],
        route_dev=got["route_dev"],
    )
    jobs = tuple((str(j[0]), str(j[1])) for j in got.get("slurm_jobs") or ())
    return Probed(facts, got["manifest"], got["code"], got.get("listen"), got.get("reach"), jobs)


def open_members(fleet: Fleet, config: TrainConfig, out: Output) -> dict[str, Member]:
    """A runner per node; the master binds and holds the port, the workers connect to it."""
    port, master_host = config.port, fleet.conns[config.master].host
    members = {}
    for rank, name in enumerate(config.order):
        request = {
            "run_id": config.run_id,
            "code_dir": config.code_dir,
            "master_host": master_host,
            "count_gpus": config.count_gpus(name),
            "listen": port if rank == 0 else None,
            "reach": None if rank == 0 else {"port": port, "timeout": CONNECT_CHECK_S},
        }
        members[name] = Member(fleet.conns[name], config.python[name], out, config.users.get(name))
        members[name].open(request)
    return members


def port_problems(order: Sequence[str], probed: Mapping[str, Probed], port: int) -> list[str]:
    listen = probed[order[0]].listen or {}
    if not listen.get("ok"):
        return [
            (
                f"{order[0]}: master port {port} is not free ({listen.get('error')}); stop "
                "what holds it or pick another with --master-port"
            )
        ]
    problems = []
    for name in order[1:]:
        reach = probed[name].reach or {}
        if not reach.get("ok"):
            problems.append(
                f"{name}: cannot reach the master {order[0]} on port {port} "
                f"({reach.get('error')}); open that port between the nodes or "
                "pick another with --master-port"
            )
    return problems


def slurm_problems(order: Sequence[str], probed: Mapping[str, Probed]) -> list[str]:
    """One line per node a running Slurm job of ddpfleet holds: an SSH run there would share
    its devices and could re-sync its code (the job holds its own code dir's lock only)."""
    problems = []
    for name in order:
        for job_id, job_name in probed[name].slurm_jobs if name in probed else ():
            run = job_name.removeprefix("ddpfleet-")
            problems.append(
                f"{name}: slurm job {job_id} (ddpfleet run {run}) is running there; wait for "
                f"it to end, stop it (invoke stop {run}) or leave {name} out (--exclude {name})"
            )
    return problems


def fail_if(problems: Sequence[str], what: str) -> None:
    """Every problem found, one line each (a node's text cleaned of anything that could break
    or add a line), under what failed."""
    if problems:
        lines = "\n  ".join(clean(p) for p in problems)
        raise Refusals(f"{what}; nothing was started:\n  {lines}")


def preflight(
    config: TrainConfig, members: Mapping[str, Member], beside_slurm: bool = False
) -> tuple[Plan, dict[str, Probed]]:
    """Every node's facts (in parallel: the runners probe at once), then the pure plan.
    beside_slurm: the run is itself a Slurm job (Slurm queues it behind a running one), so a
    node that a Slurm job of ddpfleet holds is not refused."""
    order, port = config.order, config.port
    probed, problems = {}, []
    for name in order:  # the master first: a taken port need not wait for the workers' connects
        m = members[name]
        try:
            probed[name] = _probed(m.conn, m.python, m.wait_facts())
        except NodeError as e:
            problems.append(str(e))
        if name == order[0] and name in probed and not (probed[name].listen or {}).get("ok"):
            jobs = [] if beside_slurm else slurm_problems(order[:1], probed)  # what holds it
            fail_if(jobs + port_problems(order[:1], probed, port) + problems, "preflight failed")
    fail_if(problems, "preflight failed")
    facts = {n: p.facts for n, p in probed.items()}
    claims = {n: probed[n].code for n in order}
    fail_if(
        ([] if beside_slurm else slurm_problems(order, probed))
        + sync.code_dir_problems(claims, config.code_dir_flag)
        + check_versions(facts)
        + port_problems(order, probed, port),
        "preflight failed",
    )
    return plan(config, facts), probed


def reused_run_id(fleet: Fleet, p: Plan) -> list[str]:
    """One line per node that already has this run's log dir: torchrun would add to it and
    the rank logs of two runs would meet under one logs/<run-id>/."""

    def one(conn: Conn) -> bool:
        try:
            conn.sftp(p.node(conn.name).user).lstat(p.node(conn.name).log_dir)
        except FileNotFoundError:
            return False
        except NODE_IO_ERRORS as e:
            raise NodeError(conn.name, f"cannot check {p.node(conn.name).log_dir}: {e}") from None
        return True

    results = fleet.map(one, [n.node for n in p.nodes])
    return [
        str(r)
        if isinstance(r, NodeError)
        else f"{name}: --run-id {p.run_id} was used before ({p.node(name).log_dir} exists); "
        "pick a new --run-id or leave it out for a fresh one"
        for name, r in results.items()
        if r is not False
    ]


def fresh_run_dir(run_dir: Path, make: bool = False) -> None:
    """Refuse a run id whose logs/<run-id>/ exists: a reused id never overwrites old logs."""
    try:
        if make:
            private_dir(run_dir.parent)  # output may hold secrets: 0700, files 0600
            run_dir.mkdir(mode=0o700)  # exclusive: a second run of the same id loses here
        elif run_dir.exists():
            raise FileExistsError
    except FileExistsError:
        raise PlanError(
            f"--run-id {run_dir.name} was used before ({run_dir} exists); pick a "
            "new --run-id or leave it out for a fresh one"
        ) from None
