"""The sandbox's network: one bridge on the host, per node a netns joined to it by a veth pair.

    host {prefix}-br  10.x.0.1/24  ──{prefix}-{i}h ── veth ──  eth0 10.x.0.(10+i)/24 in
                                                               netns {prefix}-{node}

No default route and no NAT: a node reaches the subnet and nothing else.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path

from ddpfleet.errors import SandboxError
from ddpfleet.sandbox.host import ip, parallel, run, wait_for
from ddpfleet.sandbox.spec import NETNS_DIR, SandboxNode, SandboxSpec

NETNS_GONE_S = 3.0  # the kernel frees a deleted netns (and its veth) asynchronously


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def netns_exists(spec: SandboxSpec, name: str) -> bool:
    return (NETNS_DIR / spec.netns(name)).exists()


def _bridge_ports(spec: SandboxSpec) -> list[str]:
    if not link_exists(spec.bridge):
        return []
    return [p.name for p in Path("/sys/class/net", spec.bridge, "brif").iterdir()]


def ensure_bridge(spec: SandboxSpec) -> None:
    br, iface = spec.bridge, spec.host_iface
    for line in ip("-o", "-4", "addr", "show").splitlines():
        dev, addr = line.split()[1], ipaddress.IPv4Interface(line.split()[3])
        if dev != br and addr.network.overlaps(iface.network):
            raise SandboxError(
                f"sandbox subnet {iface.network} overlaps {addr} on {dev}: choose "
                f"another sandbox.subnet in the inventory"
            )
    if not link_exists(br):
        # nf_call_* 0: the host's iptables (docker's FORWARD DROP, say) never sees node traffic.
        ip(
            "link",
            "add",
            br,
            "type",
            "bridge",
            "nf_call_iptables",
            "0",
            "nf_call_ip6tables",
            "0",
            "nf_call_arptables",
            "0",
        )
    ip("addr", "replace", str(iface), "dev", br)
    ip("link", "set", br, "up")


def _net_ready(spec: SandboxSpec, index: int, name: str) -> bool:
    veth = Path("/sys/class/net", spec.veth(index))
    return netns_exists(spec, name) and (veth / "master").exists()


def _host_side(spec: SandboxSpec, index: int, node: SandboxNode) -> str:
    """`ip -batch` lines: the netns, a veth pair with eth0 inside it, the host end on the bridge."""
    ns, veth = spec.netns(node.name), spec.veth(index)
    return (
        f"netns add {ns}\nlink add {veth} type veth peer name eth0 netns {ns}\n"
        f"link set {veth} master {spec.bridge} up\n"
    )


def _configure_inside(spec: SandboxSpec, node: SandboxNode) -> None:
    iface = ipaddress.IPv4Interface(f"{node.address}/{spec.network.prefixlen}")
    # No default route: the node reaches the bridge's subnet and nothing else.
    ip(
        "-n",
        spec.netns(node.name),
        "-batch",
        "-",
        stdin=f"addr add {iface} dev eth0\nlink set eth0 up\nlink set lo up\n",
    )


def _remove_net(ns: str, veth: str) -> None:
    if link_exists(veth):
        ip("link", "del", veth, check=False)
    if (NETNS_DIR / ns).exists():
        ip("netns", "del", ns, check=False)


def _run_netns_mounted() -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(NETNS_DIR) for line in f)


def ensure_nets(spec: SandboxSpec, nodes: Sequence[SandboxNode]) -> None:
    """The netns and veth of each of these nodes, made where missing or half-made."""
    index = {n.name: i for i, n in enumerate(spec.nodes)}
    todo = [n for n in nodes if not _net_ready(spec, index[n.name], n.name)]
    if not todo:
        return
    # `ip netns add` bind-mounts /run/netns onto itself the first time: remember if that was us,
    # so down can undo it.
    made_mount = not _run_netns_mounted()
    for n in todo:  # leftovers of a half-made node
        _remove_net(spec.netns(n.name), spec.veth(index[n.name]))
    try:
        # Few processes, not 6 per node: spawning them is what costs when the box is busy.
        ip("-batch", "-", stdin="".join(_host_side(spec, index[n.name], n) for n in todo))
        parallel([lambda n=n: _configure_inside(spec, n) for n in todo])
    except SandboxError:
        for n in todo:
            _remove_net(spec.netns(n.name), spec.veth(index[n.name]))
        raise
    finally:
        if made_mount and _run_netns_mounted():
            (spec.base / ".made-run-netns").touch()


def remove(spec: SandboxSpec, names: Sequence[str]) -> None:
    """These nodes' netns and veths, then the bridge, then /run/netns if up mounted it."""
    gone = [spec.netns(n) for n in names if netns_exists(spec, n)]
    if gone:  # one batch: the kernel then frees all the namespaces (and veths) together
        ip("-batch", "-", stdin="".join(f"netns del {ns}\n" for ns in gone))
    wait_for(lambda: not _bridge_ports(spec), NETNS_GONE_S)
    for port in _bridge_ports(spec):  # a netns someone else still holds open
        ip("link", "del", port, check=False)
    if link_exists(spec.bridge):
        ip("link", "del", spec.bridge)
    _release_run_netns(spec)


def _release_run_netns(spec: SandboxSpec) -> None:
    marker = spec.base / ".made-run-netns"
    if marker.exists() and _run_netns_mounted() and not any(NETNS_DIR.iterdir()):
        run(["umount", str(NETNS_DIR)], check=False)
