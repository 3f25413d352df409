"""Sandbox nodes whose PID 1 is real systemd (`sandbox: {init: systemd}`), their own cluster.

What a user would check on such a node: systemd answers `is-system-running` (running or
degraded), `systemd-run --wait` runs a transient service, and sandbox.down leaves no cgroup.
A detached run's supervisor there is a transient service (ddpfleet-<run>-<node>.service, its
cgroup the run): it outlives the controller, `stop` ends every descendant, and the unit goes.
The jupyter role runs the server as its ddpfleet-jupyter unit there.
"""

from __future__ import annotations

import json
import secrets
import shlex
import signal
import socket
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import PREFIX, Cluster, sandbox, second_subnet, write_inventory
from tests.integration.test_detach import RUNS, SLOW, detach, squatted, start_escaping, wait_state
from tests.integration.test_train import (  # noqa: F401 (the `ready` fixture)
    NODES,
    Live,
    new_run_id,
    ready,
    run_pids,
)

# Beside the session's own sandbox and those of test_slurm ("s", 2nd /24) and test_real_machine
# ("c", 3rd /24), never on them.
SUBNET = second_subnet(second_subnet(second_subnet()))
SYSTEMD_PREFIX = f"{PREFIX}y"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    directory = tmp_path_factory.mktemp("systemd")
    inventory = write_inventory(directory, prefix=SYSTEMD_PREFIX, subnet=SUBNET)
    c = Cluster(directory, inventory)
    data = c.data
    data["sandbox"]["init"] = "systemd"
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        with sandbox(c):
            yield c
    finally:
        cgroups = Path("/sys/fs/cgroup")
        left = [
            *cgroups.glob(f"ddpfleet-{SYSTEMD_PREFIX}-*"),
            *cgroups.glob(f"*/ddpfleet-{SYSTEMD_PREFIX}-*"),
        ]
        assert not left, f"cgroups left after sandbox.down: {left}"


def test_pid1_is_systemd_and_runs_transient_services(cluster: Cluster):
    for node in ("node0", "node1"):
        r = cluster.ssh(node, "cat /proc/1/comm; systemctl is-system-running --wait")
        assert r.stdout.split()[:1] == ["systemd"], r.stdout + r.stderr
        assert r.stdout.split()[1] in ("running", "degraded"), r.stdout + r.stderr
        run = cluster.ssh(node, "systemd-run --unit ddpfleet-check --wait --quiet true")
        assert run.returncode == 0, run.stdout + run.stderr
    # no host service came up in the node: only what the node needs is active
    active = cluster.ssh("node0", "systemctl list-units --state=active --no-legend --plain")
    services = {ln.split()[0] for ln in active.stdout.splitlines() if ".service" in ln}
    assert services <= {
        "ddpfleet-sshd.service",
        "dbus.service",
        "systemd-journald.service",
    }, services


# -- detached runs: the supervisor as a transient service ------------------------------------------


def unit_of(cluster: Cluster, node: str, run_id: str) -> str:
    """The run's unit as systemctl lists it on the node ('' once it is gone)."""
    r = cluster.ssh(node, f"systemctl list-units --all --no-legend --plain 'ddpfleet-{run_id}-*'")
    return r.stdout.strip()


def units_gone(cluster: Cluster, run_id: str, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(unit_of(cluster, n, run_id) for n in NODES):
            return
        time.sleep(0.2)
    pytest.fail(f"{run_id}: units left: {[unit_of(cluster, n, run_id) for n in NODES]}")


def test_detached_run_is_a_unit_and_outlives_its_controller(ready: Cluster):
    run_id = new_run_id("sdet")
    detach(ready, run_id, SLOW.replace("200", "6"))
    for node in NODES:
        unit = unit_of(ready, node, run_id)
        assert f"ddpfleet-{run_id}-{node}.service" in unit and "active" in unit, unit
        # the supervisor is the unit's main process: its cgroup is the run
        state = ready.ssh(node, f"cat {RUNS}/{run_id}/state.json").stdout
        pid = json.loads(state)["supervisor_pid"]
        cg = ready.ssh(node, f"cat /proc/{pid}/cgroup").stdout
        assert f"/system.slice/ddpfleet-{run_id}-{node}.service" in cg, cg
    follower = Live(ready, ["logs", run_id, "-f"])  # a controller, SIGKILLed: the run goes on
    follower.wait_for(r"first step", timeout=120)
    follower.proc.send_signal(signal.SIGKILL)
    follower.finish()
    view = wait_state(ready, run_id, ("SUCCEEDED", "FAILED", "STOPPED", "LOST"))
    assert view["state"] == "SUCCEEDED", view
    units_gone(ready, run_id)  # --collect: nothing of the run stays loaded
    assert not any(run_pids(ready, n, run_id) for n in NODES)


def test_stop_ends_the_unit_and_an_escaping_daemon(ready: Cluster, tmp_path):
    run_id, daemon = start_escaping(ready, tmp_path, "sstop")
    s = ready.invoke("stop", run_id, timeout=120)
    assert s.returncode == 0, s.stdout + s.stderr
    assert "nothing left" in s.stdout, s.stdout
    assert not any(run_pids(ready, n, run_id) for n in NODES)
    assert ready.ssh("node0", f"test -d /proc/{daemon}").returncode != 0, "the daemon survived"
    units_gone(ready, run_id)
    assert wait_state(ready, run_id, ("STOPPED",), within=30)["state"] == "STOPPED"


def test_the_master_port_goes_from_the_preflight_into_the_unit(ready: Cluster):
    """The master's supervisor takes the held port over from inside its transient service."""
    said, view = squatted(ready, 29744)
    assert "while the run lived" not in said and view["state"] == "SUCCEEDED", (said, view)


# -- Jupyter as its systemd unit --------------------------------------------------------------------


def test_jupyter_runs_as_its_unit_on_loopback_and_stops_with_it(ready: Cluster):
    """Where PID 1 is systemd the jupyter role runs the server as ddpfleet-jupyter.service:
    active, the server in that unit's cgroup, answering on the node's loopback only; and
    jupyter.stop stops the unit, a process in it that ignores SIGTERM included."""
    password = {"DDPFLEET_JUPYTER_PASSWORD": "ddph-" + secrets.token_urlsafe(12)}
    r = ready.invoke("bootstrap", "--roles", "jupyter", extra_env=password, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    said = ready.invoke("jupyter.status", "--json", timeout=120)
    assert said.returncode == 0, said.stdout + said.stderr
    rows = [json.loads(line) for line in said.stdout.splitlines() if line.startswith("{")]
    rows = {row["node"]: row for row in rows}
    probe = ["python3", "-c", "import socket; socket.create_connection(('127.0.0.1', 8888), 3)"]
    for node in NODES:
        assert rows[node]["state"] == "running", rows
        active = ready.ssh(node, "systemctl is-active ddpfleet-jupyter.service")
        assert active.stdout.strip() == "active", active.stdout + active.stderr
        cg = ready.ssh(node, f"cat /proc/{rows[node]['pid']}/cgroup").stdout
        assert "/system.slice/ddpfleet-jupyter.service" in cg, cg
        inside = ready.ssh(node, shlex.join(probe))
        assert inside.returncode == 0, inside.stderr  # it is there...
        with pytest.raises(OSError):  # ...and not on the node's address
            socket.create_connection((ready.address(node), 8888), timeout=3).close()
    # A kernel that will not go: in the unit's cgroup, its own session, SIGTERM ignored. The
    # unit's stop timeout (20 s) must SIGKILL it well within jupyter.stop's 60 s, whatever the
    # manager's default (systemd's 90 s; this sandbox sets 5 s, so it is read from the unit).
    timeout = ready.ssh("node0", "systemctl show -p TimeoutStopUSec ddpfleet-jupyter.service")
    assert timeout.stdout.strip() == "TimeoutStopUSec=20s", timeout.stdout
    mark = "DDPFLEET_TEST_STUBBORN=" + secrets.token_hex(4)
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    unit_dir = "/sys/fs/cgroup/system.slice/ddpfleet-jupyter.service"
    start = 'echo $$ > "$1/cgroup.procs" && exec python3 -c "$2"'
    put = ["env", mark, "setsid", "-f", "sh", "-c", start, "sh", unit_dir, stubborn]
    assert ready.ssh("node0", shlex.join(put) + " </dev/null >/dev/null 2>&1").returncode == 0
    find = f"grep -l -a -s -x -z {shlex.quote(mark)} /proc/[0-9]*/environ || true"
    deadline = time.monotonic() + 30
    while not ready.ssh("node0", find).stdout.strip():
        assert time.monotonic() < deadline, "the stubborn process did not start"
        time.sleep(0.2)
    stopped = ready.invoke("jupyter.stop", timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert ready.ssh("node0", find).stdout.strip() == ""
    for node in NODES:
        after = ready.ssh(node, "systemctl is-active ddpfleet-jupyter.service")
        assert after.stdout.strip() in ("inactive", "failed"), after.stdout
