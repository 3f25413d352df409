"""A detached gang's lifeline on real sandbox nodes: strangers on the network change nothing
(review 2026-12-06 #3), and the run's secret stays in the root-only spec.json.

The forger is this test process on the host, the sandbox bridge side: a plain socket to node0's
address, where the master's supervisor listens for its workers."""

from __future__ import annotations

import json
import re
import socket

from tests.integration.conftest import Cluster
from tests.integration.test_detach import RUNS, ranks_up, runs, wait_state
from tests.integration.test_train import (  # noqa: F401 (the `ready` fixture)
    NODES,
    new_run_id,
    ready,
    train_args,
)

# ~60 x 4 steps of 0.05 s: long enough for the forgeries, short enough for the suite
BRIEF = "--epochs 60 --steps-per-epoch 4 --batch-size 8 --step-sleep 0.05"
FORGED = (b"fail node1 1\n", b"hello node1\n", b"stop x\n", b"done node1\n")


def lifeline_listener(cluster: Cluster, run_id: str) -> tuple[str, int]:
    """(address, port) the master's supervisor listens on, from the node's own socket table."""
    state = json.loads(cluster.ssh("node0", f"cat {RUNS}/{run_id}/state.json").stdout)
    pid = state["supervisor_pid"]
    out = cluster.ssh("node0", "ss -Hltnp").stdout
    for line in out.splitlines():
        if f"pid={pid}," in line:
            host, _, port = line.split()[3].rpartition(":")
            return host, int(port)
    raise AssertionError(f"no listener of the supervisor (pid {pid}) on node0:\n{out}")


def closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass
    return True


def secret_places(cluster: Cluster, node: str, run_id: str) -> tuple[str, list[str]]:
    """(the run's secret, from node's spec.json; every file of the run and every process
    command line on node that holds it). The pattern goes on stdin: grep's own argv is clean."""
    spec = f"{RUNS}/{run_id}/spec.json"
    secret = json.loads(cluster.ssh(node, f"cat {spec}").stdout)["lifeline_secret"]
    where = f"grep -rlF -f - {RUNS}/{run_id} /proc/[0-9]*/cmdline 2>/dev/null || true"
    return secret, cluster.ssh(node, where, input=secret + "\n").stdout.split()


def test_forged_lines_from_the_bridge_change_nothing(ready: Cluster):
    """fail/hello/stop/done from the host to the master's lifeline port: each connection closed,
    the run goes on to SUCCEEDED, nobody blamed. The secret: only in the 0600 spec.json."""
    run_id = new_run_id("forge")
    r = ready.invoke(*train_args(run_id, BRIEF, "--detach"), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    try:
        ranks_up(ready, run_id, r"first step", 1)
        host, port = lifeline_listener(ready, run_id)
        assert host == ready.address("node0"), (
            f"the lifeline listens on {host}, not node0's address"
        )
        forgers = []
        for line in FORGED:
            sock = socket.create_connection((ready.address("node0"), port), timeout=5)
            sock.sendall(line)
            forgers.append(sock)
        assert all(closed_within(s, 4) for s in forgers), (
            "a connection without the secret stayed open"
        )
        assert runs(ready)[run_id]["state"] == "RUNNING"
        secrets, spec = {}, f"{RUNS}/{run_id}/spec.json"
        kept = {
            spec,
            f"{RUNS}/{run_id}/unit.stdin",
        }  # both 0600 (unit.stdin: where PID 1 is systemd)
        for node in NODES:  # while the supervisors live: in no command line, no file but the spec
            secrets[node], places = secret_places(ready, node, run_id)
            assert spec in places and set(places) <= kept, (node, places)
            mode = ready.ssh(node, f"stat -c '%a %U' {RUNS}/{run_id}/spec.json").stdout.split()
            assert mode == ["600", "root"], (node, mode)
        assert re.fullmatch(r"[0-9a-f]{64}", secrets["node0"]) and len(set(secrets.values())) == 1
        view = wait_state(ready, run_id, ("SUCCEEDED", "FAILED", "STOPPED", "LOST"))
        assert view["state"] == "SUCCEEDED", view
        assert view["failed_node"] is None and "node1" not in (view["why"] or ""), view
        table = ready.invoke("runs").stdout
        assert re.search(rf"{run_id}\s.*SUCCEEDED", table), table
        for node in NODES:  # state.json, node.log, supervisor.log written to the end
            assert set(secret_places(ready, node, run_id)[1]) <= kept, node
        said = r.stdout + r.stderr + ready.invoke("runs", "--json").stdout
        said += ready.invoke("logs", run_id).stdout + "".join(
            p.read_text(errors="replace")
            for p in (ready.dir / ".ddpfleet").rglob("*")
            if p.is_file()
        )
        assert secrets["node0"] not in said, "the secret reached the controller's output or files"
    finally:  # a failed check leaves no run holding the master port for the next test
        ready.invoke("stop", run_id, timeout=120)
