"""ddpfleet.engine.rootfiles on a real node: the private temp dir that carries a root file's content
(a munge key) to the node is gone afterwards when the root step fails, and when the connection
is lost before it (then only the node can remove it: sshd ends the session that holds it)."""

from __future__ import annotations

import time

import pytest

from ddpfleet import inventory as inv
from ddpfleet.engine import rootfiles
from ddpfleet.errors import CommandError, NodeError
from ddpfleet.ssh.connection import connect
from tests.integration.conftest import Cluster

KEY = b"not really a munge key\n" * 40


def _temp_dirs(cluster: Cluster) -> set[str]:
    r = cluster.ssh("node1", "ls -d /tmp/ddpfleet.* 2>/dev/null || true")
    assert r.returncode == 0, r.stderr
    return set(r.stdout.split())


def _left(cluster: Cluster, before: set[str], seconds: float = 10) -> set[str]:
    """The temp dirs made since `before` that are still there after up to `seconds`."""
    deadline = time.monotonic() + seconds
    while (new := _temp_dirs(cluster) - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    return new


def test_a_failed_root_step_leaves_no_temp_dir(cluster: Cluster):
    before = _temp_dirs(cluster)
    conn = connect(inv.load(cluster.inventory, "node1").nodes[0])
    try:
        with pytest.raises(CommandError):  # its mktemp fails: no such directory
            rootfiles.install(conn, "/nonexistent-ddpfleet/munge.key", KEY, 0o400)
    finally:
        conn.close()
    assert _left(cluster, before, seconds=0) == set()


def test_a_connection_lost_before_the_root_step_leaves_no_temp_dir(cluster: Cluster):
    before = _temp_dirs(cluster)
    conn = connect(inv.load(cluster.inventory, "node1").nodes[0])

    def send_then_lose(source: str) -> None:
        conn.put_bytes(KEY, source, 0o600)  # the key is on the node...
        conn.transport.close()  # ...and the connection goes before root installs it

    try:
        with pytest.raises(NodeError):
            rootfiles._install(conn, "/etc/ddpfleet-test.key", send_then_lose, 0o400, "root")
    finally:
        conn.close()
    assert _left(cluster, before) == set()
    assert cluster.ssh("node1", "test -e /etc/ddpfleet-test.key").returncode == 1
