"""The inventory as frozen dataclasses: what inventory.load returns and everything below reads.

Built and validated once, at the edge (ddpfleet.inventory); nothing here reads a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ddpfleet import launchers
from ddpfleet.errors import InventoryError
from ddpfleet.inventory_yaml import did_you_mean


@dataclass(frozen=True)
class Node:
    name: str
    host: str
    port: int
    user: str
    key: Path | None
    known_hosts: Path
    connect_timeout: float
    gpus: int | None = None
    vars: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    command_timeout: float = 20.0
    become: str = "auto"
    become_password_file: Path | None = None

    @property
    def address(self) -> str:
        return self.host if self.port == 22 else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Cluster:
    name: str
    master: str
    master_port: int


@dataclass(frozen=True)
class SandboxSettings:
    prefix: str
    subnet: str
    state_dir: Path
    sudo: str = "nopasswd"  # the login user's sudo when it is not root: nopasswd|password|none
    init: str = "sandbox"  # the nodes' PID 1: sandbox (ddpfleet/sandbox/node_init.py) or systemd


@dataclass(frozen=True)
class Inventory:
    path: Path
    cluster: Cluster
    nodes: tuple[Node, ...]
    forks: int
    sections: Mapping[str, Mapping[str, Any]]  # role sections, raw but read-only
    sandbox: SandboxSettings | None
    lines: Mapping[tuple[str, ...], int] = field(repr=False, compare=False, default=None)
    persist: int = 60  # ssh.persist: the connection keeper's idle timeout (kept.py)
    launcher: str = launchers.DEFAULT  # train.launcher
    # Every node the file declares, whatever --nodes selected (secretfiles: the keys of all of
    # them stay home); () when built by hand: then `nodes`.
    declared: tuple[Node, ...] = field(default=(), repr=False, compare=False)
    health: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    spares: tuple[str, ...] = ()  # spares: nodes standing by for detached runs (train --spares)

    @property
    def root(self) -> Path:
        return self.path.parent

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise InventoryError(f"{self.path.name}: unknown node {name!r}; known: {self.names()}")

    def names(self) -> str:
        return ", ".join(n.name for n in self.nodes)

    def where(self, *keys: str) -> str:
        """'inventory.yaml:12' for a key path, for messages that point at the file."""
        line = (self.lines or {}).get(tuple(keys))
        return f"{self.path.name}:{line}" if line else self.path.name

    def section(self, name: str) -> Mapping[str, Any]:
        return self.sections.get(name, MappingProxyType({}))

    def select(self, names: str | None) -> Inventory:
        """The inventory restricted to --nodes a,b (in that order); None or '' means all."""
        if not names:
            return self
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        known = {n.name: n for n in self.nodes}
        for name in wanted:
            if name not in known:
                hint = did_you_mean(name, known)
                raise InventoryError(
                    f"--nodes: unknown node {name!r}{hint} (known nodes in {self.path.name}: "
                    f"{self.names()})"
                )
        if len(set(wanted)) != len(wanted):
            raise InventoryError(f"--nodes: a node is named twice in {names!r}")
        return replace(self, nodes=tuple(known[n] for n in wanted))
