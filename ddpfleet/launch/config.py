"""`invoke train`'s flags, checked before anything connects: run id, --env, code dir, order."""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ddpfleet.errors import PlanError
from ddpfleet.inventory import Inventory

DEFAULT_SCRIPT = "scripts/train_ddp.py"
DEFAULT_CODE_DIR = "~/ddpfleet/{cluster}/code"
DEFAULT_REMOTE_LOGS = "~/ddpfleet/{cluster}/runs"
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class TrainFlags:
    """`invoke train` flags, parsed; nodes in run order (node_rank = position)."""

    nodes: tuple[str, ...] = ()
    script: str = DEFAULT_SCRIPT
    args: tuple[str, ...] = ()
    nproc_per_node: str = "auto"
    master_port: int | None = None
    env: tuple[tuple[str, str], ...] = ()
    run_id: str = ""
    project_dir: Path = Path(".")
    code_dir: str = DEFAULT_CODE_DIR
    remote_logs: str = DEFAULT_REMOTE_LOGS


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


def check_code_dir(code_dir: str) -> str:
    try:
        code_dir.format(cluster="x")
    except (KeyError, IndexError, ValueError):
        code_dir = ""
    if not code_dir.strip():
        raise PlanError("--code-dir: give a path on the nodes, e.g. ~/ddpfleet/{cluster}/code "
                        "({cluster} is the only placeholder; write braces as {{ and }})")
    return code_dir


def check_run_id(run_id: str) -> str:
    if not RUN_ID_RE.match(run_id):
        raise PlanError(f"--run-id {run_id!r}: use 1-64 letters, digits, '.', '_' or '-' "
                        "(it names directories on every node)")
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
        raise PlanError(f"--nodes {','.join(nodes)}: {inventory.where('cluster', 'master')} makes "
                        f"{master} the master, but node_rank 0 (the first in --nodes) hosts "
                        f"torchrun's rendezvous: put {master} first")
    return tuple(nodes)


def check_nproc(flag: str) -> str:
    if flag != "auto" and (not flag.isdigit() or int(flag) < 1):
        raise PlanError(f"--nproc-per-node {flag!r}: use auto or a number >= 1")
    return flag
