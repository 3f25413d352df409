"""Node-to-node SSH (openssh_server.cluster_ssh) on the real sandbox nodes: real sshd, real
ssh-keygen, a real OpenSSH client on node0 logging in to node1 with its certificate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import Cluster
from tests.integration.test_roles_conda_ssh import changed

NODES = ("node0", "node1")
USER = "ddpfleet-peer"
KEY = "ddpfleet_cluster_ed25519"
SSH = "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=5"


def inventory(cluster: Cluster, name: str, nodes=NODES, **openssh_server) -> Path:
    data = cluster.data
    data["nodes"] = {n: data["nodes"][n] for n in nodes}
    data["openssh_server"] = openssh_server
    path = cluster.dir / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def bootstrap(cluster: Cluster, path: Path):
    result = cluster.invoke("bootstrap", "--roles", "openssh_server", inventory=path)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def as_user(cluster: Cluster, node: str, command: str):
    return cluster.ssh(node, f"runuser -u {USER} -- sh -c 'cd && {command}'")


@pytest.fixture(scope="module")
def on(cluster: Cluster):
    """node0 and node1 bootstrapped with node-to-node ssh on for USER; everything undone after."""
    for node in NODES:
        made = cluster.ssh(node, f"id {USER} >/dev/null 2>&1 || useradd -m -s /bin/sh {USER}")
        assert made.returncode == 0, made.stderr
    path = inventory(cluster, "inventory-peers.yaml", cluster_ssh=True, cluster_user=USER)
    first = bootstrap(cluster, path)
    yield path, first
    bootstrap(cluster, inventory(cluster, "inventory-peers-off.yaml"))


def test_the_user_reaches_the_other_node_by_name(cluster: Cluster, on):
    for src, dst in (("node0", "node1"), ("node1", "node0")):
        got = as_user(cluster, src, f"{SSH} {dst} hostname")
        assert got.returncode == 0, got.stderr
        assert got.stdout.strip() == dst
    # The client uses the hardened sshd's algorithms (openssh_server_kex_algorithms ...).
    config = cluster.ssh("node0", f"cat ~{USER}/.ssh/config").stdout
    assert "    KexAlgorithms sntrup761x25519-sha512" in config, config


def test_the_authorized_line_is_restricted_to_the_cluster(cluster: Cluster, on):
    line = cluster.ssh("node1", f"grep ddpfleet-ca@ ~{USER}/.ssh/authorized_keys").stdout.strip()
    addresses = ",".join(cluster.address(n) for n in NODES)
    assert line.startswith('cert-authority,principals="ddpfleet:node0:')
    assert f'from="{addresses}",restrict ' in line
    root_lines = cluster.ssh(
        "node1", "grep -c -e ddpfleet-ca@ -e ddpfleet-cluster@ ~root/.ssh/authorized_keys"
    )
    assert root_lines.stdout.strip() == "0"


def test_each_node_has_its_own_private_key(cluster: Cluster, on):
    sums = {n: cluster.ssh(n, f"sha256sum ~{USER}/.ssh/{KEY}").stdout.split()[0] for n in NODES}
    assert len(set(sums.values())) == 2
    for node in NODES:
        mode = cluster.ssh(node, f"stat -c '%a %U' ~{USER}/.ssh/{KEY}").stdout.strip()
        assert mode == f"600 {USER}"


def test_root_cannot_use_it(cluster: Cluster, on):
    assert cluster.ssh("node0", f"{SSH} node1 true").returncode != 0
    key = f"~{USER}/.ssh/{KEY}"
    assert cluster.ssh("node0", f"{SSH} -i {key} root@node1 true").returncode != 0
    assert cluster.ssh("node0", f"test -e ~root/.ssh/{KEY}").returncode == 1


def test_a_second_run_changes_nothing(cluster: Cluster, on):
    path, _ = on
    again = bootstrap(cluster, path)
    assert changed(again) == {"node0": 0, "node1": 0}


def test_a_node_removed_from_the_inventory_is_refused(cluster: Cluster, on):
    path, _ = on
    assert as_user(cluster, "node1", f"{SSH} node0 true").returncode == 0
    bootstrap(
        cluster,
        inventory(
            cluster,
            "inventory-peers-node0.yaml",
            nodes=("node0",),
            cluster_ssh=True,
            cluster_user=USER,
        ),
    )
    refused = as_user(cluster, "node1", f"{SSH} node0 true")
    assert refused.returncode == 255 and "Permission denied" in refused.stderr
    assert as_user(cluster, "node0", f"{SSH} node0 true").returncode == 0  # node0 itself still in
    bootstrap(cluster, path)  # node1 back for the tests after this one
    assert as_user(cluster, "node1", f"{SSH} node0 true").returncode == 0


def test_off_removes_it_and_the_shared_root_key_of_older_ddpfleet(cluster: Cluster, on):
    for node in NODES:  # what ddpfleet before per-node keys left on every node
        made = cluster.ssh(
            node,
            f"rm -f ~/.ssh/{KEY}* && ssh-keygen -q -t ed25519 -N '' "
            f"-C ddpfleet-cluster@old -f ~/.ssh/{KEY} && "
            f"cat ~/.ssh/{KEY}.pub >>~/.ssh/authorized_keys",
        )
        assert made.returncode == 0, made.stderr
    bootstrap(cluster, inventory(cluster, "inventory-peers-off.yaml"))
    for node in NODES:
        left = cluster.ssh(node, f"ls ~root/.ssh/{KEY}* ~{USER}/.ssh/{KEY}* 2>/dev/null")
        assert left.stdout == ""
        assert "ddpfleet-cluster@" not in cluster.ssh(node, "cat ~/.ssh/authorized_keys").stdout
        assert "ddpfleet" not in cluster.ssh(node, f"cat ~{USER}/.ssh/authorized_keys").stdout
        assert "BEGIN ddpfleet" not in cluster.ssh(node, "cat /etc/ssh/ssh_known_hosts").stdout
    assert as_user(cluster, "node0", f"{SSH} node1 true").returncode != 0
