"""The sandbox's pure parts: a spec's checks and names, and the name files every node gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from ddpfleet.names import sandbox_prefix_problem, subnet_problem
from ddpfleet.sandbox import SandboxError, SandboxNode, SandboxSpec
from ddpfleet.sandbox.nodes import hosts_file, nsswitch_file
from ddpfleet.sandbox.spec import numbered, select

NODES = (SandboxNode("node0", "10.213.0.10"), SandboxNode("node1", "10.213.0.11"))


def make(prefix: str = "ddpf", subnet: str = "10.213.0.0/24", nodes=NODES, **kw) -> SandboxSpec:
    return SandboxSpec(prefix, subnet, nodes, Path("s"), Path("s/id"), Path("kh"), **kw)


@pytest.mark.parametrize(
    "prefix, ok",
    [
        ("ddpf", True),
        ("a", True),
        ("abcd1234", True),
        ("", False),
        ("abcdefghi", False),
        ("a-b", False),
        ("ü1", False),
        ("a b", False),
    ],
)
def test_prefix_rule(prefix, ok):
    assert (sandbox_prefix_problem(prefix) == "") is ok


@pytest.mark.parametrize(
    "subnet, ok",
    [
        ("10.213.0.0/24", True),
        ("10.0.0.0/16", True),
        ("10.213.0.5/24", False),
        ("10.213.0.0/33", False),
        ("fd00::/64", False),
        ("net", False),
    ],
)
def test_subnet_rule(subnet, ok):
    assert (subnet_problem(subnet) == "") is ok


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"prefix": "too-long-prefix"}, r"^inventory.yaml: sandbox prefix too-long-prefix is not "),
        ({"subnet": "10.213.0.5/24"}, r"subnet '10.213.0.5/24' is not an IPv4 network"),
        (
            {"nodes": (SandboxNode("node0", "10.9.9.9"),)},
            r"node node0 address '10.9.9.9' must be an address in 10\.213\.0\.0/24 other than ",
        ),
        ({"nodes": (SandboxNode("node0", "10.213.0.1"),)}, r"10\.213\.0\.1 \(the host\)"),
        ({"nodes": (SandboxNode("node0", "node0.example"),)}, r"address 'node0.example' must be"),
        ({"nodes": (SandboxNode("gpu_0", "10.213.0.10"),)}, r"node name 'gpu_0' must be letters"),
    ],
)
def test_a_spec_is_checked_when_made(changes, message):
    with pytest.raises(SandboxError, match=message):
        make(**{"origin": "inventory.yaml", **changes})


def test_names_of_what_up_makes():
    spec = make()
    assert (spec.netns("node1"), spec.bridge, spec.veth(10)) == (
        "ddpf-node1",
        "ddpf-br",
        "ddpf-10h",
    )
    assert spec.node_dir("node1") == Path("/var/lib/ddpfleet/sandbox/ddpf/node1")
    assert spec.pidfile("node1") == Path("s/run/node1.pid")
    assert str(spec.host_iface) == "10.213.0.1/24"


def test_numbered_nodes_fit_the_subnet():
    assert numbered("10.213.0.0/24", 2) == NODES
    assert len(numbered("10.213.0.0/24", 244)) == 244
    for count in (0, 245):
        with pytest.raises(SandboxError, match=r"subnet 10\.213\.0\.0/24 holds 1 to 244"):
            numbered("10.213.0.0/24", count)


def test_select_names_the_unknown_and_the_known():
    assert select(make(), ["node1"]) == [NODES[1]]
    with pytest.raises(SandboxError, match=r"unknown sandbox node.s. node7; known: node0, node1"):
        select(make(), ["node7"])


def test_every_node_resolves_every_node_and_itself():
    lines = hosts_file(make()).splitlines()
    assert "10.213.0.10\tnode0" in lines and "10.213.0.11\tnode1" in lines
    assert lines[0] == "127.0.0.1\tlocalhost"


OURS = "# ddpfleet sandbox: no DNS server is reachable from a node\nhosts:          files\n"


@pytest.mark.parametrize(
    "host, expected",
    [
        (
            "passwd: files systemd\nhosts: files mdns4_minimal dns\nnetworks: files\n",
            f"passwd: files systemd\n{OURS}networks: files\n",
        ),
        (None, OURS),
        ("passwd: files\n", f"passwd: files\n{OURS}"),
    ],
)
def test_names_are_looked_up_in_etc_hosts_only(host, expected):
    # A DNS server no node can reach makes each unknown lookup a "temporary failure" (c10d's
    # "hostname of the client socket cannot be retrieved" warning) instead of "not found".
    assert nsswitch_file(host) == expected
    assert nsswitch_file(expected) == expected  # a node's own file, read back, stays as it is


def test_login_user_and_sudo_are_checked():
    assert make(login_user="ubuntu", sudo="password").sudo == "password"
    with pytest.raises(SandboxError, match="nopasswd, password or none"):
        make(login_user="ubuntu", sudo="sometimes")
    with pytest.raises(SandboxError, match="login user"):
        make(login_user="bad user")
