"""The connection keeper (ssh.persist): warm connections reused, host keys still checked,
dead ones replaced, gone after its idle time, and nobody else's to use."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ddpfleet import inventory as inv
from ddpfleet.ssh import kept
from tests.integration.conftest import Cluster


def _inventory(cluster: Cluster, tmp_path: Path, persist: int = 30) -> Path:
    """The cluster's inventory with kept connections and a known_hosts of its own."""
    data = cluster.data
    known = tmp_path / "known_hosts"
    shutil.copy(data["ssh"]["known_hosts"], known)
    data["ssh"].update(persist=persist, known_hosts=str(known))
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _until(check, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _stats(sock: Path) -> dict:
    return kept.ask(sock, {"op": "stats"}, timeout=10)


def _warm(cluster: Cluster, inventory: Path) -> Path:
    """A first ping (direct connections) that leaves a keeper behind; its socket."""
    r = cluster.invoke("ping", inventory=inventory)
    assert r.returncode == 0, r.stdout + r.stderr
    sock = kept.socket_path(inv.load(inventory))
    assert sock is not None and _until(sock.exists, 10), "no keeper started by the first ping"
    return sock


@pytest.fixture
def warm(cluster: Cluster, tmp_path: Path):
    inventory = _inventory(cluster, tmp_path)
    sock = _warm(cluster, inventory)
    yield inventory, sock
    cluster.invoke("disconnect", inventory=inventory)


def test_later_commands_reuse_one_connection_per_node(cluster: Cluster, warm):
    inventory, sock = warm
    for task in ("ping", "gpu-status", "ping"):
        r = cluster.invoke(task, inventory=inventory)
        assert r.returncode == 0, task + r.stdout + r.stderr
        assert "node0" in r.stdout and "node1" in r.stdout
    stats = _stats(sock)
    assert stats["handshakes"] == 2, stats  # one per node for three commands
    assert stats["nodes"] == ["node0", "node1"]


def test_a_changed_host_key_is_refused_on_the_next_command(cluster: Cluster, warm, tmp_path: Path):
    inventory, sock = warm
    assert cluster.invoke("ping", inventory=inventory).returncode == 0  # node1 kept, checked
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")])
    impostor = " ".join((tmp_path / "k.pub").read_text().split()[:2])
    known = tmp_path / "known_hosts"
    addr1 = cluster.address("node1")
    lines = known.read_text().splitlines()
    known.write_text(
        "\n".join(f"{addr1} {impostor}" if ln.split()[0] == addr1 else ln for ln in lines) + "\n"
    )
    r = cluster.invoke("ping", inventory=inventory)
    assert r.returncode == 1
    assert "node1: HOST KEY CHANGED" in r.stderr and r.stderr.count("SHA256:") >= 2, r.stderr
    assert "Traceback" not in r.stderr
    rows = {ln.split()[1]: ln for ln in r.stdout.splitlines() if ln.startswith("│")}
    assert " yes " in rows["node0"]
    assert _stats(sock)["nodes"] == ["node0"]  # the refused node's connection is gone too


def test_a_restarted_node_is_reconnected_transparently(cluster: Cluster, warm):
    inventory, sock = warm
    assert cluster.invoke("sandbox.stop", "--nodes", "node1", timeout=120).returncode == 0
    try:
        r = cluster.invoke("ping", inventory=inventory)
        assert r.returncode == 1 and "node1: " in r.stderr, r.stderr
    finally:
        assert cluster.invoke("sandbox.start", "--nodes", "node1", timeout=300).returncode == 0
    r = cluster.invoke("ping", inventory=inventory)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _stats(sock)["nodes"] == ["node0", "node1"]


def test_the_keeper_exits_after_its_idle_time(cluster: Cluster, tmp_path: Path):
    inventory = _inventory(cluster, tmp_path, persist=2)
    sock = _warm(cluster, inventory)
    assert cluster.invoke("ping", inventory=inventory).returncode == 0
    pid = _stats(sock)["pid"]
    assert _until(lambda: not sock.exists(), 2 + 5), "the keeper outlived its idle time"
    assert _until(lambda: not Path(f"/proc/{pid}").exists(), 5)


def test_nobody_else_can_use_the_keeper(cluster: Cluster, warm):
    _, sock = warm
    assert os.stat(sock.parent).st_mode & 0o777 == 0o700
    assert os.stat(sock).st_mode & 0o777 == 0o600
    probe = f"import socket; socket.socket(socket.AF_UNIX).connect({str(sock)!r})"
    r = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            probe,
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "PermissionError" in r.stderr, r.stderr


def test_persist_zero_starts_no_keeper(cluster: Cluster, tmp_path: Path):
    inventory = _inventory(cluster, tmp_path, persist=0)
    assert cluster.invoke("ping", inventory=inventory).returncode == 0
    sock = kept.socket_path(inv.load(inventory))
    time.sleep(1)  # a keeper would have made its socket by now
    assert not sock.exists()
