"""Sandbox nodes whose PID 1 is real systemd (`sandbox: {init: systemd}`), their own cluster.

What a user would check on such a node: systemd answers `is-system-running` (running or
degraded), `systemd-run --wait` runs a transient service, and sandbox.down leaves no cgroup.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import PREFIX, Cluster, second_subnet, write_inventory

SUBNET = second_subnet()  # beside the session's own sandbox, never on it
SYSTEMD_PREFIX = f"{PREFIX}s"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    directory = tmp_path_factory.mktemp("systemd")
    inventory = write_inventory(directory, prefix=SYSTEMD_PREFIX, subnet=SUBNET)
    c = Cluster(directory, inventory)
    data = c.data
    data["sandbox"]["init"] = "systemd"
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    up = c.invoke("sandbox.up", timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield c
    finally:
        down = c.invoke("sandbox.down", timeout=300)
        assert down.returncode == 0, down.stdout + down.stderr
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
