"""What the slurm role needs from every node at once, gathered before any node changes.

slurm.conf lists every node with its CPUs, memory and GPUs, and each node writes the same file,
so one read-only probe runs on every node of the inventory first (bootstrap calls `survey`).
It also checks the settings (a bad one is one line, before any node is touched) and holds the
cluster's munge key: made once on the controller, in the project's .ddpfleet/ (0600), like the
SSH CA of openssh_server, and sent to each node whose key differs. It is never printed or logged.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ddpfleet import inventory as inv
from ddpfleet.engine.settings import Role
from ddpfleet.errors import DdpfleetError, InventoryError
from ddpfleet.facts import parse_facts
from ddpfleet.hygiene import state_dir
from ddpfleet.names import hostname_problem
from ddpfleet.shell import sha256

from .conf import NodeHW, Settings, files, node_addr, settings

PROBE = r"""
echo "hostname=$(hostname -s)"
echo "cpus=$(getconf _NPROCESSORS_ONLN)"
echo "memory_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)"
echo "gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')"
echo "cgroup=$(stat -fc %T /sys/fs/cgroup 2>/dev/null)"
"""
KEY_BYTES = 1024  # mungekey(8)'s default size
_key_lock = threading.Lock()  # the nodes' threads ask at once


class MungeKey:
    """The cluster's munge key: only reveal() gives the bytes, everything else says ***."""

    __slots__ = ("_data", "path")

    def __init__(self, path: Path, data: bytes | None):
        self.path, self._data = path, data

    @property
    def exists(self) -> bool:
        return self._data is not None

    @property
    def digest(self) -> str:
        return sha256(self._data) if self._data is not None else ""

    def reveal(self) -> bytes:
        if self._data is None:  # check mode before the first real run
            raise DdpfleetError(f"no munge key at {self.path} yet")
        return self._data

    def __repr__(self) -> str:
        return "MungeKey('***')"


@dataclass(frozen=True)
class Survey:
    settings: Settings
    master: str
    nodes: tuple[NodeHW, ...] = ()
    files: Mapping[str, str] = field(default_factory=dict)
    key: MungeKey | None = None
    problem: str = ""  # a node did not answer: every node's role fails with this, changes nothing


def munge_key(project: Path, create: bool) -> MungeKey:
    path = project / ".ddpfleet" / "slurm" / "munge.key"
    with _key_lock:
        if not path.is_file() and create:
            state_dir(path.parent, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(KEY_BYTES))
        data = path.read_bytes() if path.is_file() else None
    return MungeKey(path, data)


def survey(fleet, role: Role, check: bool) -> Survey | None:
    """Settings checked, every node probed, the key at hand; None when the role is off. Raises
    InventoryError for a bad setting or a run that leaves nodes out (slurm.conf would lose
    them)."""
    inventory = fleet.inventory
    master = inventory.cluster.master
    everyone = inv.load(inventory.path, check_files=False).nodes
    cfg = role.config(inventory, next(n for n in everyone if n.name == master))
    if not cfg["enabled"]:
        return None
    missing = [n.name for n in everyone if n.name not in {m.name for m in fleet.nodes}]
    if missing:
        raise InventoryError(
            f"slurm: slurm.conf lists every node, and this run leaves out {', '.join(missing)}: "
            "run bootstrap on all nodes (drop --nodes, or use --skip-roles slurm)"
        )
    s = settings(cfg, inventory)
    answers = fleet.map(lambda conn: parse_facts(conn.run(PROBE).stdout))
    hw, problems = [], []
    for node in fleet.nodes:
        got = answers[node.name]
        if isinstance(got, DdpfleetError):
            problems.append(f"{node.name} did not answer ({got})")
            continue
        try:
            hw.append(_node_hw(node, got))
        except ValueError:
            problems.append(f"{node.name} reported no CPU or memory count ({got})")
            continue
        if bad := hostname_problem(hw[-1].hostname):  # it goes into every node's slurm.conf
            problems.append(f"{node.name}: {bad}")
    if problems:
        return Survey(
            s,
            master,
            problem="slurm.conf needs every node: " + "; ".join(problems) + "; nothing was changed",
        )
    key = munge_key(inventory.root, create=not check)
    return Survey(s, master, tuple(hw), files(s, hw, master), key)


def _node_hw(node, facts: Mapping[str, str]) -> NodeHW:
    return NodeHW(
        name=node.name,
        hostname=facts.get("hostname") or node.name,
        address=node_addr(node.host),
        cpus=int(facts["cpus"]),
        memory_mb=int(facts["memory_mb"]),
        gpus=node.gpus if node.gpus is not None else int(facts.get("gpus") or 0),
        cgroup=facts.get("cgroup", ""),
    )
