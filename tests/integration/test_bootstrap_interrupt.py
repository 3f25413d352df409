"""Ctrl-C during bootstrap stops the work on the nodes (issue 24 item 7), on real sandbox nodes.

Seen: pip still running 23 s after Ctrl-C, and a second bootstrap a second later ran its own pip
into the same venv, because the node's bootstrap lock went with the controller's connection.
Here a role's step is a shell with a child (pip's shape: `sh -c 'sleep & sleep; wait'`), run by
the real engine under the real node lock from a controller process that gets SIGINT. When that
process has exited, nothing of the step is left on either node and the lock is free.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, Cluster

NODES = ("node0", "node1")
STEP = "sleep 300 & sleep 301; wait"  # a shell and its child, as pip under sudo's shell
LEFT = "pgrep -f 'sleep 30[01]' || true"
CLEAN = "pkill -f 'sleep 30[01]' || true"  # after a failing run: nothing of it stays

ROLE = """
ORDER = 10
SECTION = "slow"


def applies(cfg, host):
    return True


def apply(host, cfg):
    from ddpfleet.engine.roles import changed

    host.change(["sh", "-c", {step!r}])
    yield changed("slow step")
"""

# The controller: the inventory's nodes, bootstrap with the one slow role (as `invoke bootstrap`
# does, in-process, so the role comes from the test's own roles dir).
DRIVER = """
import sys
from pathlib import Path
from ddpfleet import bootstrap, inventory
from ddpfleet.engine.settings import select_roles
from ddpfleet.ssh.connection import Fleet

loaded = inventory.load(sys.argv[1])  # the shipped roles own its sections
roles = select_roles(roles_dir=Path(sys.argv[2]))
with Fleet(loaded) as fleet:
    try:
        bootstrap.bootstrap(fleet, roles, log_dir=Path(sys.argv[3]))
    except KeyboardInterrupt:
        print("driver: interrupted", flush=True)
        sys.exit(130)
"""


@pytest.fixture(autouse=True)
def nothing_left(cluster: Cluster):
    yield
    for node in NODES:
        cluster.ssh(node, CLEAN)


def test_ctrl_c_stops_the_steps_on_the_nodes_before_the_lock_is_free(
    cluster: Cluster, tmp_path: Path
):
    roles = tmp_path / "roles" / "slow"
    roles.mkdir(parents=True)
    (roles / "role.py").write_text(textwrap.dedent(ROLE.format(step=STEP)))
    (roles / "defaults.yaml").write_text("")
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(cluster.inventory), str(roles.parent), str(tmp_path)],
        cwd=ROOT,
        env=cluster.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not all(cluster.ssh(n, LEFT).stdout.strip() for n in NODES):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the slow step never started"
            time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for node in NODES:
        # Right after the controller exits: the step's shell and its child are gone...
        assert cluster.ssh(node, LEFT).stdout.strip() == "", (node, out)
        # ...and the lock is free, so the next bootstrap runs alone.
        free = cluster.ssh(node, "flock -n /run/ddpfleet/bootstrap.lock true")
        assert free.returncode == 0, (node, free.stderr)
    assert proc.returncode == 130, out
    assert "interrupted: stopping the bootstrap's work on every node" in out, out
    for node in NODES:
        assert f"{node}: stopped (" in out and "lock free" in out, out


def test_a_vanished_controller_gets_the_same_stop_from_the_node(cluster: Cluster, tmp_path: Path):
    """kill -9 of the controller: no word from it, only its connection's end; the node stops
    the step itself before it lets the lock go."""
    roles = tmp_path / "roles" / "slow"
    roles.mkdir(parents=True)
    (roles / "role.py").write_text(textwrap.dedent(ROLE.format(step=STEP)))
    (roles / "defaults.yaml").write_text("")
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(cluster.inventory), str(roles.parent), str(tmp_path)],
        cwd=ROOT,
        env=cluster.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not all(cluster.ssh(n, LEFT).stdout.strip() for n in NODES):
            assert proc.poll() is None
            assert time.monotonic() < deadline, "the slow step never started"
            time.sleep(0.3)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 30
    for node in NODES:
        while cluster.ssh(node, LEFT).stdout.strip():
            assert time.monotonic() < deadline, f"{node}: the step outlived its controller"
            time.sleep(0.5)
        free = cluster.ssh(node, "flock -w 20 /run/ddpfleet/bootstrap.lock true")
        assert free.returncode == 0, (node, free.stderr)
