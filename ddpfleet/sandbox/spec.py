"""What a sandbox is: its nodes, the names of everything it makes, and the checks it passes.

A SandboxSpec is checked once, when it is made (prefix, subnet, node names and addresses), so
the code that brings it up never checks again. The prefix and subnet rules are the inventory's
own (ddpfleet.names), so a sandbox: section and a spec built by hand fail the same way.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddpfleet.errors import SandboxError
from ddpfleet.hygiene import state_dir
from ddpfleet.names import sandbox_prefix_problem, subnet_problem, user_problem

BASE = Path("/var/lib/ddpfleet/sandbox")
NETNS_DIR = Path("/run/netns")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FIRST_HOST = 10  # nodes get .10, .11, ... when spec_for makes them


@dataclass(frozen=True)
class SandboxNode:
    name: str
    address: str


@dataclass(frozen=True)
class SandboxSpec:
    prefix: str
    subnet: str
    nodes: tuple[SandboxNode, ...]
    state_dir: Path
    client_key: Path
    known_hosts: Path
    # Where the settings came from, for messages: the inventory's file name, or "sandbox".
    origin: str = field(default="sandbox", compare=False, repr=False)
    # Who logs in: root (sshd permits root by key), or a cloud-style user (root refused) with
    # sudo nopasswd | password | none (sandbox/users.py).
    login_user: str = "root"
    sudo: str = "nopasswd"
    # The nodes' PID 1: sandbox (ddpfleet/sandbox/node_init.py) or systemd (sandbox/systemd_init.py).
    init: str = "sandbox"

    def __post_init__(self) -> None:
        check(self)

    # The names of what up makes; down removes exactly these.

    def netns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br"

    def veth(self, index: int) -> str:
        return f"{self.prefix}-{index}h"  # the "-" keeps prefix "ab1" index 0 apart from "ab" 10

    @property
    def permit_root_login(self) -> str:
        return "prohibit-password" if self.login_user == "root" else "no"

    @property
    def base(self) -> Path:
        return BASE / self.prefix

    def node_dir(self, name: str) -> Path:
        return self.base / name

    def pidfile(self, name: str) -> Path:
        return self.state_dir / "run" / f"{name}.pid"

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def host_iface(self) -> ipaddress.IPv4Interface:
        """The host's end of the bridge: the subnet's first address."""
        return ipaddress.IPv4Interface(f"{self.network[1]}/{self.network.prefixlen}")


@dataclass(frozen=True)
class NodeStatus:
    name: str
    address: str
    netns_exists: bool
    init_pid: int | None
    sshd_listening: bool

    @property
    def running(self) -> bool:
        return self.init_pid is not None


def check(spec: SandboxSpec) -> None:
    """Raise SandboxError, naming spec.origin and the fix, unless the spec can be made here."""
    where = spec.origin
    if problem := sandbox_prefix_problem(spec.prefix) or subnet_problem(spec.subnet):
        raise SandboxError(f"{where}: {problem}")
    if spec.sudo not in ("nopasswd", "password", "none"):
        raise SandboxError(f"{where}: sudo {spec.sudo!r}: use nopasswd, password or none")
    if spec.init not in ("sandbox", "systemd"):
        raise SandboxError(f"{where}: init {spec.init!r}: use sandbox or systemd")
    if problem := user_problem(spec.login_user):
        raise SandboxError(f"{where}: login user: {problem}")
    net = spec.network
    for node in spec.nodes:
        addr = ipaddress.IPv4Address(node.address) if _is_ipv4(node.address) else None
        if addr is None or addr not in net or addr in (net[0], net[1], net.broadcast_address):
            raise SandboxError(
                f"{where}: node {node.name} address {node.address!r} must be an "
                f"address in {net} other than {net[0]}, {net[1]} (the host) and "
                f"{net.broadcast_address}"
            )
        if not node.name.replace("-", "").isalnum() or len(node.name) > 48:
            raise SandboxError(
                f"{where}: node name {node.name!r} must be letters, digits and "
                f"'-' (it is the node's hostname)"
            )


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def select(spec: SandboxSpec, names: Iterable[str]) -> list[SandboxNode]:
    """The spec's nodes of these names, in the order given."""
    by_name = {n.name: n for n in spec.nodes}
    wanted = list(names)
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SandboxError(
            f"unknown sandbox node(s) {', '.join(unknown)}; known: {', '.join(by_name)}"
        )
    return [by_name[n] for n in wanted]


# -- inventories for --count N ---------------------------------------------------------------------


def spec_for(
    inventory: Any,
    count: int | None = None,
    login_user: str | None = None,
    sudo: str | None = None,
    init: str | None = None,
) -> tuple[SandboxSpec, Path | None]:
    """The spec an inventory describes (its sandbox: section and nodes, its ssh user as the
    login user), or `count` nodes node0..node{count-1} from .10, or another login user; then, if
    those differ from the inventory's, an inventory for them is written under
    <inventory dir>/.ddpfleet/ and its path returned too."""
    sb = inventory.sandbox
    if sb is None:
        raise SandboxError(
            f"{inventory.path.name}: no sandbox: section; add one (prefix, "
            f"subnet, state_dir) to use invoke sandbox.*"
        )
    first = inventory.nodes[0] if inventory.nodes else None
    state_dir = Path(sb.state_dir)
    key = Path(first.key) if first and first.key else state_dir / "id_ed25519"
    known = Path(first.known_hosts) if first else inventory.root / ".ddpfleet" / "known_hosts"
    listed = tuple(SandboxNode(n.name, n.host) for n in inventory.nodes)
    nodes = listed if count is None else numbered(sb.subnet, count)
    user = first.user if first else "root"
    spec = SandboxSpec(
        sb.prefix,
        sb.subnet,
        nodes,
        state_dir,
        key,
        known,
        origin=inventory.path.name,
        login_user=login_user or user,
        sudo=sudo or getattr(sb, "sudo", "nopasswd"),
        init=init or getattr(sb, "init", "sandbox"),
    )
    same = (
        nodes == listed and spec.login_user == user and spec.init == getattr(sb, "init", "sandbox")
    )
    written = None if same else _write_inventory(inventory, spec)
    return spec, written


def numbered(subnet: str, count: int) -> tuple[SandboxNode, ...]:
    """node0..node{count-1} at the subnet's .10, .11, ..."""
    net = ipaddress.IPv4Network(subnet)
    if count < 1 or FIRST_HOST + count >= net.num_addresses - 1:
        raise SandboxError(
            f"--count {count}: subnet {net} holds 1 to "
            f"{max(0, net.num_addresses - 2 - FIRST_HOST)} sandbox nodes"
        )
    return tuple(SandboxNode(f"node{i}", str(net[FIRST_HOST + i])) for i in range(count))


def _write_inventory(inventory: Any, spec: SandboxSpec) -> Path:
    """The inventory with spec's nodes, paths made absolute (it lives in another directory)."""
    import yaml

    data = yaml.safe_load(Path(inventory.path).read_text())
    data.setdefault("ssh", {}).update(
        key=str(spec.client_key), known_hosts=str(spec.known_hosts), user=spec.login_user
    )
    data["sandbox"] = {
        **(data.get("sandbox") or {}),
        "state_dir": str(spec.state_dir),
        "sudo": spec.sudo,
        "init": spec.init,
    }
    data["nodes"] = {n.name: {"host": n.address} for n in spec.nodes}
    tag = "" if spec.login_user == "root" else f"-{spec.login_user}"
    tag += "" if spec.init == "sandbox" else f"-{spec.init}"
    path = Path(inventory.root) / ".ddpfleet" / f"inventory-{len(spec.nodes)}{tag}.yaml"
    state_dir(path.parent)
    path.write_text(
        f"# written by invoke sandbox.up --count {len(spec.nodes)} from "
        f"{inventory.path}\n" + yaml.safe_dump(data, sort_keys=False)
    )
    return path
