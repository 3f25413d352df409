"""The openssh_server hardening on the real sandbox nodes, judged by ssh-audit (issue 15).

ssh-audit (the test extra) connects to each node's real sshd as any client would and rates what
it offers. After `bootstrap --roles openssh_server` no line may be [fail]; the controller's
paramiko, the system OpenSSH client and local forwarding still work (node-to-node ssh, off by
default: test_node_ssh.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import paramiko
import pytest

from tests.integration.conftest import Cluster
from tests.integration.test_roles_conda_ssh import DROPIN, NODES, changed
from tests.roles.test_openssh_hardening import OLD_DROPIN

SSH_AUDIT = Path(sys.executable).with_name("ssh-audit")


def bootstrap(cluster: Cluster, *flags: str) -> subprocess.CompletedProcess:
    return cluster.invoke("bootstrap", "--roles", "openssh_server", *flags, timeout=300)


def audit(cluster: Cluster, node: str) -> str:
    """ssh-audit's report on the node (no colours; the connection-rate probe left out: it opens
    dozens of connections and only ever prints an [nfo] line)."""
    if not SSH_AUDIT.exists():
        pytest.fail(f"{SSH_AUDIT} missing: pip install -e '.[test]' (ssh-audit is a test extra)")
    result = subprocess.run(
        [str(SSH_AUDIT), "-n", "--skip-rate-test", "-t", "10", cluster.address(node)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode in (0, 1, 2, 3), result.stdout + result.stderr  # 3: a [fail]
    return result.stdout


def client(cluster: Cluster, node: str) -> paramiko.SSHClient:
    d = cluster.data
    ssh = paramiko.SSHClient()
    ssh.load_host_keys(d["ssh"]["known_hosts"])
    ssh.connect(
        cluster.address(node),
        username="root",
        key_filename=d["ssh"]["key"],
        look_for_keys=False,
        allow_agent=False,
        timeout=10,
    )
    return ssh


@pytest.fixture(scope="module")
def hardened(cluster: Cluster) -> subprocess.CompletedProcess:
    result = bootstrap(cluster)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_ssh_audit_finds_no_failure_on_any_node(cluster: Cluster, hardened):
    for node in NODES:
        report = audit(cluster, node)
        fails = [line for line in report.splitlines() if "[fail]" in line]
        assert fails == [], f"{node}:\n" + "\n".join(fails)
        warns = sum("[warn]" in line for line in report.splitlines())
        print(f"{node}: ssh-audit [fail] 0, [warn] {warns}")


def test_sshd_uses_the_session_limits(cluster: Cluster, hardened):
    for node in NODES:
        effective = dict(
            line.split(" ", 1) for line in cluster.ssh(node, "sshd -T").stdout.splitlines()
        )
        assert effective["clientaliveinterval"] == "15"  # review #8: a dead client is reaped
        assert effective["clientalivecountmax"] == "4"
        assert effective["maxauthtries"] == "4" and effective["logingracetime"] == "30"
        assert effective["x11forwarding"] == "no" and effective["allowagentforwarding"] == "no"
        assert effective["allowtcpforwarding"] == "local"
        assert "ecdh-sha2" not in effective["kexalgorithms"]


def test_second_bootstrap_changes_nothing(cluster: Cluster, hardened):
    again = bootstrap(cluster)
    assert again.returncode == 0, again.stdout + again.stderr
    assert changed(again) == {n: 0 for n in NODES}, again.stdout


def test_check_reports_the_new_dropin_on_an_old_node(cluster: Cluster, hardened):
    """node0 carries (and runs) the drop-in of before the hardening: --check says so and leaves
    it; the real run installs the new one and the run after that changes nothing."""
    put = cluster.ssh("node0", f"cat >{DROPIN} && kill -HUP $(cat /run/sshd.pid)", input=OLD_DROPIN)
    assert put.returncode == 0, put.stderr
    check = bootstrap(cluster, "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert changed(check)["node0"] >= 1 and changed(check)["node1"] == 0, check.stdout
    assert f"would install {DROPIN}" in " ".join(check.stdout.split())
    assert cluster.ssh("node0", f"cat {DROPIN}").stdout == OLD_DROPIN
    fix = bootstrap(cluster)
    assert fix.returncode == 0 and changed(fix)["node0"] >= 1, fix.stdout + fix.stderr
    assert changed(bootstrap(cluster)) == {n: 0 for n in NODES}
    assert "[fail]" not in audit(cluster, "node0")


def test_every_client_still_connects(cluster: Cluster, hardened):
    # Node-to-node ssh through the hardened sshd (with the same algorithms in the client config):
    # test_node_ssh.py, which turns it on for a user.
    for node in NODES:
        assert cluster.ssh(node, "true").returncode == 0  # the system OpenSSH client
        ssh = client(cluster, node)  # paramiko, as the controller connects
        try:
            transport = ssh.get_transport()
            assert transport.remote_mac.endswith("-etm@openssh.com") or "gcm" in (
                transport.remote_cipher
            )
            # AllowTcpForwarding local: an `ssh -L` channel (the Jupyter tunnel) opens ...
            channel = transport.open_channel("direct-tcpip", ("127.0.0.1", 22), ("127.0.0.1", 0))
            assert channel.recv(7) == b"SSH-2.0"
            channel.close()
            # ... and an `ssh -R` listener on the node is refused.
            with pytest.raises(paramiko.SSHException):
                transport.request_port_forward("127.0.0.1", 0)
        finally:
            ssh.close()
