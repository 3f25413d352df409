"""The sandbox itself, against the real kernel: namespaces, bridge, overlay roots, sshd.

Uses its own prefix and subnet (claimed free, netclaim.py; DDPFLEET_SANDBOX_TEST_PREFIX / _SUBNET
pin them), so it never touches the project's sandbox or the integration session's. Other people's sandboxes may
come and go on the same box while this runs, so "the host is as it was" is checked on everything
that carries our prefix, plus a scan for any process still in one of our namespaces.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from ddpfleet import sandbox
from ddpfleet.sandbox import SandboxError, SandboxNode, SandboxSpec
from tests.integration.netclaim import claim

if "DDPFLEET_SANDBOX_TEST_PREFIX" in os.environ or "DDPFLEET_SANDBOX_TEST_SUBNET" in os.environ:
    PREFIX = os.environ.get("DDPFLEET_SANDBOX_TEST_PREFIX", "ddpt")
    SUBNET = os.environ.get("DDPFLEET_SANDBOX_TEST_SUBNET", "10.214.0.0/24")
else:  # ddpt on 10.214.0.0/24 unless another session on this kernel has it
    PREFIX, SUBNET = claim("ddpt", "10.214.0.0/24", span=1)
PROBE = f"/opt/{PREFIX}-probe"

needs_root = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0, reason="the sandbox needs root on Linux"
)


def host_view() -> dict[str, list[str]]:
    """Everything of ours the host could show: netns, links, mounts."""

    def ip(*args: str) -> str:
        return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout

    netns, links = ip("netns", "list"), ip("-o", "link")
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    return {
        "netns": sorted(ln.split()[0] for ln in netns.splitlines() if ln.startswith(f"{PREFIX}-")),
        "links": sorted(
            ln.split()[1] for ln in links.splitlines() if ln.split()[1].startswith(f"{PREFIX}-")
        ),
        "mounts": sorted(ln for ln in mounts if f"/{PREFIX}-" in ln or "ddpfleet" in ln),
    }


def processes_in(namespaces: set[str]) -> list[str]:
    """Every process whose netns or pid ns is one of `namespaces` ('net:[4026...]')."""
    found = []
    for proc in Path("/proc").iterdir():
        for kind in ("net", "pid", "pid_for_children"):
            try:
                if os.readlink(proc / "ns" / kind) in namespaces:
                    found.append(f"{proc.name} {(proc / 'comm').read_text().strip()}")
            except OSError:
                continue
    return found


def our_zombies() -> list[str]:
    out = subprocess.run(
        ["ps", "-o", "pid=,stat=,comm=", "--ppid", str(os.getpid())],
        check=False,
        capture_output=True,
        text=True,
    ).stdout
    return [ln for ln in out.splitlines() if ln.split()[1].startswith("Z")]


def answers(address: str, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(4) == b"SSH-"
    except OSError:
        return False


def ssh(
    spec: SandboxSpec, node: SandboxNode, command: str, *opts: str
) -> subprocess.CompletedProcess:
    """The system OpenSSH client, no user config, strict host keys from spec.known_hosts only."""
    return subprocess.run(
        [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(spec.client_key),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={spec.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=5",
            *opts,
            f"root@{node.address}",
            command,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> SandboxSpec:
    state = tmp_path_factory.mktemp("sandbox") / "state"
    net = ipaddress.IPv4Network(SUBNET)  # net[10]: a /26 need not start at .0
    nodes = (SandboxNode("node0", str(net[10])), SandboxNode("node1", str(net[11])))
    known = state.parent / "known_hosts"
    # A foreign line must survive; a stale line for node0's address must be replaced.
    known.write_text(f"example.org ssh-ed25519 AAAAforeign\n{nodes[0].address} ssh-rsa AAAAold\n")
    return SandboxSpec(PREFIX, SUBNET, nodes, state, state / "id_ed25519", known)


@pytest.fixture(scope="module")
def before(spec) -> dict[str, list[str]]:
    sandbox.down(spec)  # leftovers of an interrupted earlier run
    return host_view()


@pytest.fixture(scope="module")
def cluster(spec, before):
    statuses = sandbox.up(spec)
    # The init is PID 1 of the node's pid ns: its own ns/pid names it.
    namespaces = {
        os.readlink(f"/proc/{s.init_pid}/ns/{kind}") for s in statuses for kind in ("net", "pid")
    }
    yield SimpleNamespace(statuses=statuses, namespaces=namespaces)
    sandbox.down(spec)


@needs_root
def test_up_brings_every_node_up_without_touching_the_host_mounts(spec, cluster):
    assert [(s.name, s.netns_exists, s.sshd_listening) for s in cluster.statuses] == [
        ("node0", True, True),
        ("node1", True, True),
    ]
    assert all(s.init_pid for s in cluster.statuses)
    # The overlays live in the nodes' own mount namespaces only.
    assert not [ln for ln in host_view()["mounts"] if "overlay" in ln or "/var/lib" in ln]


@needs_root
def test_up_twice_is_harmless(spec, cluster):
    again = sandbox.up(spec)
    assert [s.init_pid for s in again] == [s.init_pid for s in cluster.statuses]
    assert all(s.sshd_listening for s in again)
    lines = spec.known_hosts.read_text().splitlines()
    assert lines[0] == "example.org ssh-ed25519 AAAAforeign"
    assert [ln.split()[:2] for ln in lines[1:]] == [[n.address, "ssh-ed25519"] for n in spec.nodes]


@needs_root
def test_real_ssh_with_strict_host_keys(spec, cluster):
    for node in spec.nodes:
        r = ssh(spec, node, "hostname; echo $PATH; cat /proc/1/comm; ls -A /var/lib/ddpfleet")
        assert r.returncode == 0, r.stderr
        hostname, path, init, *hidden = r.stdout.splitlines()
        assert hostname == node.name
        assert path == sandbox.PATH
        assert init == "python3"  # our init is PID 1 of the node
        assert hidden == []  # no node sees the upper dirs
    tty = ssh(spec, spec.nodes[0], "tty", "-tt")
    assert tty.stdout.startswith("/dev/pts/"), tty.stdout + tty.stderr


@needs_root
def test_nodes_reach_each_other(spec, cluster):
    node0, node1 = spec.nodes
    probe = (
        f"import socket; s = socket.create_connection(({node1.address!r}, 22), 3); "
        f"print(s.recv(4).decode())"
    )
    r = subprocess.run(
        ["nsenter", f"--net=/run/netns/{PREFIX}-node0", sys.executable, "-c", probe],
        check=False,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert r.stdout.strip() == "SSH-", r.stderr
    # ... and by name, from a login on node0 (its /etc/hosts lists every node).
    r = ssh(spec, node0, "exec 3<>/dev/tcp/node1/22 && head -c 4 <&3")
    assert r.stdout == "SSH-", r.stderr
    r = ssh(spec, node0, "ip route")
    assert "default" not in r.stdout  # no route out


@needs_root
def test_every_node_resolves_every_node_and_itself(spec, cluster):
    node0, node1 = spec.nodes
    # c10d's store looks up each client's IPv4-mapped address: with the host's DNS server out of
    # reach that was a "temporary failure" (a warning per rank), now it is plain "not found".
    mapped = f"import socket; print(socket.getnameinfo(('::ffff:{node0.address}', 0, 0, 0), 0)[0])"
    for node in spec.nodes:
        r = ssh(spec, node, f'getent hosts node0 node1 $(hostname); python3 -c "{mapped}"')
        assert r.returncode == 0, r.stderr
        *names, looked_up = r.stdout.splitlines()
        assert [ln.split() for ln in names] == [
            [node0.address, "node0"],
            [node1.address, "node1"],
            [node.address, node.name],
        ]
        assert looked_up == f"::ffff:{node0.address}"


@needs_root
def test_writes_stay_in_their_node(spec, cluster):
    node0, node1 = spec.nodes
    assert ssh(spec, node0, f"echo from-node0 > {PROBE}").returncode == 0
    assert ssh(spec, node0, f"cat {PROBE}").stdout == "from-node0\n"
    assert not Path(PROBE).exists()
    assert ssh(spec, node1, f"test ! -e {PROBE}").returncode == 0


@needs_root
def test_stop_kills_the_node_and_start_brings_it_back_with_its_files(spec, cluster):
    node0, node1 = spec.nodes
    assert ssh(spec, node1, f"echo kept > {PROBE}").returncode == 0
    # ... /var/lib/ddpfleet too (runs' records, checkpoints), as a real disk keeps it (issue 24)
    record = "/var/lib/ddpfleet/runs/r1/state.json"
    assert (
        ssh(spec, node1, f"mkdir -p {Path(record).parent} && echo '{{}}' > {record}").returncode
        == 0
    )
    sandbox.stop(spec, ["node1"])
    sandbox.stop(spec, ["node1"])  # idempotent
    assert not answers(node1.address)
    assert answers(node0.address)
    st = {s.name: s for s in sandbox.status(spec)}
    assert st["node1"].netns_exists and st["node1"].init_pid is None
    assert st["node0"].init_pid == cluster.statuses[0].init_pid
    sandbox.start(spec, ["node1"])
    sandbox.start(spec, ["node1"])  # idempotent
    assert answers(node1.address)
    r = ssh(spec, node1, f"cat {PROBE} {record}")
    assert r.stdout == "kept\n{}\n", r.stderr
    assert ssh(spec, node0, f"test ! -e {record}").returncode == 0  # each node its own
    assert not our_zombies()


@needs_root
def test_down_leaves_the_host_as_it_was(spec, cluster, before):
    key = spec.client_key.read_bytes()
    host_pub = (spec.state_dir / "hostkeys" / "node0" / "ssh_host_ed25519_key.pub").read_bytes()
    sandbox.down(spec)
    assert host_view() == before
    assert processes_in(cluster.namespaces) == []
    assert not our_zombies()
    assert not (sandbox.BASE / PREFIX).exists()
    sandbox.down(spec)  # idempotent
    # Keys stay, so the next up keeps known_hosts valid.
    assert spec.client_key.read_bytes() == key
    assert (
        spec.state_dir / "hostkeys" / "node0" / "ssh_host_ed25519_key.pub"
    ).read_bytes() == host_pub


def test_preflight_refuses_non_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SandboxError, match="needs root"):
        sandbox.preflight()


def test_spec_for_reads_the_inventory_or_writes_one_for_n_nodes(tmp_path):
    (tmp_path / "inventory.yaml").write_text(
        "ssh: {key: k}\nsandbox: {prefix: ddpf, subnet: 10.213.0.0/24}\n"
        "nodes:\n  node0: {host: 10.213.0.10}\n"
    )
    inv = SimpleNamespace(
        path=tmp_path / "inventory.yaml",
        root=tmp_path,
        sandbox=SimpleNamespace(prefix="ddpf", subnet="10.213.0.0/24", state_dir=tmp_path / "s"),
        nodes=[
            SimpleNamespace(
                name="node0",
                host="10.213.0.10",
                key=tmp_path / "k",
                known_hosts=tmp_path / "kh",
                user="root",  # the sandbox's login user is the inventory's
            )
        ],
    )
    spec, written = sandbox.spec_for(inv)
    assert written is None and spec.nodes == (SandboxNode("node0", "10.213.0.10"),)
    assert spec.client_key == tmp_path / "k" and spec.known_hosts == tmp_path / "kh"
    assert (spec.login_user, spec.sudo) == ("root", "nopasswd")
    spec, written = sandbox.spec_for(inv, 3)
    assert [n.address for n in spec.nodes] == ["10.213.0.10", "10.213.0.11", "10.213.0.12"]
    assert written == tmp_path / ".ddpfleet" / "inventory-3.yaml"
    data = yaml.safe_load(written.read_text())
    assert data["nodes"]["node2"] == {"host": "10.213.0.12"}
    assert data["ssh"]["key"] == str(tmp_path / "k")  # absolute: the file lives elsewhere
    inv.nodes[0].host = "10.9.9.9"
    with pytest.raises(SandboxError, match=r"must be an address in 10\.213\.0\.0/24"):
        sandbox.spec_for(inv)
