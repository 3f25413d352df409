"""The interface check (health/netif.py) over recorded `ip -o` outputs in the probe's format: a
docker host whose route or --env picks a decoy fails with the --env that pins the real one, a
healthy node passes, and the choice is the one launch/plan.py makes for the run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ddpfleet.gpu import MARK
from ddpfleet.health import facts, netif, probe, table
from ddpfleet.health.check import FAIL, PASS, WARN
from ddpfleet.launch.config import run_order
from ddpfleet.launch.plan import NodeFacts as LaunchFacts
from ddpfleet.launch.plan import socket_ifname

# `ip -o -4 addr show` and `ip -o link show` of a GPU node running docker (one container).
ADDR = """\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
2: eth0    inet {ip}/24 brd 10.0.0.255 scope global eth0\\       valid_lft forever preferred_lft forever
3: docker0    inet 172.17.0.1/16 brd 172.17.255.255 scope global docker0\\       valid_lft forever preferred_lft forever
5: br-5f2c1a    inet 172.18.0.1/16 brd 172.18.255.255 scope global br-5f2c1a\\       valid_lft forever preferred_lft forever"""
LINK = """\
1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT group default qlen 1000\\    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00
2: eth0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc mq state UP mode DEFAULT group default qlen 1000\\    link/ether 0c:42:a1:3e:9b:10 brd ff:ff:ff:ff:ff:ff
3: docker0: <NO-CARRIER,BROADCAST,MULTICAST,UP> mtu 1500 qdisc noqueue state DOWN mode DEFAULT group default\\    link/ether 02:42:9c:1d:77:e0 brd ff:ff:ff:ff:ff:ff
4: veth3c1d2e1@if4: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue master br-5f2c1a state UP mode DEFAULT group default\\    link/ether 9e:11:0a:54:c2:7f brd ff:ff:ff:ff:ff:ff link-netnsid 0
5: br-5f2c1a: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP mode DEFAULT group default\\    link/ether 02:42:51:aa:0c:3d brd ff:ff:ff:ff:ff:ff"""  # noqa: E501
IPS = {"node0": "10.0.0.10", "node1": "10.0.0.11", "node2": "10.0.0.12"}
HOSTS = dict(IPS)


def output(node: str, route_dev: str = "eth0", master: str = "10.0.0.10", host_addr="127.0.1.1"):
    """What probe.script(python, master) prints on `node` (its net sections, then no GPU)."""
    ip = IPS[node]
    route = f"{master} dev {route_dev} src {ip} uid 0 \\    cache " if master != ip else ""
    if master == ip:
        route = f"local {ip} dev lo table local src {ip} uid 0 \\    cache <local> "
    return (
        f"{MARK} versions\n\n{MARK} net\nmaster {master}\nhostname {node} {host_addr}\n"
        f"{MARK} net-route\n{route}\n{MARK} net-addr\n{ADDR.format(ip=ip)}\n"
        f"{MARK} net-link\n{LINK}\n{MARK} absent\n"
    )


def nets(**route_devs) -> dict[str, netif.NetFacts]:
    return {n: facts.parse(output(n, route_devs.get(n, "eth0"))).net for n in IPS}


def rows(nets_: dict, env=None, order=("node0", "node1", "node2"), hosts=HOSTS):
    return netif.rows(list(order), hosts, nets_, env)


def test_the_probe_output_is_read():
    net = nets()["node1"]
    assert net.master_addr == "10.0.0.10" and net.route_dev == "eth0"
    assert net.addrs == {
        "lo": ("127.0.0.1",),
        "eth0": ("10.0.0.11",),
        "docker0": ("172.17.0.1",),
        "br-5f2c1a": ("172.18.0.1",),
    }
    assert net.up == {"lo": True, "eth0": True, "docker0": False, "veth3c1d2e1": True,
                      "br-5f2c1a": True}  # fmt: skip
    assert (net.hostname, net.hostname_addr) == ("node1", "127.0.1.1")
    assert facts.parse(output("node0")).net.route_dev == "lo"  # the master's own address


def test_the_probe_asks_only_when_given_the_master():
    assert f"{MARK} net" not in probe.script("/usr/bin/python3")
    assert "ip -o route get" in probe.script("/usr/bin/python3", "10.0.0.10")


def test_a_healthy_docker_host_passes_on_its_real_interface():
    got = rows(nets())
    assert {n: c.verdict for n, c in got.items()} == dict.fromkeys(IPS, PASS)
    assert got["node1"].value == "eth0 10.0.0.11 (NCCL and gloo, as train sets them)"
    assert got["node0"].value == "eth0 10.0.0.10 (NCCL and gloo, as train sets them)"


def test_a_route_to_the_master_through_docker0_fails_with_the_pin():
    got = rows(nets(node2="docker0"))
    assert (got["node2"].verdict, got["node1"].verdict) == (FAIL, PASS)
    assert got["node2"].value == (
        "NCCL and gloo would use docker0, which no other node reaches by (as train sets them)"
    )
    assert "overlaps the cluster's" in got["node2"].fix
    assert got["node2"].fix.endswith("--env NCCL_SOCKET_IFNAME==eth0 --env GLOO_SOCKET_IFNAME=eth0")


@pytest.mark.parametrize(
    ("env", "value"),
    [
        (
            {"NCCL_SOCKET_IFNAME": "docker"},
            "NCCL would use docker0, which no other node reaches by",
        ),
        ({"NCCL_SOCKET_IFNAME": "^eth,lo"}, "NCCL would use docker0"),  # exclusion leaves decoys
        ({"NCCL_SOCKET_IFNAME": "=eth1"}, "NCCL finds no interface"),
        ({"NCCL_SOCKET_IFNAME": "eth9"}, "NCCL finds no interface"),
        ({"GLOO_SOCKET_IFNAME": "lo"}, "gloo would use lo, which no other node reaches by"),
        ({"GLOO_SOCKET_IFNAME": "eth1"}, "gloo eth1: no such interface with an IPv4 address"),
    ],
)
def test_a_run_env_that_picks_a_decoy_or_nothing_fails(env, value):
    got = rows(nets(), env=env)
    assert {c.verdict for c in got.values()} == {FAIL}
    assert got["node1"].value.startswith(value), got["node1"].value
    assert "--env NCCL_SOCKET_IFNAME==eth0" in got["node1"].fix


def test_a_run_env_naming_the_real_interface_passes():
    got = rows(nets(), env={"NCCL_SOCKET_IFNAME": "eth", "GLOO_SOCKET_IFNAME": "eth0"})
    assert {c.verdict for c in got.values()} == {PASS}
    assert got["node1"].value == (
        "NCCL eth0 10.0.0.11 (--env NCCL_SOCKET_IFNAME=eth); gloo eth0 (--env GLOO_SOCKET_IFNAME=eth0)"
    )


def test_where_the_run_sets_nothing_the_libraries_own_picks_are_judged():
    """The master's inventory host is a public address no interface holds (cloud NAT): NCCL
    takes the first interface not docker*/lo (here br-..., a decoy first in line), gloo the
    hostname's 127.0.1.1 (loopback)."""
    n = nets()
    n["node0"] = netif.NetFacts(**{**n["node0"].__dict__, "addrs": {
        "lo": ("127.0.0.1",), "br-5f2c1a": ("172.18.0.1",), "eth0": ("10.0.0.10",)}})  # fmt: skip
    got = rows(n, hosts={**HOSTS, "node0": "203.0.113.7"})
    assert got["node0"].verdict == FAIL
    assert got["node0"].value == (
        "NCCL would use br-5f2c1a, which no other node reaches by (NCCL's own pick: the run "
        "sets none); gloo would use lo, which no other node reaches by (gloo's own pick: "
        "hostname node0 is 127.0.1.1)"
    )


def test_a_single_node_or_a_loopback_master_may_use_anything():
    one = rows(nets(), order=("node1",), env={"NCCL_SOCKET_IFNAME": "lo"})
    assert one["node1"].verdict == PASS
    local = {
        n: netif.NetFacts(**{**f.__dict__, "master_addr": "127.0.0.1"}) for n, f in nets().items()
    }
    assert {c.verdict for c in rows(local, hosts=dict.fromkeys(IPS, "127.0.0.1")).values()} == {
        PASS
    }


def test_an_unresolvable_master_host_and_a_node_without_ip_are_named():
    n = nets()
    n["node1"] = netif.NetFacts(**{**n["node1"].__dict__, "master_addr": None})
    n["node2"] = netif.NetFacts(error="ip (iproute2) not found")
    got = rows(n, hosts={**HOSTS, "node0": "gpu-a.example"})
    assert (got["node1"].verdict, got["node1"].value) == (FAIL, "cannot resolve the master's host")
    assert (got["node2"].verdict, got["node2"].fix) == (WARN, "install iproute2")


@pytest.mark.parametrize("route_dev", ["eth0", "docker0", "lo", None])
def test_the_choice_is_the_one_train_makes(route_dev):
    for node in IPS:
        net = netif.NetFacts(master_addr="10.0.0.10", route_dev=route_dev,
                             addrs=nets()[node].addrs)  # fmt: skip
        launch = LaunchFacts(python="p", home="/root", ssh_host=IPS[node], addrs=net.addrs,
                                master_resolved="10.0.0.10", route_dev=route_dev)  # fmt: skip
        is_master = node == "node0"
        assert netif.run_choice(is_master, "10.0.0.10", net) == socket_ifname(
            is_master, "10.0.0.10", launch
        )


@pytest.mark.parametrize("master", ["node0", "node2", "gone"])
def test_the_master_is_the_one_train_ranks_first(master):
    inventory = SimpleNamespace(
        cluster=SimpleNamespace(master=master), nodes=[SimpleNamespace(name=n) for n in IPS]
    )
    assert table.master_first(inventory, list(IPS)) == list(run_order(inventory, ()))
