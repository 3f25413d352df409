"""The interface NCCL and gloo would use on each node: one `interface` row per node. Pure.

`invoke train` sets both variables itself (launch/plan.py socket_ifname): on the master the
interface holding the master's address, on a worker the one its route to the master leaves
by; an --env NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME given to the run wins. Where the run sets
nothing (no interface holds the master's address: a NAT'd public IP; the route is loopback),
each library picks on its own:

    NCCL   the first interface with an address whose name starts "ib", else the first one not
           starting "docker" or "lo" (a veth or a bridge is fair game): its own default list
    gloo   the interface holding the address the node's hostname resolves to (127.0.1.1 from
           Debian's /etc/hosts: loopback, which no other node can reach)

With more than one node, a pick that is loopback, a container bridge or a veth (DECOYS), that
is down, or that names no interface at all fails, with the --env that pins the real one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ddpfleet.health.check import FAIL, PASS, WARN, Check

# Names no other node can reach through: loopback, docker's bridges (docker0, br-<id>), the
# veth ends of containers, libvirt's and CNI's bridges.
DECOYS = ("lo", "docker", "veth", "br-", "virbr", "cni", "flannel", "cali")
NCCL_DEFAULT = ("ib", "^docker,lo")  # NCCL's own order when NCCL_SOCKET_IFNAME is unset


@dataclass(frozen=True)
class NetFacts:
    master_addr: str | None = None  # the master's host as this node resolves it
    hostname: str = ""
    hostname_addr: str | None = None  # gloo's own pick goes by this
    route_dev: str | None = None  # `ip route get <master_addr>`'s dev
    addrs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # IPv4s, in ip's order
    up: dict[str, bool] = field(default_factory=dict)  # state UP (lo: UNKNOWN counts as up)
    error: str = ""  # why nothing could be read (no `ip`)


def parse(sections: Mapping) -> NetFacts | None:
    """The probe's net, net-route, net-addr and net-link sections (facts.split) -> NetFacts."""
    head = sections.get("net")
    if head is None:
        return None
    said = dict((line.split(" ", 1) + [""])[:2] for line in head.out)
    if "noip" in said:
        return NetFacts(error="ip (iproute2) not found")
    host, _, host_addr = said.get("hostname", "").partition(" ")
    route = " ".join(getattr(sections.get("net-route"), "out", [])).split()
    addrs: dict[str, tuple[str, ...]] = {}
    for line in getattr(sections.get("net-addr"), "out", []):  # 2: eth0    inet 10.0.0.5/24 ...
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "inet":
            name = parts[1].split("@")[0]
            addrs[name] = (*addrs.get(name, ()), parts[3].split("/")[0])
    up = {}
    for line in getattr(sections.get("net-link"), "out", []):  # 2: eth0@if5: <..,UP> .. state UP
        parts = line.split()
        if len(parts) >= 3 and parts[1].endswith(":"):
            state = parts[parts.index("state") + 1] if "state" in parts else "UNKNOWN"
            flags = parts[2].strip("<>").split(",")
            up[parts[1][:-1].split("@")[0]] = state == "UP" or (
                state == "UNKNOWN" and "UP" in flags
            )
    return NetFacts(
        master_addr=said.get("master") or None,
        hostname=host,
        hostname_addr=host_addr or None,
        route_dev=route[route.index("dev") + 1] if "dev" in route[:-1] else None,
        addrs=addrs,
        up=up,
    )


def _loopback(addr: str | None) -> bool:
    """None too: gloo binds loopback where the hostname does not resolve."""
    try:
        return addr is None or ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def decoy(name: str) -> bool:
    return name.startswith(DECOYS)


def nccl_pick(spec: str, addrs: Mapping[str, Sequence[str]]) -> list[str]:
    """The interfaces NCCL_SOCKET_IFNAME=spec selects, as NCCL reads it: a comma list of name
    prefixes; a leading ^ excludes them instead, a leading = wants exact names."""
    exclude = spec.startswith("^")
    spec = spec[1:] if exclude else spec
    exact = spec.startswith("=")
    names = [s for s in (spec[1:] if exact else spec).split(",") if s]

    def hit(iface: str) -> bool:
        return any(iface == n if exact else iface.startswith(n) for n in names)

    return [i for i, ips in addrs.items() if ips and hit(i) != exclude]


def run_choice(is_master: bool, master_addr: str | None, net: NetFacts) -> str | None:
    """What `invoke train` sets both variables to (launch.plan.socket_ifname, held equal by a
    test): the interface holding the master's address, or the worker's route to it."""
    if is_master:
        return next((i for i, ips in net.addrs.items() if master_addr in ips), None)
    return net.route_dev if net.route_dev and net.route_dev != "lo" else None


def master_address(order: Sequence[str], hosts: Mapping[str, str], nets) -> str | None:
    """As launch.plan.master_address: the master's host if an IP, else a worker's resolution."""
    host = hosts[order[0]]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    for name in (*order[1:], order[0]):
        net = nets.get(name)
        if net is not None and net.master_addr:
            return net.master_addr
    return None


def _picks(is_master, addr, net, env) -> tuple[list[str], str, list[str], str]:
    """(NCCL's interfaces, how, gloo's interfaces, how)."""
    choice = run_choice(is_master, addr, net)
    if env.get("NCCL_SOCKET_IFNAME"):
        how = f"--env NCCL_SOCKET_IFNAME={env['NCCL_SOCKET_IFNAME']}"
        nccl = nccl_pick(env["NCCL_SOCKET_IFNAME"], net.addrs)
    elif choice:
        nccl, how = [choice], "as train sets them"
    else:
        how = "NCCL's own pick: the run sets none"
        nccl = next((p for spec in NCCL_DEFAULT if (p := nccl_pick(spec, net.addrs))), [])
    if env.get("GLOO_SOCKET_IFNAME"):
        ghow = f"--env GLOO_SOCKET_IFNAME={env['GLOO_SOCKET_IFNAME']}"
        gloo = [n for n in env["GLOO_SOCKET_IFNAME"].split(",") if n]
    elif choice:
        gloo, ghow = [choice], "as train sets them"
    else:
        held = [i for i, ips in net.addrs.items() if net.hostname_addr in ips]
        if not held and _loopback(net.hostname_addr):  # torch falls back to loopback
            held = ["lo"]
        gloo = held
        ghow = f"gloo's own pick: hostname {net.hostname} is {net.hostname_addr or 'unresolved'}"
    return nccl[:1], how, gloo, ghow


def _real(net: NetFacts) -> str | None:
    """The interface to pin instead: the route to the master, else the first one not a decoy."""
    if net.route_dev and not decoy(net.route_dev) and net.up.get(net.route_dev, True):
        return net.route_dev
    return next((i for i, ips in net.addrs.items() if ips and not decoy(i) and net.up.get(i)), None)


def _fault(picked: list[str], how: str, net: NetFacts, alone: bool) -> str | None:
    """What is wrong with a library's pick (None: nothing), said after "NCCL" or "gloo"."""
    if not picked:
        return f"finds no interface ({how}; the node has {', '.join(net.addrs) or 'none'})"
    for iface in picked:
        if iface not in net.addrs:
            return f"{iface}: no such interface with an IPv4 address ({how})"
        if decoy(iface) and not alone:
            return f"would use {iface}, which no other node reaches by ({how})"
        if not net.up.get(iface, True):
            return f"{iface} is down ({how})"
    return None


def row(node: str, is_master: bool, addr: str | None, net: NetFacts, env, alone: bool) -> Check:
    if net.error:
        return Check(node, "interface", f"not checked: {net.error}", WARN, "install iproute2")
    if not is_master and addr and not net.master_addr and not alone:
        return Check(
            node,
            "interface",
            "cannot resolve the master's host",
            FAIL,
            "use the master's IP address as its inventory host, or fix DNS or /etc/hosts here",
        )
    nccl, how, gloo, ghow = _picks(is_master, addr, net, env)
    nccl_fault, gloo_fault = _fault(nccl, how, net, alone), _fault(gloo, ghow, net, alone)
    if nccl_fault == gloo_fault:
        faults = [f"NCCL and gloo {nccl_fault}"] if nccl_fault else []
    else:
        faults = [f"{lib} {f}" for lib, f in (("NCCL", nccl_fault), ("gloo", gloo_fault)) if f]
    real = _real(net)
    if faults:
        pin = (
            f"--env NCCL_SOCKET_IFNAME=={real} --env GLOO_SOCKET_IFNAME={real}"
            if real
            else "give the node an interface on the cluster's network"
        )
        why = ""
        if net.route_dev and decoy(net.route_dev) and not alone:
            why = f"the route to the master leaves by {net.route_dev}: its subnet overlaps the "
            why += "cluster's (move docker's bip in /etc/docker/daemon.json), or pin: "
        return Check(node, "interface", "; ".join(faults), FAIL, why + pin)
    ips = ", ".join(net.addrs.get(nccl[0], ()))
    value = f"{nccl[0]} {ips} (NCCL and gloo, {how})"
    if gloo != nccl or ghow != how:
        value = f"NCCL {nccl[0]} {ips} ({how}); gloo {','.join(gloo)} ({ghow})"
    if not is_master and net.route_dev and net.route_dev not in {*nccl, *gloo} and not alone:
        return Check(
            node,
            "interface",
            f"{value}; the route to the master leaves by {net.route_dev}",
            WARN,
            f"pin the interface the master is reached by: --env NCCL_SOCKET_IFNAME=={real}",
        )
    return Check(node, "interface", value, PASS)


def rows(
    order: Sequence[str],
    hosts: Mapping[str, str],
    nets: Mapping[str, NetFacts | None],
    env: Mapping[str, str] | None = None,
) -> dict[str, Check]:
    """{node: its interface row}; `order[0]` is the master (train's node_rank 0); nodes the
    probe read no net facts of (an older probe) have no row."""
    addr = master_address(order, hosts, nets)
    alone = len(order) < 2 or (
        addr is not None and _loopback(addr)
    )  # one machine: every interface reaches every rank
    return {
        node: row(node, node == order[0], addr, net, env or {}, alone)
        for node in order
        if (net := nets.get(node)) is not None
    }
