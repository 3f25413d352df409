"""The slurm role's files, pure: settings and every node's hardware in, file texts out.

slurm.conf, gres.conf and cgroup.conf are the same bytes on every node (slurmctld warns about a
node whose slurm.conf hash differs, and a node missing from one node's file cannot run its
steps). Every value that reaches them is checked here first, on the controller, so a bad
setting is one line naming the inventory key and no node is touched.

NodeHW is what each node reported in the survey (survey.PROBE):

    hostname=node0  cpus=2  memory_mb=24105  gpus=0  cgroup=tmpfs
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from ddpfleet.errors import InventoryError
from ddpfleet.inventory import Inventory
from ddpfleet.shell import sha256

TEMPLATES = Path(__file__).resolve().parent / "templates"
SLURM_CONF = "/etc/slurm/slurm.conf"
GRES_CONF = "/etc/slurm/gres.conf"
CGROUP_CONF = "/etc/slurm/cgroup.conf"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
OPTION_KEY = re.compile(r"[A-Z][A-Za-z0-9]*")
OPTION_VALUE = re.compile(r"[^\s#\\]+")  # one token: no line break, comment or continuation
# Lines the role writes itself: an option may not say them a second time, differently.
MANAGED = frozenset(
    {
        "ClusterName",
        "SlurmctldHost",
        "ControlMachine",
        "SlurmUser",
        "AuthType",
        "SlurmctldPort",
        "SlurmdPort",
        "StateSaveLocation",
        "SlurmdSpoolDir",
        "SlurmctldPidFile",
        "SlurmdPidFile",
        "SlurmctldLogFile",
        "SlurmdLogFile",
        "ProctrackType",
        "TaskPlugin",
        "GresTypes",
        "NodeName",
        "PartitionName",
        "Include",
    }
)
PLUGIN = re.compile(r"[a-z_]+/[a-z0-9_]+(,[a-z_]+/[a-z0-9_]+)*")
CGROUP_PLUGINS = ("autodetect", "cgroup/v1", "cgroup/v2")


@dataclass(frozen=True)
class NodeHW:
    name: str  # the inventory's name: NodeName, and slurmd -N
    hostname: str  # `hostname -s`: slurmctld accepts SlurmctldHost only under its own name
    address: str  # NodeAddr: how slurmctld and the other nodes reach it ("" = by its name)
    cpus: int
    memory_mb: int
    gpus: int
    cgroup: str  # the filesystem type of /sys/fs/cgroup: cgroup2fs, tmpfs, ""


@dataclass(frozen=True)
class Settings:
    cluster_name: str
    partition: str
    slurmctld_port: int
    slurmd_port: int
    munge_uid: int
    slurm_uid: int
    proctrack_type: str
    task_plugin: str
    cgroup_plugin: str
    options: tuple[tuple[str, str], ...]
    wait_s: int


def settings(cfg: Mapping[str, Any], inventory: Inventory) -> Settings:
    """The role's settings checked; a bad one raises InventoryError naming its line."""

    def bad(key: str, problem: str) -> InventoryError:
        return InventoryError(
            f"{inventory.where('slurm', key)}: slurm.{key}: {problem}; nothing was changed"
        )

    def integer(key: str, lo: int, hi: int) -> int:
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise bad(key, f"must be a whole number {lo}-{hi}, got {value!r}")
        return value

    def name(key: str, value: Any) -> str:
        if not isinstance(value, str) or not NAME.fullmatch(value):
            raise bad(key, f"{value!r} is not a name (letters, digits, '_', '.', '-')")
        return value

    def plugin(key: str) -> str:
        if not isinstance(cfg[key], str) or not PLUGIN.fullmatch(cfg[key]):
            raise bad(key, f"{cfg[key]!r} is not a plugin name like proctrack/linuxproc")
        return cfg[key]

    ports = integer("slurmctld_port", 1, 65535), integer("slurmd_port", 1, 65535)
    if ports[0] == ports[1]:
        raise bad("slurmd_port", f"is slurmctld_port too ({ports[0]}); give each its own port")
    if cfg["cgroup_plugin"] not in CGROUP_PLUGINS:
        raise bad("cgroup_plugin", f"{cfg['cgroup_plugin']!r} is not one of {CGROUP_PLUGINS}")
    return Settings(
        cluster_name=name("cluster_name", cfg["cluster_name"] or inventory.cluster.name),
        partition=name("partition", cfg["partition"]),
        slurmctld_port=ports[0],
        slurmd_port=ports[1],
        munge_uid=integer("munge_uid", 1, 65533),
        slurm_uid=integer("slurm_uid", 1, 65533),
        proctrack_type=plugin("proctrack_type"),
        task_plugin=plugin("task_plugin"),
        cgroup_plugin=cfg["cgroup_plugin"],
        options=_options(cfg["options"], bad),
        wait_s=integer("wait_s", 1, 3600),
    )


def _options(raw: Any, bad) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, Mapping):
        raise bad("options", "must be a mapping of slurm.conf keys to values")
    out = []
    for key, value in raw.items():
        if not isinstance(key, str) or not OPTION_KEY.fullmatch(key):
            raise bad("options", f"{key!r} is not a slurm.conf key (CamelCase, e.g. MaxJobCount)")
        if key in MANAGED:
            raise bad("options", f"{key} is written by the role itself; set it through its key")
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if not OPTION_VALUE.fullmatch(text):
            raise bad("options", f"{key}: {text!r} must be one word (no space, '#' or line break)")
        out.append((key, text))
    return tuple(out)


def node_addr(host: str) -> str:
    """The inventory's host when it is an address; a name may be an ~/.ssh/config alias that
    only the controller knows, so slurmctld resolves the node's own name instead."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return ""


def cgroup_plugin(s: Settings, master: NodeHW) -> str:
    if s.cgroup_plugin != "autodetect":
        return s.cgroup_plugin
    return "cgroup/v2" if master.cgroup == "cgroup2fs" else "cgroup/v1"


def _render(name: str, **values: Any) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template(name).render(**values)


def files(s: Settings, nodes: list[NodeHW], master: str) -> dict[str, str]:
    """path -> text of the three files, the same on every node."""
    head = next(n for n in nodes if n.name == master)
    return {
        SLURM_CONF: _render(
            "slurm.conf.j2", s=s, nodes=nodes, master=head, gres=any(n.gpus for n in nodes)
        ),
        GRES_CONF: _render("gres.conf.j2", nodes=nodes),
        CGROUP_CONF: _render("cgroup.conf.j2", plugin=cgroup_plugin(s, head)),
    }


def stamp(texts: Mapping[str, str]) -> str:
    """'<digest of every file> <digest of slurm.conf's node and port lines>': what a daemon
    that read these files has in its stamp (daemons.write_stamp)."""
    everything = sha256("".join(f"{p}\n{t}" for p, t in sorted(texts.items())))
    return f"{everything} {sha256(chr(10).join(node_lines(texts.get(SLURM_CONF))))}"


def node_lines(slurm_conf: str | None) -> list[str]:
    """The lines that say which nodes and partitions exist, and where the daemons listen: when
    these change slurmctld and slurmd must restart (22.05 does not add nodes on reconfigure);
    any other change is a reconfigure."""
    keys = ("NodeName=", "PartitionName=", "SlurmctldHost=", "SlurmctldPort=", "SlurmdPort=")
    return [ln for ln in (slurm_conf or "").splitlines() if ln.startswith(keys)]
