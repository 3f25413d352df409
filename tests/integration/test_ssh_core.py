"""The SSH core against real sandbox sshd nodes: ping, strict host keys, trust, faults, bad input."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import yaml

from tests.integration.conftest import USER_KNOWN_HOSTS, Cluster


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _variant(cluster: Cluster, tmp_path: Path, **changes) -> Path:
    """The cluster's inventory with some keys changed, written beside tmp_path."""
    data = cluster.data
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            data.setdefault(section, {})[key] = value
        else:
            data[section] = value
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_ping_reports_every_node(cluster: Cluster):
    r = cluster.invoke("ping")
    assert r.returncode == 0, r.stderr
    for node in ("node0", "node1"):
        line = next(ln for ln in r.stdout.splitlines() if f" {node} " in ln)
        assert cluster.address(node) in line and " yes " in line
        assert "x86_64" in line or "aarch64" in line
        assert "Debian" in line or "Ubuntu" in line


def test_one_connection_per_node_per_run(cluster: Cluster):
    before = {n: cluster.logins(n) for n in ("node0", "node1")}
    r = cluster.invoke("ping")
    assert r.returncode == 0, r.stderr
    after = {n: cluster.logins(n) for n in ("node0", "node1")}
    # ping runs several checks per node, over exactly one login each; the other login
    # in between is the `after` query itself
    assert {n: after[n] - before[n] - 1 for n in after} == {"node0": 1, "node1": 1}


def test_unknown_host_key_refused_then_trusted(cluster: Cluster, tmp_path: Path):
    known = tmp_path / "known_hosts"
    inv = _variant(cluster, tmp_path, ssh__known_hosts=str(known))
    user_before = _digest(USER_KNOWN_HOSTS)

    r = cluster.invoke("ping", inventory=inv)
    assert r.returncode == 1
    assert "node0: host key unknown (ssh-ed25519 SHA256:" in r.stderr
    assert "invoke trust --nodes node0" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not known.exists()

    r = cluster.invoke("trust", "--yes", inventory=inv)
    assert r.returncode == 0, r.stderr
    assert "SHA256:" in r.stdout
    assert len(known.read_text().splitlines()) == 2

    r = cluster.invoke("ping", inventory=inv)
    assert r.returncode == 0, r.stderr
    assert _digest(USER_KNOWN_HOSTS) == user_before  # the user's file is never written


def test_changed_host_key_refused_with_both_fingerprints(cluster: Cluster, tmp_path: Path):
    real = Path(cluster.data["ssh"]["known_hosts"]).read_text().splitlines()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    impostor = (tmp_path / "k.pub").read_text().split()[:2]
    addr0 = cluster.address("node0")
    lines = [f"{addr0} {' '.join(impostor)}" if ln.split()[0] == addr0 else ln for ln in real]
    known = tmp_path / "known_hosts"
    known.write_text("\n".join(lines) + "\n")
    inv = _variant(cluster, tmp_path, ssh__known_hosts=str(known))
    before = _digest(known)

    for task in ("ping", "trust"):
        r = cluster.invoke(
            task, "--yes" if task == "trust" else "--nodes=node0,node1", inventory=inv
        )
        assert r.returncode == 1, task
        err = r.stderr
        assert "node0: HOST KEY CHANGED" in err
        assert err.count("SHA256:") >= 2  # both fingerprints named
        assert "Traceback" not in err
        assert _digest(known) == before  # never overwritten
    assert "node1" in r.stdout  # node1 was still checked


def test_unreachable_node_reported_within_timeout_others_answer(cluster: Cluster, tmp_path: Path):
    data = cluster.data
    data["ssh"]["connect_timeout"] = 2
    data["nodes"]["ghost"] = {"host": cluster.address("node0").rsplit(".", 1)[0] + ".99"}
    inv = tmp_path / "inventory.yaml"
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    start = time.monotonic()
    r = cluster.invoke("ping", inventory=inv)
    elapsed = time.monotonic() - start
    assert r.returncode == 1
    assert "ghost: " in r.stderr and ("timeout" in r.stderr or "cannot reach" in r.stderr)
    assert elapsed < 2 + 4  # the connect timeout plus process start, not a hang
    rows = {ln.split()[1]: ln for ln in r.stdout.splitlines() if ln.startswith("│")}
    assert " yes " in rows["node0"] and " yes " in rows["node1"]


def test_stopped_node_is_refused_and_named(cluster: Cluster):
    cluster.invoke("sandbox.stop", "--nodes", "node1")
    try:
        r = cluster.invoke("ping")
        assert r.returncode == 1
        assert "node1: " in r.stderr and "refused" in r.stderr
        assert " yes " in next(ln for ln in r.stdout.splitlines() if " node0 " in ln)
    finally:
        assert cluster.invoke("sandbox.start", "--nodes", "node1").returncode == 0


def test_wrong_client_key_is_an_auth_error(cluster: Cluster, tmp_path: Path):
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "wrong")], check=True
    )
    inv = _variant(cluster, tmp_path, ssh__key=str(tmp_path / "wrong"))
    r = cluster.invoke("ping", "--nodes", "node0", inventory=inv)
    assert r.returncode == 1
    assert "node0: authentication failed for root@" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_input_is_one_line_without_traceback(cluster: Cluster, tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  node0: {host: 10.0.0.1, prot: 22}\n")
    cases = [
        (("ping",), bad, "bad.yaml:2: nodes.node0.prot: unknown key; did you mean 'port'?"),
        (("ping", "--nodes", "node9"), None, "unknown node 'node9'"),
        (("trust", "--nodes", "nodeX"), None, "unknown node 'nodeX'"),
        (("ping",), tmp_path / "missing.yaml", "inventory not found"),
    ]
    for args, inv, message in cases:
        r = cluster.invoke(*args, inventory=inv)
        assert r.returncode == 1, args
        assert message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr
