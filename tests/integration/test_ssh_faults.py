"""The SSH core under faults, on real sandbox sshd nodes: impostor host keys, ProxyJump hops,
hung commands, SFTP failures, the bootstrap lock (review 2026-11-29: #4 #5 #7 #8 #14 #17 #18 #20).

Every fault is made inside one node (its own mount namespace and sshd) and undone in `finally`.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ddpfleet import inventory as inv
from ddpfleet.engine.roles import Host
from ddpfleet.errors import CommandError, CommandTimeout, NodeError, Unreachable
from ddpfleet.ssh.connection import Fleet
from tests.integration.conftest import HERMETIC, INVOKE, ROOT, Cluster


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _inventory(
    cluster: Cluster, tmp_path: Path, known: Path | None = None, nodes=None, **ssh
) -> Path:
    data = cluster.data
    if known is not None:
        ssh["known_hosts"] = str(known)
    data["ssh"].update(ssh)
    if nodes is not None:
        data["nodes"], data["cluster"]["master"] = nodes, next(iter(nodes))
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _known_copy(cluster: Cluster, tmp_path: Path, drop: str | None = None) -> Path:
    """The cluster's pins in a file of the test's own (never the shared one), minus `drop`."""
    lines = Path(cluster.data["ssh"]["known_hosts"]).read_text().splitlines()
    known = tmp_path / "known_hosts"
    known.write_text("".join(f"{ln}\n" for ln in lines if drop is None or ln.split()[0] != drop))
    return known


def _root(cluster: Cluster, node: str, script: str, **kw) -> str:
    r = cluster.ssh(node, script, **kw)
    assert r.returncode == 0, (node, script, r.stderr)
    return r.stdout


def _wait_ssh(
    cluster: Cluster, node: str, argv_extra: list[str] | None = None, deadline_s: float = 30
) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        if argv_extra is None:
            r = cluster.ssh(node, "true")
        else:
            r = subprocess.run(
                ["ssh", *argv_extra, f"root@{cluster.address(node)}", "true"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        if r.returncode == 0:
            return
        assert time.monotonic() < deadline, r.stderr
        time.sleep(0.3)


def _restart_sshd(run) -> None:
    """sandbox_init restarts the node's sshd when it exits: end the listener by its pidfile."""
    run('kill "$(cat /run/sshd.pid)"')


# -- #4: a key of another type than the pinned one ---------------------------------------------


def test_trust_refuses_a_key_of_another_type_than_the_pinned_one(cluster: Cluster, tmp_path: Path):
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(tmp_path / "rsa")],
        check=True,
    )
    addr = cluster.address("node1")
    rsa_known = tmp_path / "rsa_known"
    rsa_known.write_text(f"{addr} {' '.join((tmp_path / 'rsa.pub').read_text().split()[:2])}\n")
    d = cluster.data["ssh"]
    via_rsa = [
        *HERMETIC,
        "-i",
        d["key"],
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={rsa_known}",
        "-o",
        "ConnectTimeout=5",
    ]
    known = _known_copy(cluster, tmp_path)
    invent = _inventory(cluster, tmp_path, known)
    before = _digest(known)
    # node1's sshd now offers only an RSA key (the impostor); ed25519 is what is pinned
    _root(
        cluster,
        "node1",
        "umask 077; cat > /etc/ssh/ddpf_test_rsa; echo 'HostKey "
        "/etc/ssh/ddpf_test_rsa' > /etc/ssh/sshd_config.d/00-ddpf-test-rsa.conf",
        input=(tmp_path / "rsa").read_text(),
    )
    _restart_sshd(lambda s: _root(cluster, "node1", s))
    try:
        _wait_ssh(cluster, "node1", via_rsa)
        r = cluster.invoke("trust", "--yes", "--nodes", "node1", inventory=invent)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "node1: HOST KEY CHANGED" in r.stderr, r.stderr
        assert r.stderr.count("SHA256:") >= 2  # the pinned and the offered fingerprint
        assert "Traceback" not in r.stderr + r.stdout
        assert _digest(known) == before  # nothing recorded
        r = cluster.invoke("ping", "--nodes", "node1", inventory=invent)
        assert r.returncode == 1 and "node1: HOST KEY CHANGED" in r.stderr, r.stderr
    finally:
        subprocess.run(
            [
                "ssh",
                *via_rsa,
                f"root@{addr}",
                "rm -f /etc/ssh/sshd_config.d/00-ddpf-test-rsa.conf "
                '/etc/ssh/ddpf_test_rsa && kill "$(cat /run/sshd.pid)"',
            ],
            capture_output=True,
            timeout=30,
        )
        _wait_ssh(cluster, "node1")


# -- #5: ProxyJump hops are checked like any node ---------------------------------------------


def test_proxyjump_hop_with_an_unknown_key_is_refused_then_trusted(
    cluster: Cluster, tmp_path: Path
):
    home = tmp_path / "home"  # never the developer's own ~/.ssh
    (home / ".ssh").mkdir(parents=True)
    jump = f"root@{cluster.address('node0')}"
    (home / ".ssh" / "config").write_text(
        f"Host n1\n  HostName {cluster.address('node1')}\n  ProxyJump {jump}\n"
    )
    known = _known_copy(cluster, tmp_path, drop=cluster.address("node0"))
    invent = _inventory(cluster, tmp_path, known, nodes={"n1": {"host": "n1"}})
    env = {"HOME": str(home)}

    r = cluster.invoke("ping", inventory=invent, extra_env=env, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"n1: jump host {jump}: host key unknown (ssh-ed25519 SHA256:" in r.stderr, r.stderr
    assert "invoke trust --nodes n1" in r.stderr and "Traceback" not in r.stderr

    r = cluster.invoke("trust", "--yes", inventory=invent, extra_env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"n1: jump host {jump}: {cluster.address('node0')} offers ssh-ed25519" in r.stdout
    assert f"{cluster.address('node0')} ssh-ed25519 " in known.read_text()

    r = cluster.invoke("ping", inventory=invent, extra_env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    row = next(ln for ln in r.stdout.splitlines() if " n1 " in ln)
    assert " yes " in row
    assert not (home / ".ssh" / "known_hosts").exists()  # the user's file is never written


# -- #20: a known_hosts without its last newline -------------------------------------------------


def test_trust_after_a_last_line_without_newline(cluster: Cluster, tmp_path: Path):
    known = _known_copy(cluster, tmp_path, drop=cluster.address("node1"))
    known.write_text(known.read_text().rstrip("\n"))
    kept = known.read_text().splitlines()  # node0's pin (and any node an earlier module added)
    invent = _inventory(cluster, tmp_path, known)
    r = cluster.invoke("trust", "--yes", "--nodes", "node1", inventory=invent)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = known.read_text().splitlines()
    assert lines[: len(kept)] == kept, lines  # the last line was not glued to node1's
    assert len(lines) == len(kept) + 1 and lines[-1].split()[0] == cluster.address("node1")
    r = cluster.invoke("ping", inventory=invent)
    assert r.returncode == 0, r.stdout + r.stderr


# -- #8 #18: a hung command times out, on the controller and on the node ----------------------


def test_hung_probe_times_out_and_is_stopped_on_the_node(cluster: Cluster, tmp_path: Path):
    invent = _inventory(cluster, tmp_path, command_timeout=3)
    # df: the facts run it, logins do not (PAM's motd runs uname, so a hung uname hangs sshd)
    _root(
        cluster,
        "node1",
        "printf '#!/bin/sh\\nexec sleep 86399\\n' > /tmp/ddpf-hang; "
        'chmod 755 /tmp/ddpf-hang; mount --bind /tmp/ddpf-hang "$(command -v df)"',
    )
    try:
        # a hang fails the test through the subprocess timeout rather than hanging it
        r = cluster.invoke("ping", inventory=invent, timeout=60)
    finally:
        _root(cluster, "node1", 'umount "$(command -v df)"; rm -f /tmp/ddpf-hang')
    assert r.returncode == 1, r.stdout + r.stderr
    assert "node1: timed out after 3s (stopped it on the node)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert " yes " in next(ln for ln in r.stdout.splitlines() if " node0 " in ln)
    assert "sleep 86399" not in _root(cluster, "node1", "ps -eo args")


def test_ctrl_c_during_a_hung_command_exits_at_once(cluster: Cluster, tmp_path: Path):
    invent = _inventory(cluster, tmp_path, command_timeout=600)
    _root(
        cluster,
        "node1",
        "printf '#!/bin/sh\\nexec sleep 86396\\n' > /tmp/ddpf-hang; "
        'chmod 755 /tmp/ddpf-hang; mount --bind /tmp/ddpf-hang "$(command -v df)"',
    )
    proc = subprocess.Popen(
        [*INVOKE, "ping"],
        cwd=cluster.dir,
        text=True,
        env={**cluster.env(), "DDPFLEET_INVENTORY": str(invent)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while "sleep 86396" not in _root(cluster, "node1", "ps -eo args"):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)  # not joined on the hung node's thread
        assert proc.returncode == 130 and "interrupted" in err, out + err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _root(
            cluster,
            "node1",
            'umount "$(command -v df)"; rm -f /tmp/ddpf-hang; '
            "kill $(ps -eo pid=,args= | awk '$2 == \"sleep\" && $3 == 86396 {print $1}') "
            "2>/dev/null; true",
        )  # the test's own sleep, by pid


def test_timed_out_command_does_not_keep_running_on_the_node(cluster: Cluster):
    with Fleet(inv.load(cluster.inventory, "node1")) as fleet:
        out = fleet.run("sleep 86398; echo never", timeout=2)["node1"]
        assert isinstance(out, CommandTimeout), out
        assert fleet.run("true")["node1"].ok  # the connection is still good
    assert "sleep 86398" not in _root(cluster, "node1", "ps -eo args")


def test_node_that_goes_silent_mid_command_is_unreachable(cluster: Cluster):
    # node1 takes its own link down for a minute, behind the command's back: no FIN, no RST,
    # only silence (a partition). It restores the link itself afterwards.
    _root(
        cluster,
        "node1",
        "setsid sh -c 'sleep 2; ip link set eth0 down; sleep 60; "
        "ip link set eth0 up' </dev/null >/dev/null 2>&1 &",
    )
    try:
        with Fleet(inv.load(cluster.inventory, "node1")) as fleet:
            # no timeout: only the keepalive can tell this wait from a slow command
            out = fleet.run("sleep 90; echo done")["node1"]
        assert isinstance(out, Unreachable), out
    finally:
        _wait_ssh(cluster, "node1", deadline_s=120)


def test_reconnect_lost_reopens_only_the_dropped_connection(cluster: Cluster):
    before = {n: cluster.logins(n) for n in ("node0", "node1")}
    with Fleet(inv.load(cluster.inventory)) as fleet:
        assert all(r.ok for r in fleet.run("true").values())
        kept = fleet.conns["node0"]
        fleet.conns["node1"].transport.close()  # the connection drops under the fleet
        assert isinstance(fleet.run("true")["node1"], Unreachable)
        assert fleet.reconnect_lost() == ["node1"]
        out = fleet.run("hostname")
        assert all(r.ok for r in out.values()), out
        assert fleet.conns["node0"] is kept
    after = {n: cluster.logins(n) for n in ("node0", "node1")}
    # the fleet's logins: one for node0, two for node1 (the -1: the `after` query's own login)
    assert {n: after[n] - before[n] - 1 for n in after} == {"node0": 1, "node1": 2}


# -- #7: one node's I/O error is that node's failure -----------------------------------------


def test_full_disk_on_one_node_fails_that_node_only(cluster: Cluster):
    _root(
        cluster,
        "node1",
        "mkdir -p /mnt/ddpf-full && mount -t tmpfs -o size=1m tmpfs /mnt/ddpf-full",
    )
    try:
        with Fleet(inv.load(cluster.inventory)) as fleet:
            where = {"node0": "/tmp/ddpf-put-ok", "node1": "/mnt/ddpf-full/big"}
            out = fleet.map(lambda c: Host(c, fleet.inventory).put(where[c.name], b"x" * (2 << 20)))
        assert out["node0"] == (True, "")
        assert isinstance(out["node1"], CommandError), out["node1"]
        assert "/mnt/ddpf-full/" in str(out["node1"]) and "Failure" in str(out["node1"])
        assert _root(cluster, "node1", "ls -A /mnt/ddpf-full") == ""  # nothing half-written
    finally:
        _root(cluster, "node1", "umount /mnt/ddpf-full; rmdir /mnt/ddpf-full")
        _root(cluster, "node0", "rm -f /tmp/ddpf-put-ok")


def test_output_that_does_not_parse_fails_that_node_only(cluster: Cluster):
    with Fleet(inv.load(cluster.inventory)) as fleet:
        out = fleet.map(lambda c: int(c.run("hostname" if c.name == "node1" else "echo 7").stdout))
    assert out["node0"] == 7
    assert isinstance(out["node1"], NodeError) and "ValueError: invalid literal" in str(
        out["node1"]
    )


# -- #14, #8: the bootstrap lock -----------------------------------------------------------------


def test_lock_held_by_an_unprivileged_user_does_not_block_bootstrap(cluster: Cluster):
    # what the notebook user could do to the old, world-writable lock, and try on the new one
    pids = _root(
        cluster,
        "node0",
        """
for lock in /run/lock/ddpfleet-bootstrap.lock /run/ddpfleet/bootstrap.lock; do
  setpriv --reuid=65534 --regid=65534 --clear-groups setsid flock -n "$lock" sleep 86397 \\
    </dev/null >/dev/null 2>&1 & echo $!
done""",
    ).split()
    try:
        r = cluster.invoke("bootstrap", "--nodes", "node0", "--roles", "openssh_server", "--check")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:  # setsid made each its own process group: end the flock and its sleep together
        cluster.ssh("node0", "kill -- " + " ".join(f"-{p}" for p in pids) + " 2>/dev/null")


def test_lock_held_by_another_bootstrap_names_its_holder(cluster: Cluster):
    pid = _root(
        cluster,
        "node0",
        "mkdir -p -m 0700 /run/ddpfleet; setsid flock "
        "/run/ddpfleet/bootstrap.lock sleep 86395 </dev/null >/dev/null 2>&1 & echo $!",
    )
    try:
        r = cluster.invoke("bootstrap", "--nodes", "node0", "--roles", "openssh_server", "--check")
    finally:
        cluster.ssh("node0", f"kill -- -{pid.strip()}")  # its own process group, by id
    assert r.returncode == 1, r.stdout + r.stderr
    assert (
        "another bootstrap holds /run/ddpfleet/bootstrap.lock on this node (held by pid "
        in r.stderr
        and "(user root)" in r.stderr
    ), r.stderr
    assert "bootstrap failed on 1 node(s): node0: connect: another bootstrap" in r.stderr
    assert "Traceback" not in r.stderr


def test_lock_is_freed_when_its_holder_goes_silent(cluster: Cluster):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(cluster.inventory)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        # frozen: its TCP connection stays up, so only the missing heartbeat can tell
        os.kill(holder.pid, signal.SIGSTOP)
        r = cluster.invoke("bootstrap", "--nodes", "node0", "--roles", "openssh_server", "--check")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()


HOLDER = """
import sys, time
from ddpfleet import inventory
from ddpfleet.bootstrap import NodeLock
from ddpfleet.ssh.connection import Fleet
with Fleet(inventory.load(sys.argv[1], "node0")) as fleet:
    with NodeLock(fleet.open()["node0"]):
        print("locked", flush=True)
        time.sleep(600)
"""


# -- #17: Host.put never writes or chowns through a symlink ------------------------------------


@pytest.mark.parametrize("owner", [None, "nobody"])
def test_put_never_follows_a_planted_symlink(cluster: Cluster, owner):
    d = "/tmp/ddpf-owned"
    _root(
        cluster,
        "node0",
        f"rm -rf {d}; mkdir {d}; chown nobody {d}; "
        f"echo original > /tmp/ddpf-victim; ln -s /tmp/ddpf-victim {d}/f.ddpfleet-tmp; "
        f"ln -s /tmp/ddpf-victim {d}/f",
    )
    try:
        with Fleet(inv.load(cluster.inventory, "node0")) as fleet:
            out = fleet.map(lambda c: Host(c, fleet.inventory).put(f"{d}/f", "new\n", owner=owner))
        assert out["node0"][0] is True, out
        got = _root(
            cluster,
            "node0",
            f"cat /tmp/ddpf-victim; stat -c '%U %F' /tmp/ddpf-victim {d}/f; cat {d}/f",
        )
        assert got.splitlines() == [
            "original",
            "root regular file",
            f"{owner or 'root'} regular file",
            "new",
        ], got
    finally:
        _root(cluster, "node0", f"rm -rf {d} /tmp/ddpf-victim")
