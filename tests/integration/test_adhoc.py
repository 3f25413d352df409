"""Ad-hoc commands on real sandbox nodes (issue 25 item 2): `run` on 8 nodes with one stopped,
--sudo and --as-train-user in the cloud shape (login ubuntu + sudo), `put`/`get` over SFTP, and
`ssh` through the system OpenSSH with the pinned host keys."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import PREFIX, Cluster, sandbox, second_subnet, write_inventory

NODES = [f"node{i}" for i in range(8)]


@pytest.fixture(scope="module")
def eight(tmp_path_factory) -> Iterator[Cluster]:
    """8 nodes in the cloud shape; the training user is `www-data` (no bootstrap needed)."""
    directory = tmp_path_factory.mktemp("adhoc")
    www = {"name": "www-data", "uid": 33, "gid": 33}
    path = write_inventory(
        directory, count=8, prefix=PREFIX + "a", subnet=second_subnet(), cloud=True, train_user=www
    )
    with sandbox(Cluster(directory, path), "--sudo", "nopasswd") as c:
        yield c


def groups(out: str) -> dict[str, list[str]]:
    """{'node[0-4,6-7] (7) exit 0': [lines], ...} from run's output."""
    found: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("-" * 16 + " "):
            current = line[17:]
            found[current] = []
        elif current is not None:
            found[current].append(line)
    return found


def test_run_folds_identical_output_and_names_a_stopped_node(eight: Cluster):
    r = eight.invoke("run", "uname -s; id -un")
    assert r.returncode == 0, r.stdout + r.stderr
    assert groups(r.stdout) == {"node[0-7] (8) exit 0": ["Linux", "ubuntu"]}

    stop = eight.invoke("sandbox.stop", "--nodes", "node5")
    assert stop.returncode == 0, stop.stderr
    try:
        r = eight.invoke("run", "uname -s")
        assert r.returncode == 1, r.stdout + r.stderr
        found = groups(r.stdout)
        assert found["node[0-4,6-7] (7) exit 0"] == ["Linux"], r.stdout
        (stopped,) = [k for k in found if k.startswith("node5 ")]
        assert stopped == "node5 unreachable" and "node5:" in found[stopped][0]
        assert r.stderr.strip().splitlines() == [
            "error: run failed on 1 of 8 node(s): node5 (unreachable)"
        ]
    finally:
        start = eight.invoke("sandbox.start", "--nodes", "node5")
        assert start.returncode == 0, start.stderr


def test_run_exit_codes_per_node_and_exclude(eight: Cluster):
    r = eight.invoke("run", "--exclude", "node0,node3,node4,node5,node6,node7", "touch /tmp/f")
    assert r.returncode == 0, r.stdout + r.stderr
    assert list(groups(r.stdout)) == ["node[1-2] (2) exit 0"]
    r = eight.invoke("run", "test -e /tmp/f && echo yes || { echo no >&2; exit 4; }")
    assert r.returncode == 1
    found = groups(r.stdout)
    assert found == {"node[1-2] (2) exit 0": ["yes"], "node[0,3-7] (6) exit 4": ["no"]}
    assert "node0 (exit 4)" in r.stderr and "node1" not in r.stderr

    both = eight.invoke("run", "--nodes", "node1", "--exclude", "node1", "true")
    assert both.returncode == 1 and "Traceback" not in both.stderr
    assert both.stderr.strip() == (
        "error: --nodes and --exclude both name node1: name a node in one of them"
    )
    unknown = eight.invoke("run", "--exclude", "nod1", "true")
    assert unknown.returncode == 1 and "unknown node 'nod1'; did you mean 'node1'" in unknown.stderr


def test_run_as_root_and_as_the_training_user(eight: Cluster):
    r = eight.invoke("run", "--nodes", "node0,node1", "--sudo", "id -un; echo $HOME")
    assert r.returncode == 0, r.stdout + r.stderr
    assert groups(r.stdout) == {"node[0-1] (2) exit 0": ["root", "/root"]}
    r = eight.invoke("run", "--nodes", "node0,node1", "--as-train-user", "id -un")
    assert r.returncode == 0, r.stdout + r.stderr
    assert groups(r.stdout) == {"node[0-1] (2) exit 0": ["www-data"]}


def test_put_and_get(eight: Cluster, tmp_path: Path):
    local = tmp_path / "data.txt"
    local.write_text("payload\n")
    local.chmod(0o640)
    r = eight.invoke("put", str(local), "/tmp/", "--nodes", "node2,node3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("/tmp/data.txt") == 2
    r = eight.invoke("run", "--nodes", "node2,node3", "stat -c '%a %U' /tmp/data.txt")
    assert groups(r.stdout) == {"node[2-3] (2) exit 0": ["640 ubuntu"]}

    r = eight.invoke(
        "get", "/tmp/data.txt", "--local-dir", str(tmp_path / "back"), "--nodes", "node1,node2"
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert (tmp_path / "back" / "node2" / "data.txt").read_text() == "payload\n", r.stdout
    assert not (tmp_path / "back" / "node1" / "data.txt").exists()
    assert re.search(r"node1 .*failed: get /tmp/data.txt", r.stdout), r.stdout
    assert "get failed on 1 of 2 node(s)" in r.stderr


def test_ssh_runs_openssh_with_the_pinned_keys(eight: Cluster, tmp_path: Path):
    r = eight.invoke(
        "ssh", "node3", "--command", "hostname; id -un; exit 3", stdin=subprocess.DEVNULL
    )
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stdout.split()[-1] == "ubuntu"
    conf = (eight.dir / ".ddpfleet" / "ssh" / "node3.conf").read_text()
    assert "StrictHostKeyChecking yes" in conf

    data = eight.data
    data["ssh"]["known_hosts"] = str(tmp_path / "empty_known_hosts")
    other = tmp_path / "inventory.yaml"
    other.write_text(yaml.safe_dump(data, sort_keys=False))
    refused = eight.invoke("ssh", "node3", "-c", "true", inventory=other, stdin=subprocess.DEVNULL)
    assert refused.returncode == 255, refused.stdout + refused.stderr
    assert "Host key verification failed" in refused.stderr
    assert not (tmp_path / "empty_known_hosts").exists()  # never recorded
