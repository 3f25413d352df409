"""A real multi-node cluster on one Linux box: per node a network namespace on a private
bridge, its own hostname and PID namespace, an overlay root over the host's `/`, and sshd.

    host                                   node `n` (netns {prefix}-n)
    {prefix}-br  10.x.0.1/24  ──veth──  eth0 10.x.0.(10+i)/24, lo; no default route
                                         PID 1: ddpfleet/sandbox/node_init.py (mount+uts+pid ns)
                                           └─ /usr/sbin/sshd -D -e   (key-only)

What lives where:
    /run/netns/{prefix}-{node}                  the named netns (`ip netns`)
    /var/lib/ddpfleet/sandbox/{prefix}/{node}/  upper/ work/ root/ of the node's overlay; the
                                                overlay itself is mounted inside the node's own
                                                mount namespace, so the host table never has it
    spec.state_dir/                             client key, hostkeys/<node>/ (kept by down),
                                                run/<node>.pid (host pid of the init), logs/

The package, by what a question is about:
    spec.py   SandboxSpec and the names of everything it makes; its checks; --count N
    host.py   host commands, Debian packages, client and host keys, known_hosts
    net.py    bridge, netns, veth
    nodes.py  a node's overlay files (/etc/hosts ...) and its init process
    systemd_init.py  init: systemd: PID 1 is real systemd in its own cgroup, host units masked
Only root on Linux can do this; everything else gets one SandboxError line.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterable, Sequence

from ddpfleet.errors import SandboxError  # a DdpfleetError: the tasks' one-line error path
from ddpfleet.sandbox import host, net, nodes
from ddpfleet.sandbox.host import PACKAGES
from ddpfleet.sandbox.nodes import INIT_SCRIPT
from ddpfleet.sandbox.spec import (
    BASE,
    NETNS_DIR,
    PATH,
    NodeStatus,
    SandboxNode,
    SandboxSpec,
    select,
    spec_for,
)

__all__ = [
    "BASE",
    "INIT_SCRIPT",
    "NETNS_DIR",
    "PACKAGES",
    "PATH",
    "NodeStatus",
    "SandboxError",
    "SandboxNode",
    "SandboxSpec",
    "down",
    "preflight",
    "render",
    "spec_for",
    "start",
    "status",
    "stop",
    "up",
]  # BASE, PATH ...: constants that tests and tools read here


def preflight() -> None:
    """Raise SandboxError unless this is Linux and we are root."""
    if sys.platform != "linux":
        raise SandboxError(
            f"sandbox needs Linux (network/PID/mount namespaces), not "
            f"{sys.platform}: run it on a Linux machine"
        )
    if os.geteuid() != 0:
        raise SandboxError("sandbox needs root on Linux: run as root (sudo invoke sandbox.up)")


def up(spec: SandboxSpec) -> list[NodeStatus]:
    """Create and start whatever is missing; running nodes are left alone. Idempotent."""
    preflight()
    host.ensure_packages()
    host.ensure_client_key(spec.client_key)
    host.parallel([lambda n=n: host.ensure_host_key(spec, n) for n in spec.nodes])
    _bring_up(spec, spec.nodes)
    host.write_known_hosts(spec)
    return status(spec)


def down(spec: SandboxSpec) -> None:
    """Remove exactly what up made (processes, netns, links, node dirs); keys stay."""
    preflight()
    names = sorted({n.name for n in spec.nodes} | set(nodes.node_dirs(spec)))
    host.parallel([lambda n=n: nodes.stop(spec, n) for n in names])
    net.remove(spec, names)
    # In parallel: unlinking is slow on a busy disk (ext4 with discard: ~50 ms a node here).
    host.parallel([lambda n=n: shutil.rmtree(spec.node_dir(n), ignore_errors=True) for n in names])
    shutil.rmtree(spec.base, ignore_errors=True)


def status(spec: SandboxSpec) -> list[NodeStatus]:
    """Each node: netns present, init pid (None: not running), sshd answering on port 22."""
    preflight()  # as anyone else, /proc/<init>/ns would read as "not running"

    def one(node: SandboxNode) -> NodeStatus:
        pid = nodes.init_pid(spec, node.name)
        return NodeStatus(
            node.name,
            node.address,
            net.netns_exists(spec, node.name),
            pid,
            pid is not None and nodes.ssh_answers(node.address, 1.0),
        )

    return host.parallel([lambda n=n: one(n) for n in spec.nodes])


def stop(spec: SandboxSpec, names: Iterable[str]) -> None:
    """Kill these nodes' inits (so every process in them); netns and files stay. Idempotent."""
    preflight()
    host.parallel([lambda n=n.name: nodes.stop(spec, n) for n in select(spec, names)])


def start(spec: SandboxSpec, names: Iterable[str]) -> None:
    """Start these nodes' inits again, on the files they had. Idempotent."""
    preflight()
    chosen = select(spec, names)
    host.ensure_client_key(spec.client_key)
    host.parallel([lambda n=n: host.ensure_host_key(spec, n) for n in chosen])
    _bring_up(spec, chosen)


def render(statuses: Sequence[NodeStatus]):
    """A table for people (rich)."""
    from rich.table import Table

    t = Table(title="sandbox", title_justify="left", header_style="bold")
    for col in ("node", "address", "netns", "init pid", "sshd"):
        t.add_column(col)
    for s in statuses:
        t.add_row(
            s.name,
            s.address,
            "yes" if s.netns_exists else "no",
            str(s.init_pid) if s.init_pid else "stopped",
            "listening" if s.sshd_listening else "down",
        )
    return t


def _bring_up(spec: SandboxSpec, chosen: Sequence[SandboxNode]) -> None:
    spec.base.mkdir(parents=True, exist_ok=True)
    net.ensure_bridge(spec)
    net.ensure_nets(spec, chosen)
    pids = {n.name: nodes.init_pid(spec, n.name) for n in spec.nodes}
    # Every node's /etc/hosts lists every node, so running ones are refreshed too.
    touched = [n for n in spec.nodes if n in chosen or pids[n.name] is not None]
    host.parallel([lambda n=n: nodes.prepare(spec, n, pids[n.name] is not None) for n in touched])
    procs = {n.name: nodes.launch(spec, n) for n in chosen if pids[n.name] is None}
    deadline = time.monotonic() + nodes.UP_TIMEOUT_S
    host.parallel(
        [lambda n=n: nodes.wait_ready(spec, n, procs.get(n.name), deadline) for n in chosen]
    )
