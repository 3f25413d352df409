"""Load and validate inventory.yaml into frozen dataclasses, once, at the edge.

Precedence, lowest first (the one place it is written down):
    role defaults.yaml  <  inventory top level (ssh:, python_env:, ...)  <  node entry  <  task flags

Every user mistake becomes one InventoryError line naming the file, the line, the key and the fix:

    inventory.yaml:7: nodes.node1.prot: unknown key; did you mean 'port'?
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ddpfleet import catalog, inventory_yaml, launchers
from ddpfleet.errors import InventoryError
from ddpfleet.inventory_types import Cluster, Inventory, Node, SandboxSettings
from ddpfleet.inventory_yaml import did_you_mean
from ddpfleet.names import (
    cluster_name_problem,
    host_problem,
    node_name_problem,
    sandbox_prefix_problem,
    shown,
    subnet_problem,
    user_problem,
)

# Callers import the dataclasses from here (defined in inventory_types, read by everything).
__all__ = ["Cluster", "Inventory", "Node", "SandboxSettings", "load", "resolve_path"]

ENV_VAR = "DDPFLEET_INVENTORY"
DEFAULT_PATH = "inventory.yaml"

# The inventory's own top-level keys; beside them, each role's section (its SECTION: the
# roles are discovered, ddpfleet.catalog), whose keys the roles validate against defaults.yaml.
TOP_KEYS = ("cluster", "ssh", "train", "sandbox", "health", "spares", "nodes")
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
# invoke health's thresholds (ddpfleet.health): GPU temperature warn/fail, and --deep's floors:
# all_reduce bus bandwidth between nodes and inside one (GB/s), GEMM TFLOPS per GPU; each of
# them else a ratio of the median (busbw_ratio, node_busbw_ratio, gemm_ratio; 0.8).
HEALTH_KEYS = ("temp_warn_c", "temp_fail_c", "busbw_gbps", "busbw_ratio", "node_busbw_gbps",
               "node_busbw_ratio", "gemm_tflops", "gemm_ratio")  # fmt: skip

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


def resolve_path(path: str | os.PathLike | None) -> Path:
    """--inventory, else $DDPFLEET_INVENTORY, else ./inventory.yaml."""
    chosen = path or os.environ.get(ENV_VAR) or DEFAULT_PATH
    return Path(chosen).expanduser().absolute()


def load(
    path: str | os.PathLike | None = None,
    nodes: str | None = None,
    check_files: bool = True,
    roles_dir: Path = catalog.ROLES_DIR,
) -> Inventory:
    """Read, validate and resolve an inventory; `nodes` is the --nodes flag.

    check_files=False skips the key-file check, for sandbox.up, which creates the key.
    roles_dir: where the roles whose sections it accepts live.
    """
    p = resolve_path(path)
    if not p.is_file():
        raise InventoryError(
            f"{p}: inventory not found; pass --inventory PATH or set ${ENV_VAR} "
            f"(invoke sandbox.up writes one for the local sandbox)"
        )
    data, lines = inventory_yaml.read(p)
    role_sections = catalog.sections(roles_dir)
    for name in set(role_sections) & set(TOP_KEYS):
        raise InventoryError(
            f"a role's SECTION = {name!r} is a key of the inventory itself; rename the section"
        )
    return _Builder(p, data, lines, check_files, role_sections, roles_dir).build().select(nodes)


# -- validation -------------------------------------------------------------------------------


class _Builder:
    def __init__(
        self,
        path: Path,
        data: dict,
        lines: dict,
        check_files: bool = True,
        role_sections: tuple[str, ...] = (),
        roles_dir: Path = catalog.ROLES_DIR,
    ):
        self.path, self.data, self.lines, self.check_files = path, data, lines, check_files
        self.role_sections, self.roles_dir = role_sections, roles_dir

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
                    f"unknown key{did_you_mean(k, allowed)} (allowed: {', '.join(allowed)})",
                )
        return value

    def build(self) -> Inventory:
        top = self.mapping((), self.data, TOP_KEYS[:-1] + self.role_sections + TOP_KEYS[-1:])
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
        for name in self.role_sections:
            section = self.mapping((name,), top.get(name), tuple(top.get(name) or ()))
            for key, value in section.items():  # every setting checked here, once
                if problem := catalog.setting_problem(name, str(key), value, self.roles_dir):
                    raise self.fail((name, str(key)), problem)
            sections[name] = MappingProxyType(dict(section))
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
            health=self.health(top.get("health")),
            spares=self.spares(top.get("spares"), nodes),
        )

    def spares(self, raw: Any, nodes: tuple[Node, ...]) -> tuple[str, ...]:
        """spares: [node3, node4]: nodes of this file that stand by for detached runs."""
        if raw is None:
            return ()
        if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
            raise self.fail(("spares",), f"must be a list of node names, got {raw!r}")
        known = [n.name for n in nodes]
        for name in raw:
            if name not in known:
                raise self.fail(
                    ("spares",), f"unknown node {name!r}{did_you_mean(name, known)}; "
                    f"a spare is one of nodes: ({', '.join(known)})"
                )  # fmt: skip
        if len(set(raw)) != len(raw):
            raise self.fail(("spares",), "a node is named twice")
        if len(raw) == len(known):
            raise self.fail(("spares",), "every node is a spare: leave at least one to train")
        return tuple(raw)

    def health(self, raw: Any) -> Mapping[str, float]:
        h = self.mapping(("health",), raw, HEALTH_KEYS)
        for key, value in h.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise self.fail(("health", key), f"must be a number > 0, got {value!r}")
        for key in (k for k in h if k.endswith("_ratio") and h[k] >= 1):
            raise self.fail(("health", key), "must be below 1, e.g. 0.8")
        return MappingProxyType(dict(h))

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
        for var, value in node_vars.items():
            if problem := catalog.var_problem(str(var), value, self.roles_dir):
                raise self.fail(keys + ("vars", str(var)), problem)
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
                f"{master!r} is not a node{did_you_mean(master, names)}; nodes: {', '.join(names)}",
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
