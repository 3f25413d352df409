"""Slurm on real sandbox nodes: the slurm role bootstraps munge, slurmctld and slurmd (real
daemons, supervised: the nodes have no systemd), then `invoke train --launcher slurm` runs
through sbatch/srun/torchrun.

The module has a 2-node sandbox of its own (its prefix + 's', the next subnet), made once for
its tests; taking the sandbox down ends every daemon with its node (each lives in the node's
PID namespace). Waits are polled, never slept.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import PREFIX, Cluster, second_subnet, write_inventory
from tests.integration.test_train import Live, new_run_id, run_pids, train_args, wait_gone

NODES = ("node0", "node1")
SHORT = "--epochs 2 --steps-per-epoch 4 --batch-size 8"


def _recap(out: str) -> dict[str, int]:
    """node -> changed, from the recap table."""
    return {m[0]: int(m[1]) for m in re.findall(r"│ (node\d) +│ \d+ +│ (\d+) +│", out)}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Cluster:
    directory = tmp_path_factory.mktemp("slurm")
    c = Cluster(
        directory,
        write_inventory(directory, prefix=PREFIX + "s", subnet=second_subnet()),
    )
    up = c.invoke("sandbox.up", timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        first = c.invoke("bootstrap", "--roles", "venv_env,slurm", timeout=1800)
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
        c.first_bootstrap = first.stdout  # type: ignore[attr-defined]
        yield c
    finally:
        down = c.invoke("sandbox.down", timeout=300)
        assert down.returncode == 0, down.stdout + down.stderr


def status(c: Cluster) -> dict:
    r = c.invoke("slurm.status", "--json", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_bootstrap_brings_both_nodes_up_idle_and_a_second_run_changes_nothing(slurm: Cluster):
    assert "slurmctld: changed (started" in slurm.first_bootstrap
    doc = status(slurm)
    assert {n["name"]: n["state"] for n in doc["nodes"]} == {"node0": "idle", "node1": "idle"}
    again = slurm.invoke("bootstrap", "--roles", "slurm", timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr
    assert _recap(again.stdout) == {"node0": 0, "node1": 0}, again.stdout[-3000:]
    table = slurm.invoke("slurm.status", timeout=60)
    assert re.search(r"node1 +│ idle", table.stdout), table.stdout


def test_check_mode_on_a_converged_cluster_reports_nothing_to_do(slurm: Cluster):
    r = slurm.invoke("bootstrap", "--roles", "slurm", "--check", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert _recap(r.stdout) == {"node0": 0, "node1": 0}, r.stdout[-3000:]


def test_the_munge_key_is_never_printed_and_is_the_same_everywhere(slurm: Cluster):
    key = (slurm.dir / ".ddpfleet" / "slurm" / "munge.key").read_bytes()
    digests = {n: slurm.ssh(n, "sha256sum /etc/munge/munge.key").stdout.split()[0] for n in NODES}
    assert len(set(digests.values())) == 1
    assert slurm.ssh("node0", "stat -c '%U %a' /etc/munge/munge.key").stdout.strip() == "munge 400"
    logs = "".join(p.read_text(errors="replace") for p in (slurm.dir / "logs").glob("*.log"))
    assert key.hex()[:32] not in logs


def test_a_bad_setting_is_one_line_and_the_running_cluster_is_untouched(slurm: Cluster):
    data = slurm.data
    data["slurm"] = {"slurmd_port": 6817}  # the same port as slurmctld's
    bad = slurm.dir / "bad-inventory.yaml"
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    conf = slurm.ssh("node0", "sha256sum /etc/slurm/slurm.conf").stdout
    pids = slurm.ssh("node0", "cat /var/lib/ddpfleet/slurm/slurmctld.pid").stdout
    r = slurm.invoke("bootstrap", "--roles", "slurm", inventory=bad, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "bad-inventory.yaml:" in lines[0] and "slurm.slurmd_port" in lines[0], lines[0]
    assert "recap" not in r.stdout  # refused before any node was touched
    assert slurm.ssh("node0", "sha256sum /etc/slurm/slurm.conf").stdout == conf
    assert slurm.ssh("node0", "cat /var/lib/ddpfleet/slurm/slurmctld.pid").stdout == pids


def test_train_through_slurm_four_ranks_one_checksum(slurm: Cluster):
    run_id = new_run_id("slurm")
    args = train_args(run_id, SHORT, "--launcher", "slurm", "--nodes", ",".join(NODES))
    r = slurm.invoke(*args, timeout=600)
    out = r.stdout
    assert r.returncode == 0, out[-4000:] + r.stderr[-2000:]
    assert re.search(r"\[slurm\] submitted job \d+", out), out[-3000:]
    checksums = dict(re.findall(r"^\[node\d r(\d)\] rank \1 checksum (\S+)$", out, re.MULTILINE))
    assert sorted(checksums) == ["0", "1", "2", "3"], out[-3000:]
    assert len(set(checksums.values())) == 1, checksums
    logs = slurm.dir / "logs" / run_id
    assert "rank 3 checksum" in (logs / "node1.log").read_text()
    assert list(logs.glob("node0-slurm-*.out")), sorted(p.name for p in logs.iterdir())
    assert (logs / "node1-rank3.stdout.log").is_file(), sorted(p.name for p in logs.iterdir())
    assert status(slurm)["jobs"] == []


def test_a_crashing_rank_is_named_and_nothing_of_the_job_is_left(slurm: Cluster):
    run_id = new_run_id("slurmcrash")
    script = "--epochs 50 --steps-per-epoch 20 --step-sleep 0.05 --fail-at-step 3 --fail-rank 3"
    r = slurm.invoke(*train_args(run_id, script, "--launcher", "slurm"), timeout=600)
    assert r.returncode == 1, r.stdout[-3000:]
    last = r.stderr.strip().splitlines()[0]
    assert "node1 rank 3 failed first (exit 1)" in last, r.stderr[-2000:]
    wait_gone(slurm, run_id, time.monotonic(), within=30, nodes=NODES)
    assert status(slurm)["jobs"] == []
    assert all(n["state"] == "idle" for n in status(slurm)["nodes"])


def test_ctrl_c_cancels_the_job(slurm: Cluster):
    run_id = new_run_id("slurmint")
    script = "--epochs 100 --steps-per-epoch 100 --step-sleep 0.1"
    live = Live(slurm, train_args(run_id, script, "--launcher", "slurm"))
    try:
        live.wait_for(r"^\[node1 r\d\] rank \d/4: first step", timeout=180)
        assert run_pids(slurm, "node1", run_id)
        live.proc.send_signal(signal.SIGINT)
        assert live.finish(timeout=120) == 130, live.text[-3000:]
    finally:
        if live.proc.poll() is None:
            live.proc.kill()
            live.finish()
    assert "cancelling job" in live.text
    wait_gone(slurm, run_id, time.monotonic(), within=30, nodes=NODES)
    assert status(slurm)["jobs"] == []


def test_the_inventory_can_make_slurm_the_launcher(slurm: Cluster, tmp_path: Path):
    data = slurm.data
    data["train"] = {"launcher": "slurm"}
    inventory = slurm.dir / "slurm-launcher.yaml"
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    run_id = new_run_id("slurminv")
    args = train_args(run_id, "--epochs 1 --steps-per-epoch 2 --batch-size 8")
    r = slurm.invoke(*args, inventory=inventory, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "[slurm] submitted job" in r.stdout
