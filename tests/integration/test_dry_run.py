"""`train --dry-run` on real sandbox nodes (issue 25 item 3): the plan and every preflight check,
nothing synced, nothing started; a failed check exits 1. And --exclude for train.

The nodes' env is a stand-in venv whose torch only reports a version (as in test_train.py's
differing-torch test): a dry run never starts torch, so no bootstrap is needed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import Cluster

STANDIN = "/opt/ddpfleet-dryrun-env"
NODES = ("node0", "node1")


def standin_env(cluster: Cluster, node: str, version: str) -> None:
    made = cluster.ssh(
        node,
        f"rm -rf {STANDIN} && python3 -m venv --without-pip {STANDIN} && "
        f"d=$({STANDIN}/bin/python -c "
        "'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')"
        " && mkdir -p $d/torch && touch $d/torch/__init__.py && "
        f"echo \"__version__ = '{version}'\" > $d/torch/version.py",
    )
    assert made.returncode == 0, made.stderr


@pytest.fixture(scope="module")
def standin(cluster: Cluster, tmp_path_factory) -> Iterator[tuple[Cluster, Path]]:
    """The cluster with the stand-in env on both nodes; an inventory naming it and a code dir
    of this module's own; a project with one script."""
    for node in NODES:
        standin_env(cluster, node, "2.13.0+standin")
    directory = tmp_path_factory.mktemp("dryrun")
    data = cluster.data
    data.setdefault("python_env", {})["path"] = STANDIN
    inventory = directory / "inventory.yaml"
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    project = directory / "project"
    project.mkdir()
    (project / "train.py").write_text("print('trained')\n")
    try:
        yield cluster, inventory
    finally:
        for node in NODES:
            cluster.ssh(node, f"rm -rf {STANDIN} /root/ddpfleet-dryrun")


def dry(cluster: Cluster, inventory: Path, *extra: str):
    run_id = f"t-dry-{uuid.uuid4().hex[:8]}"
    project = inventory.parent / "project"
    args = ["train", "--dry-run", "--project-dir", str(project), "--script", "train.py"]
    args += ["--code-dir", "/root/ddpfleet-dryrun/code", "--run-id", run_id, *extra]
    return run_id, cluster.invoke(*args, inventory=inventory, timeout=300)


def test_dry_run_shows_the_plan_and_starts_nothing(standin):
    cluster, inventory = standin
    run_id, r = dry(cluster, inventory)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert f"run {run_id}: 2 node(s) x 1 process(es), master node0" in out
    assert "--node-rank {node_rank}" in out
    assert "code (not sent): node0 1 to send, 0 to delete; node1 1 to send, 0 to delete" in out
    assert out.rstrip().endswith("dry run: every check passed; nothing was synced or started")
    assert not (inventory.parent / "logs" / run_id).exists()
    for node in NODES:
        left = cluster.ssh(
            node,
            "ls -A /root/ddpfleet-dryrun/code; "
            f"grep -l -a -s DDPFLEET_RUN_ID={run_id} /proc/[0-9]*/environ || true",
        )
        assert left.stdout.split() == [".ddpfleet"] or left.stdout.split() == [], left.stdout
        port = cluster.ssh(node, "ss -Htln 'sport = :29500'").stdout
        assert port.strip() == "", port  # the master's runner let the port go


def test_dry_run_fails_when_a_check_fails(standin):
    cluster, inventory = standin
    standin_env(cluster, "node1", "2.0.0+other")
    try:
        _, r = dry(cluster, inventory)
    finally:
        standin_env(cluster, "node1", "2.13.0+standin")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "torch versions differ between nodes" in r.stderr
    assert "nothing was started" in r.stderr and "Traceback" not in r.stderr
    assert "dry run: every check passed" not in r.stdout


def test_exclude_narrows_the_run_and_is_checked_with_nodes(standin):
    cluster, inventory = standin
    run_id, r = dry(cluster, inventory, "--exclude", "node1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"run {run_id}: 1 node(s) x 1 process(es), master node0" in r.stdout
    _, both = dry(cluster, inventory, "--nodes", "node0,node1", "--exclude", "node1")
    assert both.returncode == 1
    assert both.stderr.strip() == (
        "error: --nodes and --exclude both name node1: name a node in one of them"
    )


def test_exclude_in_bootstrap_and_gpu_status(standin):
    cluster, _ = standin
    r = cluster.invoke("gpu-status", "--json", "--exclude", "node1")
    assert '"node0"' in r.stdout and '"node1"' not in r.stdout, r.stdout + r.stderr
    r = cluster.invoke("bootstrap", "--check", "--roles", "train_user", "--exclude", "node0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "node1" in r.stdout and "node0" not in r.stdout, r.stdout
