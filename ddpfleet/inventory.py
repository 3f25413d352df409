"""Load and validate inventory.yaml into frozen dataclasses, once, at the edge.

Precedence, lowest first (the one place it is written down):
    role defaults.yaml  <  inventory top level (ssh:, python_env:, ...)  <  node entry  <  task flags

Every user mistake becomes one InventoryError line naming the file, the line, the key and the fix:

    inventory.yaml:7: nodes.node1.prot: unknown key; did you mean 'port'?
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from ddpfleet import launchers
from ddpfleet.errors import InventoryError
from ddpfleet.names import (
    cluster_name_problem,
    host_problem,
    node_name_problem,
    sandbox_prefix_problem,
    shown,
    subnet_problem,
    user_problem,
)

ENV_VAR = "DDPFLEET_INVENTORY"
DEFAULT_PATH = "inventory.yaml"

TOP_KEYS = (
    "cluster",
    "ssh",
    "python_env",
    "miniconda",
    "jupyter",
    "openssh_server",
    "slurm",
    "train",
    "train_user",
    "sandbox",
    "nodes",
)
CLUSTER_KEYS = ("name", "master", "master_port")
SSH_KEYS = (
    "user",
    "key",
    "port",
    "known_hosts",
    "connect_timeout",
    "command_timeout",
    "forks",
    "persist",
    "become",
    "become_password_file",
)
NODE_KEYS = ("host", "gpus", "vars") + tuple(k for k in SSH_KEYS if k not in ("forks", "persist"))
SANDBOX_KEYS = ("prefix", "subnet", "state_dir", "sudo", "init")
TRAIN_KEYS = ("launcher",)
# Sections whose keys belong to roles; the roles validate them against their defaults.yaml.
ROLE_SECTIONS = ("python_env", "miniconda", "jupyter", "openssh_server", "slurm", "train_user")

SSH_DEFAULTS = {
    "user": "root",
    "key": None,
    "port": 22,
    "known_hosts": ".ddpfleet/known_hosts",
    "connect_timeout": 10,
    "command_timeout": 20,  # quick commands (facts, probes, ping, lock): stopped after this
    "forks": 32,
    "persist": 60,  # seconds the connection keeper holds idle connections; 0: no keeper
    "become": "auto",  # auto: sudo when the login user is not root (ddpfleet.become)
    "become_password_file": None,
}


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
                hint = _did_you_mean(name, known)
                raise InventoryError(
                    f"--nodes: unknown node {name!r}{hint} (known nodes in {self.path.name}: "
                    f"{self.names()})"
                )
        if len(set(wanted)) != len(wanted):
            raise InventoryError(f"--nodes: a node is named twice in {names!r}")
        return replace(self, nodes=tuple(known[n] for n in wanted))


def resolve_path(path: str | os.PathLike | None) -> Path:
    """--inventory, else $DDPFLEET_INVENTORY, else ./inventory.yaml."""
    chosen = path or os.environ.get(ENV_VAR) or DEFAULT_PATH
    return Path(chosen).expanduser().absolute()


def load(
    path: str | os.PathLike | None = None, nodes: str | None = None, check_files: bool = True
) -> Inventory:
    """Read, validate and resolve an inventory; `nodes` is the --nodes flag.

    check_files=False skips the key-file check, for sandbox.up, which creates the key.
    """
    p = resolve_path(path)
    if not p.is_file():
        raise InventoryError(
            f"{p}: inventory not found; pass --inventory PATH or set ${ENV_VAR} "
            f"(invoke sandbox.up writes one for the local sandbox)"
        )
    data, lines = _read_yaml(p)
    return _Builder(p, data, lines, check_files).build().select(nodes)


# -- YAML with line numbers and duplicate-key detection ---------------------------------------


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in out:
            first = loader._ddp_lines[loader._ddp_path + (str(key),)]  # type: ignore[attr-defined]
            raise InventoryError(
                f"{loader._ddp_file}:{line}: duplicate key {key!r} (first at line {first}); "  # type: ignore[attr-defined]
                f"YAML would silently keep the last one: remove one of them"
            )
        loader._ddp_path += (str(key),)  # type: ignore[attr-defined]
        loader._ddp_lines[loader._ddp_path] = line  # type: ignore[attr-defined]
        out[key] = loader.construct_object(value_node, deep=True)
        loader._ddp_path = loader._ddp_path[:-1]  # type: ignore[attr-defined]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> tuple[dict, dict]:
    loader = _Loader(path.read_text())
    loader._ddp_file, loader._ddp_path, loader._ddp_lines = path.name, (), {}
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise InventoryError(
            f"{path.name}{line}: YAML syntax error: {e.problem or e.context}; fix the file"
        ) from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InventoryError(f"{path.name}:1: the inventory must be a mapping with a nodes: key")
    return data, loader._ddp_lines


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


# -- validation -------------------------------------------------------------------------------


class _Builder:
    def __init__(self, path: Path, data: dict, lines: dict, check_files: bool = True):
        self.path, self.data, self.lines, self.check_files = path, data, lines, check_files

    def fail(self, keys: tuple[str, ...], problem: str) -> InventoryError:
        line = None
        for i in range(len(keys), 0, -1):  # nearest ancestor that has a line
            line = self.lines.get(tuple(keys[:i]))
            if line:
                break
        where = f"{self.path.name}:{line}" if line else self.path.name
        return InventoryError(f"{where}: {'.'.join(shown(k) for k in keys)}: {problem}")

    def mapping(self, keys: tuple[str, ...], value: Any, allowed: tuple[str, ...]) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(keys, f"must be a mapping, got {type(value).__name__}")
        for k in value:
            if k not in allowed:
                raise self.fail(
                    keys + (str(k),),
                    f"unknown key{_did_you_mean(k, allowed)} (allowed: {', '.join(allowed)})",
                )
        return value

    def build(self) -> Inventory:
        top = self.mapping((), self.data, TOP_KEYS)
        ssh = {**SSH_DEFAULTS, **self.mapping(("ssh",), top.get("ssh"), SSH_KEYS)}
        forks = self.integer(("ssh", "forks"), ssh["forks"], 1, 1024)
        persist = self.integer(("ssh", "persist"), ssh["persist"], 0, 3600)
        raw_nodes = self.mapping(("nodes",), top.get("nodes"), tuple(top.get("nodes") or ()))
        if not raw_nodes:
            raise self.fail(
                ("nodes",), "no nodes defined; add e.g. nodes: {node0: {host: 10.0.0.10}}"
            )
        nodes = tuple(self.node(str(name), entry, ssh) for name, entry in raw_nodes.items())
        self.check_unique_hosts(nodes)
        cluster = self.cluster(top.get("cluster"), nodes)
        sections = {}
        for name in ROLE_SECTIONS:
            sections[name] = MappingProxyType(
                dict(self.mapping((name,), top.get(name), tuple(top.get(name) or ())))
            )
        return Inventory(
            path=self.path,
            cluster=cluster,
            nodes=nodes,
            forks=forks,
            sections=MappingProxyType(sections),
            sandbox=self.sandbox(top.get("sandbox")),
            lines=MappingProxyType(self.lines),
            persist=persist,
            launcher=self.launcher(top.get("train")),
            declared=nodes,
        )

    def launcher(self, raw: Any) -> str:
        t = self.mapping(("train",), raw, TRAIN_KEYS)
        launcher = t.get("launcher", launchers.DEFAULT)
        if launcher not in launchers.LAUNCHERS:
            raise self.fail(
                ("train", "launcher"),
                f"{launcher!r} is not a launcher; use one of {tuple(launchers.LAUNCHERS)}",
            )
        return launcher

    def integer(self, keys, value, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.fail(keys, f"must be an integer from {lo} to {hi}, got {value!r}")
        return value

    def text(self, keys, value) -> str:
        if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) == "":
            raise self.fail(keys, f"must be a non-empty string, got {value!r}")
        return str(value)

    def checked(self, keys, value, problem_of: Callable[[str], str]) -> str:
        """Text that must also pass a names check (it goes into paths and config files)."""
        value = self.text(keys, value)
        problem = problem_of(value)
        if problem:
            raise self.fail(keys, problem)
        return value

    def file_path(self, value: str) -> Path:
        p = Path(str(value)).expanduser()
        return p if p.is_absolute() else self.path.parent / p

    def node(self, name: str, entry: Any, ssh: dict) -> Node:
        keys = ("nodes", name)
        if problem := node_name_problem(name):
            raise self.fail(keys, problem)
        if isinstance(entry, str):  # "node0: 10.0.0.10" shorthand
            entry = {"host": entry}
        entry = self.mapping(keys, entry, NODE_KEYS)
        if "host" not in entry:
            raise self.fail(keys, "missing host: add host: <address or ~/.ssh/config alias>")
        merged = {**ssh, **entry}

        def origin(k: str) -> tuple[str, ...]:
            return keys + (k,) if k in entry else ("ssh", k)

        key = merged["key"]
        key_path = None
        if key is not None:
            key_path = self.file_path(self.text(origin("key"), key))
            if self.check_files and not key_path.is_file():
                raise self.fail(
                    origin("key"),
                    f"key file {key_path} not found; create it (ssh-keygen -t ed25519 -f "
                    f"{key_path}) or fix the path",
                )
        for k in ("connect_timeout", "command_timeout"):
            t = merged[k]
            if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
                raise self.fail(origin(k), f"must be seconds > 0, got {t!r}")
        if merged["become"] not in ("auto", "sudo", "none"):
            raise self.fail(
                origin("become"), f"must be auto, sudo or none, got {merged['become']!r}"
            )
        pw_file = merged["become_password_file"]
        if pw_file is not None:
            pw_file = self.file_path(self.text(origin("become_password_file"), pw_file))
        gpus = entry.get("gpus")
        if gpus is not None:
            gpus = self.integer(keys + ("gpus",), gpus, 0, 1024)
        node_vars = entry.get("vars") or {}
        if not isinstance(node_vars, dict):
            raise self.fail(keys + ("vars",), "must be a mapping")
        return Node(
            name=name,
            host=self.checked(keys + ("host",), entry["host"], host_problem),
            port=self.integer(origin("port"), merged["port"], 1, 65535),
            user=self.checked(origin("user"), merged["user"], user_problem),
            key=key_path,
            known_hosts=self.file_path(self.text(origin("known_hosts"), merged["known_hosts"])),
            connect_timeout=float(merged["connect_timeout"]),
            gpus=gpus,
            vars=MappingProxyType(dict(node_vars)),
            command_timeout=float(merged["command_timeout"]),
            become=merged["become"],
            become_password_file=pw_file,
        )

    def check_unique_hosts(self, nodes: tuple[Node, ...]) -> None:
        seen: dict[tuple[str, int], str] = {}
        for n in nodes:
            other = seen.setdefault((n.host, n.port), n.name)
            if other != n.name:
                raise self.fail(
                    ("nodes", n.name, "host"),
                    f"{n.address} is already node {other!r}; each node needs its own host",
                )

    def cluster(self, raw: Any, nodes: tuple[Node, ...]) -> Cluster:
        c = self.mapping(("cluster",), raw, CLUSTER_KEYS)
        names = [n.name for n in nodes]
        master = c.get("master", names[0])
        if master not in names:
            raise self.fail(
                ("cluster", "master"),
                f"{master!r} is not a node{_did_you_mean(master, names)}; nodes: {', '.join(names)}",
            )
        if "name" in c:
            name = self.checked(("cluster", "name"), c["name"], cluster_name_problem)
        else:  # the inventory's directory, made safe: the name goes into paths and key comments
            name = re.sub(r"[^A-Za-z0-9._-]+", "-", self.path.parent.name).strip(".-_")[:63]
        return Cluster(
            name=name or "cluster",
            master=str(master),
            master_port=self.integer(
                ("cluster", "master_port"), c.get("master_port", 29500), 1, 65535
            ),
        )

    def sandbox(self, raw: Any) -> SandboxSettings | None:
        if raw is None:
            return None
        s = self.mapping(("sandbox",), raw, SANDBOX_KEYS)
        subnet = self.checked(
            ("sandbox", "subnet"), s.get("subnet", "10.213.0.0/24"), subnet_problem
        )
        prefix = self.checked(
            ("sandbox", "prefix"), s.get("prefix", "ddpf"), sandbox_prefix_problem
        )
        sudo = s.get("sudo", "nopasswd")
        if sudo not in ("nopasswd", "password", "none"):
            raise self.fail(
                ("sandbox", "sudo"), f"must be nopasswd, password or none, got {sudo!r}"
            )
        init = s.get("init", "sandbox")
        if init not in ("sandbox", "systemd"):
            raise self.fail(("sandbox", "init"), f"must be sandbox or systemd, got {init!r}")
        return SandboxSettings(
            init=init,
            prefix=prefix,
            subnet=str(ipaddress.IPv4Network(subnet)),
            state_dir=self.file_path(s.get("state_dir", ".ddpfleet/sandbox")),
            sudo=sudo,
        )
