"""`invoke train`'s flags, resolved once into a checked, frozen TrainConfig.

torchrun's own shape: parse -> validated config -> plan -> launch. tasks.train hands the raw
flags and the inventory to resolve(); every mistake a flag can hold is refused there, before
any connection, and everything below (preflight, plan, gang, logs) reads the TrainConfig only.

    config = resolve(inventory, TrainFlags(nodes=("node0", "node1"), args="--epochs 3"), logs)
    config.order        # ('node0', 'node1'): node_rank = position, order[0] is the master
    config.port         # --master-port, else cluster.master_port
    config.nproc        # --nproc-per-node N, or None for auto (the nodes' GPUs, once probed)
"""

from __future__ import annotations

import hashlib
import re
import secrets
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType

from ddpfleet import envs, secretfiles, trainuser
from ddpfleet.errors import PlanError
from ddpfleet.inventory import Inventory

DEFAULT_SCRIPT = "scripts/train_ddp.py"
# One code dir per project: two projects on one cluster each keep their own mirror (a shared one
# made every switch a full resend that deleted the other's files). {project}: project_key().
DEFAULT_CODE_DIR = "~/ddpfleet/{cluster}/{project}/code"
DEFAULT_REMOTE_LOGS = "~/ddpfleet/{cluster}/runs"
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class TrainFlags:
    """`invoke train`'s flags as given on the command line; None or empty: the default."""

    nodes: tuple[str, ...] = ()  # in run order (node_rank = position); empty: all
    script: str | None = None
    args: str = ""  # one string, split like a shell would
    nproc_per_node: str = "auto"
    master_port: str | int | None = None
    env: tuple[str, ...] = ()  # NAME=VALUE, repeatable
    run_id: str | None = None
    project_dir: str | Path = "."
    code_dir: str | None = None
    remote_logs: str = DEFAULT_REMOTE_LOGS
    max_restarts: str | int = 0  # torchrun's elastic restarts after a rank failure
    snapshot: bool = False  # the ranks run in a copy of the code dir (ssh --detach, --resume)


@dataclass(frozen=True)
class TrainConfig:
    """One run, resolved and checked: what every stage below the task reads."""

    run_id: str
    cluster: str
    order: tuple[str, ...]  # node names by node_rank; order[0] hosts the rendezvous
    hosts: Mapping[str, str]  # node -> its inventory host
    python: Mapping[str, str]  # node -> the training env's python
    gpus: Mapping[str, int | None]  # node -> inventory gpus: (None: not said there)
    port: int  # the master port
    nproc: int | None  # processes per node; None: auto, the nodes' GPUs once probed
    script: str  # relative to project_dir, and so to the code dir on the nodes
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]  # --env, in the order given
    project_dir: Path  # absolute: the directory mirrored to the nodes
    code_dir: str  # on the nodes, {cluster} filled in; '~' is each node's home
    code_dir_flag: str  # --code-dir as given, for messages
    remote_logs: str  # torchrun's --log-dir parent on the nodes, {cluster} filled in
    run_dir: Path  # logs/<run-id>/ on the controller
    # node -> the training user every rank runs as (train_user role; root only when allowed)
    users: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    max_restarts: int = 0  # passed to torchrun (--max-restarts) when above 0
    snapshot: bool = False  # the ranks run in RUNS/<run-id>/code, a copy of the code dir
    # A detached run's spares (train --spares / inventory spares:): not in `order`, each ready
    # to take a lost node's place; at most max_recoveries replacements (node/generation.py).
    spares: tuple[str, ...] = ()
    max_recoveries: int = 3
    # Controller paths the sync never sends even when they lie in project_dir: the inventory's
    # secrets (ddpfleet.secretfiles) and the runs' logs.
    keep_out: frozenset[Path] = frozenset()

    @property
    def master(self) -> str:
        return self.order[0]

    def count_gpus(self, node: str) -> bool:
        """Whether the node's preflight should count its GPUs: auto, and the inventory is silent."""
        return self.nproc is None and self.gpus[node] is None


def resolve(inventory: Inventory, flags: TrainFlags, log_root: Path) -> TrainConfig:
    """The flags and the inventory, checked once; a mistake is a PlanError naming the flag."""
    port = check_port(flags.master_port, inventory.cluster.master_port)
    env = parse_env(flags.env)
    run_id = check_run_id(flags.run_id or new_run_id())
    code_dir = check_code_dir(flags.code_dir or DEFAULT_CODE_DIR)
    project_dir = Path(flags.project_dir).resolve()
    nproc = check_nproc(str(flags.nproc_per_node))
    order = run_order(inventory, flags.nodes)
    nodes = [inventory.node(name) for name in order]
    cluster = inventory.cluster.name
    users = {n.name: trainuser.settings(inventory, n) for n in nodes}
    for name, user in users.items():
        trainuser.refuse_root(user, name)
    return TrainConfig(
        run_id=run_id,
        cluster=cluster,
        order=order,
        hosts=MappingProxyType({n.name: n.host for n in nodes}),
        python=MappingProxyType({n.name: envs.env_python(inventory, n) for n in nodes}),
        gpus=MappingProxyType({n.name: n.gpus for n in nodes}),
        port=port,
        nproc=None if nproc == "auto" else int(nproc),
        script=flags.script or DEFAULT_SCRIPT,
        args=split_args(flags.args),
        env=env,
        project_dir=project_dir,
        code_dir=code_dir.format(cluster=cluster, project=project_key(project_dir)),
        code_dir_flag=code_dir,
        remote_logs=flags.remote_logs.format(cluster=cluster),
        run_dir=log_root / run_id,
        users=MappingProxyType({name: user.name for name, user in users.items()}),
        max_restarts=check_max_restarts(flags.max_restarts),
        snapshot=flags.snapshot,
        keep_out=secretfiles.named(inventory) | {log_root.absolute()},
    )


def check_port(value: str | int | None, default: int) -> int:
    if value in (None, ""):
        return default
    if not str(value).isdigit() or not 1 <= int(value) <= 65535:
        raise PlanError(f"--master-port {value!r}: use a port from 1 to 65535")
    return int(value)


def check_max_restarts(value: str | int) -> int:
    if not str(value).isdigit():
        raise PlanError(f"--max-restarts {value!r}: use a number >= 0")
    return int(value)


def split_args(args: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(args or ""))
    except ValueError as e:  # an unclosed quote
        raise PlanError(f"--args {args!r}: {e}; quote the arguments as in a shell") from None


def new_run_id() -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def parse_env(pairs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """--env K=V (repeatable) -> ((K, V), ...); bad names are refused, not passed on."""
    out = []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not ENV_NAME_RE.match(name):
            raise PlanError(f"--env {pair!r}: expected NAME=VALUE with NAME like MY_VAR")
        if name == "DDPFLEET_RUN_ID":
            raise PlanError("--env DDPFLEET_RUN_ID: set by ddpfleet; use --run-id instead")
        out.append((name, value))
    return tuple(out)


def project_key(project_dir: Path) -> str:
    """The project's name on the nodes: its directory's name, made safe, and 8 hex digits of
    the hash of its absolute path, so two checkouts named alike still get a dir each:
    /home/ann/mytrain -> mytrain-3f2a9c1e."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", project_dir.name).strip(".-_")[:40] or "project"
    return f"{name}-{hashlib.sha256(str(project_dir).encode()).hexdigest()[:8]}"


def check_code_dir(code_dir: str) -> str:
    try:
        code_dir.format(cluster="x", project="y")
    except (KeyError, IndexError, ValueError):
        code_dir = ""
    if not code_dir.strip():
        raise PlanError(
            "--code-dir: give a path on the nodes, e.g. ~/ddpfleet/{cluster}/{project}/code "
            "({cluster} and {project} are the placeholders; write braces as {{ and }})"
        )
    return code_dir


def check_run_id(run_id: str) -> str:
    if not RUN_ID_RE.match(run_id):
        raise PlanError(
            f"--run-id {run_id!r}: use 1-64 letters, digits, '.', '_' or '-' "
            "(it names directories on every node)"
        )
    return run_id


def run_order(inventory: Inventory, nodes: Sequence[str]) -> tuple[str, ...]:
    """Node names by node_rank. Without --nodes: all, the cluster's master first.

    torchrun's static rendezvous serves its store on node_rank 0, so an explicit
    cluster.master that is part of the run but not first in --nodes cannot be honoured.
    """
    master = inventory.cluster.master
    if not nodes:
        names = [n.name for n in inventory.nodes]
        return tuple([master] + [n for n in names if n != master] if master in names else names)
    explicit = (inventory.lines or {}).get(("cluster", "master"))
    if explicit and master in nodes and nodes[0] != master:
        raise PlanError(
            f"--nodes {','.join(nodes)}: {inventory.where('cluster', 'master')} makes "
            f"{master} the master, but node_rank 0 (the first in --nodes) hosts "
            f"torchrun's rendezvous: put {master} first"
        )
    return tuple(nodes)


def check_nproc(flag: str) -> str:
    if flag != "auto" and (not flag.isdigit() or int(flag) < 1):
        raise PlanError(f"--nproc-per-node {flag!r}: use auto or a number >= 1")
    return flag
