"""The launch plan (pure): the run's TrainConfig + per-node facts -> per node the exact
torchrun argv, its environment and working directory."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from ddpfleet.errors import PlanError
from ddpfleet.launch.config import TrainConfig

# On every node, outside the code dir: the node programs' (node/records.py RUNS) run dirs.
RUNS = "/var/lib/ddpfleet/runs"


@dataclass(frozen=True)
class NodeFacts:
    """What the probe found on one node (node_helper.py probe), plus how SSH reaches it."""

    python: str
    home: str
    ssh_host: str
    torch: str | None = None
    cuda: str | None = None
    nccl: str | None = None
    gpus: int | None = None  # nvidia-smi's count, when it was asked
    addrs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # iface -> IPv4s
    master_resolved: str | None = None  # the master's host as this node resolves it
    route_dev: str | None = None  # this node's interface towards that address


@dataclass(frozen=True)
class NodePlan:
    node: str
    rank: int
    host: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str  # where the ranks run: the code dir, or (snapshot) the run's copy of it
    log_dir: str
    user: str | None = None  # who the ranks run as (the training user); None: the login user
    code_dir: str = ""  # where the sync mirrors the project ("": cwd)
    checkpoint_dir: str = ""  # DDPFLEET_CHECKPOINT_DIR: RUNS/<run-id>/checkpoints

    @property
    def mirror(self) -> str:
        """The code dir the sync fills (and a snapshot is copied from)."""
        return self.code_dir or self.cwd


@dataclass(frozen=True)
class Plan:
    run_id: str
    master: str
    master_addr: str
    master_port: int
    nproc: int
    script: str
    nodes: tuple[NodePlan, ...]
    # Detached runs' spares: planned (checked, synced) like nodes, after the gang, with no
    # ranks until one takes a lost node's node_rank (its NodePlan's rank is a stand-in).
    spares: tuple[str, ...] = ()

    @property
    def gang(self) -> tuple[NodePlan, ...]:
        return tuple(n for n in self.nodes if n.node not in self.spares)

    @property
    def nnodes(self) -> int:
        return len(self.gang)

    def node(self, name: str) -> NodePlan:
        return next(n for n in self.nodes if n.node == name)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def master_address(order: Sequence[str], facts: Mapping[str, NodeFacts]) -> str:
    """The master's address as the workers reach it: its SSH host when that is an IP, else
    what the first worker resolves it to (the master itself may say 127.0.1.1)."""
    master = facts[order[0]]
    if _is_ip(master.ssh_host):
        return master.ssh_host
    for name in order[1:]:
        if facts[name].master_resolved:
            return facts[name].master_resolved
    if len(order) > 1:
        raise PlanError(
            f"{order[1]}: cannot resolve the master's host {master.ssh_host!r}; "
            f"use an IP address for {order[0]} in the inventory"
        )
    return master.master_resolved or master.ssh_host


def socket_ifname(is_master: bool, addr: str, facts: NodeFacts) -> str | None:
    """The interface gloo/NCCL should use: on the master the one holding its address, on a
    worker the one its route to the master leaves by. None when not known."""
    if is_master:
        return next((i for i, ips in facts.addrs.items() if addr in ips), None)
    return facts.route_dev if facts.route_dev and facts.route_dev != "lo" else None


def nproc_per_node(config: TrainConfig, facts: Mapping[str, NodeFacts]) -> int:
    """--nproc-per-node N, or auto: the node's GPUs (inventory gpus:, else nvidia-smi), 1 on a
    node without; torchrun needs the same count on every node."""
    if config.nproc is not None:
        return config.nproc
    counts = {}
    for name in config.order:
        gpus = config.gpus[name]
        gpus = facts[name].gpus if gpus is None else gpus
        counts[name] = gpus or 1
    if len(set(counts.values())) > 1:
        found = ", ".join(f"{n}: {c}" for n, c in counts.items())
        raise PlanError(
            f"--nproc-per-node auto: the nodes have different GPU counts ({found}); "
            "torchrun needs the same count on every node: pick nodes with equal "
            "counts or pass --nproc-per-node N"
        )
    return next(iter(counts.values()))


def _under_home(path: str, home: str) -> str:
    return home.rstrip("/") + path[1:] if path == "~" or path.startswith("~/") else path


def plan(config: TrainConfig, facts: Mapping[str, NodeFacts]) -> Plan:
    """Per node: the exact torchrun argv, its environment and working directory."""
    run_id, spares = config.run_id, tuple(n for n in config.order if n in config.spares)
    gang = [n for n in config.order if n not in spares]
    order = (*gang, *spares)  # a spare's node_rank: after the gang's, a stand-in
    addr = master_address(gang, facts)
    nproc = nproc_per_node(config, facts)
    nodes = []
    for rank, name in enumerate(order):
        f = facts[name]
        log_dir = f"{_under_home(config.remote_logs, f.home)}/{run_id}"
        argv = (
            f.python,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            str(len(gang)),
            "--node-rank",
            str(rank),
            "--master-addr",
            addr,
            "--master-port",
            str(config.port),
            "--nproc-per-node",
            str(nproc),
            "--rdzv-id",
            run_id,
            "--log-dir",
            log_dir,
            "--tee",
            "3",
            *(("--max-restarts", str(config.max_restarts)) if config.max_restarts else ()),
            config.script,
            *config.args,
        )
        checkpoints = checkpoint_dir(run_id)
        env = {
            "DDPFLEET_RUN_ID": run_id,
            "DDPFLEET_CHECKPOINT_DIR": checkpoints,
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        ifname = socket_ifname(rank == 0, addr, f)
        if ifname:
            # NCCL reads a prefix list; '=' asks for exactly this interface (eth1 != eth10).
            env.update(GLOO_SOCKET_IFNAME=ifname, NCCL_SOCKET_IFNAME=f"={ifname}")
        env.update(config.env)
        code = _under_home(config.code_dir, f.home)
        nodes.append(
            NodePlan(
                name,
                rank,
                config.hosts[name],
                argv,
                MappingProxyType(env),
                f"{RUNS}/{run_id}/code" if config.snapshot else code,
                log_dir,
                config.users.get(name),
                code,
                checkpoints,
            )
        )
    return Plan(run_id, order[0], addr, config.port, nproc, config.script, tuple(nodes), spares)


def checkpoint_dir(run_id: str) -> str:
    """Every run's checkpoint dir on every node, whichever launcher (the checkpoint contract):
    outside the code dir, so a sync or a prune of the code never touches it."""
    return f"{RUNS}/{run_id}/checkpoints"


def check_versions(facts: Mapping[str, NodeFacts]) -> list[str]:
    """One line per problem: torch missing, or torch/CUDA/NCCL differing between nodes."""
    problems = [
        f"{n}: torch is not installed in {f.python}'s env; run invoke bootstrap"
        for n, f in facts.items()
        if f.torch is None
    ]
    if problems:
        return problems
    for what in ("torch", "cuda", "nccl"):
        seen: dict[str, list[str]] = {}
        for name, f in facts.items():
            seen.setdefault(str(getattr(f, what)), []).append(name)
        if len(seen) > 1:
            found = "; ".join(f"{v} on {', '.join(ns)}" for v, ns in seen.items())
            problems.append(
                f"{what} versions differ between nodes: {found}; every node needs "
                "the same (run invoke bootstrap)"
            )
    return problems
