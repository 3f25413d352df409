"""invoke bootstrap as a whole, on real sandbox nodes: converged re-runs, --check, faults, locking."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import INVOKE, Cluster, second_subnet, write_inventory

NODES = ("node0", "node1")
PASSWORD = "bootstrap-test-secret-7f3a"


def recap(stdout: str) -> dict[str, dict[str, str]]:
    """The recap table's rows: {node: {column: value}}."""
    rows = [
        [c.strip() for c in re.split("[│┃]", ln)[1:-1]]
        for ln in stdout.splitlines()
        if ln.count("│") > 2 or ln.count("┃") > 2
    ]
    header = next(r for r in rows if r[:2] == ["node", "ok"])
    return {r[0]: dict(zip(header, r)) for r in rows if r and r[0] in NODES}


def boot(cluster: Cluster, *flags: str, inventory: Path | None = None):
    return cluster.invoke(
        "bootstrap",
        *flags,
        inventory=inventory,
        timeout=1800,
        extra_env={"DDPFLEET_JUPYTER_PASSWORD": PASSWORD},
    )


def test_second_bootstrap_changes_nothing(cluster: Cluster):
    first = boot(cluster)
    assert first.returncode == 0, first.stdout + first.stderr
    second = boot(cluster)
    assert second.returncode == 0, second.stdout + second.stderr
    rows = recap(second.stdout)
    assert set(rows) == set(NODES)
    for node, row in rows.items():
        assert row["changed"] == "0" and row["failed"] == "0", (node, second.stdout)
        assert int(row["ok"]) > 0
    assert "changed" not in "".join(
        ln for ln in second.stdout.splitlines() if ln.startswith("[")
    ), second.stdout


@pytest.fixture(scope="module")
def fresh(cluster: Cluster, tmp_path_factory) -> Cluster:
    """A second, never-bootstrapped 2-node cluster (own prefix), sharing the wheel cache."""
    directory = tmp_path_factory.mktemp("fresh")
    c = Cluster(
        directory,
        write_inventory(
            directory, prefix=cluster.data["sandbox"]["prefix"] + "f", subnet=second_subnet()
        ),
    )
    (directory / ".ddpfleet").mkdir(exist_ok=True)
    shared = cluster.dir / ".ddpfleet" / "wheelhouse"
    shared.mkdir(parents=True, exist_ok=True)
    (directory / ".ddpfleet" / "wheelhouse").symlink_to(shared)
    up = c.invoke("sandbox.up")
    assert up.returncode == 0, up.stderr
    yield c
    c.invoke("sandbox.down")


def test_check_on_fresh_nodes_lists_changes_and_changes_nothing(fresh: Cluster):
    before = {
        n: fresh.ssh(n, "ls /etc/ssh/sshd_config.d; ls /opt; dpkg -l | wc -l").stdout for n in NODES
    }
    r = boot(fresh, "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    for node, row in recap(r.stdout).items():
        assert int(row["changed"]) > 0, (node, r.stdout)
    for n in NODES:
        assert (
            fresh.ssh(n, "ls /etc/ssh/sshd_config.d; ls /opt; dpkg -l | wc -l").stdout == before[n]
        )
        assert fresh.ssh(n, "test -e /opt/ddpfleet/venv").returncode == 1


def test_two_bootstraps_at_once_on_one_node(fresh: Cluster):
    env = fresh.env(DDPFLEET_JUPYTER_PASSWORD=PASSWORD)
    argv = [*INVOKE, "bootstrap", "--nodes", "node0", "--roles", "venv_env"]
    procs = [
        subprocess.Popen(
            argv, cwd=fresh.dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=1800) for p in procs]
    codes = [p.returncode for p in procs]
    assert 0 in codes, outs
    for code, (_out, err) in zip(codes, outs):
        if code != 0:  # the loser waited a bounded time, then said so in one line
            assert "another bootstrap holds /run/ddpfleet/bootstrap.lock" in err, err
            assert "Traceback" not in err
    # nothing corrupted: the env works and a third run has nothing to do
    torch = fresh.ssh("node0", "/opt/ddpfleet/venv/bin/python -c 'import torch'")
    assert torch.returncode == 0, torch.stderr
    again = boot(fresh, "--nodes", "node0", "--roles", "venv_env")
    assert again.returncode == 0 and recap(again.stdout)["node0"]["changed"] == "0", again.stdout


def test_node_stopped_mid_bootstrap(fresh: Cluster):
    env = fresh.env(DDPFLEET_JUPYTER_PASSWORD=PASSWORD)
    proc = subprocess.Popen(
        [*INVOKE, "bootstrap", "--roles", "venv_env"],
        cwd=fresh.dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # node1 has the whole env to install, so it is mid-bootstrap for a while: stop it then
    deadline = time.monotonic() + 120
    while fresh.ssh("node1", "test -e /opt/ddpfleet").returncode != 0:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    try:
        assert fresh.invoke("sandbox.stop", "--nodes", "node1").returncode == 0
        out, err = proc.communicate(timeout=1800)
        assert proc.returncode == 1, out + err
        rows = recap(out)
        assert rows["node1"]["unreachable"] not in ("", "0"), out
        assert rows["node0"]["failed"] == "0" and rows["node0"]["unreachable"] == "0", out
        assert "node1: unreachable" in err and "Traceback" not in err
    finally:
        assert fresh.invoke("sandbox.start", "--nodes", "node1").returncode == 0
    rerun = boot(fresh, "--roles", "venv_env")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert fresh.ssh("node1", "/opt/ddpfleet/venv/bin/python -c 'import torch'").returncode == 0
