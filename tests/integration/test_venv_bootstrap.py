"""venv_env and env-export on the real sandbox nodes. The nodes have no route out, so every wheel
comes through the controller's wheelhouse and the nodes install with --no-index."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import Cluster

NODES = ("node0", "node1")
ENV = "/opt/ddpfleet/venv"
HOUSE = "/var/cache/ddpfleet/wheelhouse"
PYTHON_ENV = {
    "manager": "venv",
    "path": ENV,
    "torch": "torch==2.13.0",
    "index_url": "",
    "packages": ["jupyterlab"],
    "wheelhouse": True,
}


def recap(stdout: str) -> dict[str, dict[str, str]]:
    """The recap table's rows: {node: {column: value}} (rich draws ┃ in the header, │ below)."""
    rows = [
        [c.strip() for c in re.split("[│┃]", line)[1:-1]]
        for line in stdout.splitlines()
        if line.count("│") > 2 or line.count("┃") > 2
    ]
    header = next(r for r in rows if r[0] == "node")
    return {r[0]: dict(zip(header, r)) for r in rows if r[0] in NODES}


def venv_inventory(cluster: Cluster, name: str = "inventory-venv.yaml", **python_env) -> Path:
    """The session cluster's inventory with the venv + wheelhouse settings under test."""
    data = cluster.data
    data["python_env"] = {**(data.get("python_env") or {}), **PYTHON_ENV, **python_env}
    path = cluster.dir / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def bootstrap(cluster: Cluster, inventory: Path, *flags: str):
    start = time.monotonic()
    result = cluster.invoke(
        "bootstrap", "--roles", "venv_env", *flags, inventory=inventory, timeout=1800
    )
    return result, time.monotonic() - start


@pytest.fixture(scope="module")
def venv_cluster(cluster: Cluster):
    """The cluster after one venv_env bootstrap (fresh nodes: venv made, wheels pushed)."""
    inventory = venv_inventory(cluster)
    for node in NODES:  # other modules may have made the env already: start from none
        cluster.ssh(node, f"rm -rf {ENV} /var/cache/ddpfleet/wheelhouse")
    result, seconds = bootstrap(cluster, inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"fresh venv bootstrap of {len(NODES)} nodes: {seconds:.1f}s")
    return cluster, inventory, result


def test_fresh_bootstrap_installs_torch_from_the_wheelhouse(venv_cluster):
    cluster, _, first = venv_cluster
    for node, row in recap(first.stdout).items():
        assert int(row["changed"]) > 0 and row["failed"] == "0", (node, first.stdout)
    for node in NODES:
        torch = cluster.ssh(node, f"{ENV}/bin/python -c 'import torch; print(torch.__version__)'")
        assert torch.returncode == 0, torch.stderr
        assert torch.stdout.strip().startswith("2.13.0")
        wheels = cluster.ssh(node, "ls /var/cache/ddpfleet/wheelhouse").stdout.split()
        assert any(w.startswith("torch-2.13.0") for w in wheels)
        assert not any(w.endswith(".part") for w in wheels)
    cached = list((cluster.dir / ".ddpfleet" / "wheelhouse").glob("cp*/torch-2.13.0*.whl"))
    assert cached, "the controller keeps the wheels it downloaded"


def test_second_run_changes_nothing_and_is_fast(venv_cluster):
    cluster, inventory, _ = venv_cluster
    result, seconds = bootstrap(cluster, inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = recap(result.stdout)
    assert sorted(rows) == list(NODES)
    for node, row in rows.items():
        assert (row["changed"], row["failed"]) == ("0", "0"), (node, result.stdout)
    print(f"converged venv bootstrap of {len(NODES)} nodes: {seconds:.2f}s (invoke included)")


def test_check_on_a_converged_cluster_reports_no_change(venv_cluster):
    cluster, inventory, _ = venv_cluster
    result, _ = bootstrap(cluster, inventory, "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(row["changed"] == "0" for row in recap(result.stdout).values())


def test_changed_spec_installs_again_then_converges(venv_cluster):
    cluster, _, _ = venv_cluster
    # six is already among jupyterlab's wheels: a new spec, no new download for the nodes
    inventory = venv_inventory(cluster, "inventory-venv-six.yaml", packages=["jupyterlab", "six"])
    result, _ = bootstrap(cluster, inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    spec = cluster.ssh("node0", f"cat {ENV}/.ddpfleet-spec.sha256").stdout.strip()
    again, _ = bootstrap(cluster, inventory)
    assert all(row["changed"] == "0" for row in recap(again.stdout).values()), again.stdout
    back, _ = bootstrap(cluster, venv_inventory(cluster))  # and back to the module's spec
    assert back.returncode == 0, back.stdout + back.stderr
    assert cluster.ssh("node0", f"cat {ENV}/.ddpfleet-spec.sha256").stdout.strip() != spec


def test_env_export_writes_every_node_and_finds_them_identical(venv_cluster):
    cluster, inventory, _ = venv_cluster
    result = cluster.invoke("env-export", inventory=inventory, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for node in NODES:
        doc = yaml.safe_load((cluster.dir / "envs" / f"{node}.yml").read_text())
        assert doc["node"] == node and doc["torch"].startswith("2.13.0")
        assert any(line.startswith("torch==2.13.0") for line in doc["pip"])
    assert "all nodes identical: torch 2.13.0" in " ".join(result.stdout.split())


def test_env_export_of_one_node(venv_cluster):
    cluster, inventory, _ = venv_cluster
    (cluster.dir / "envs" / "node0.yml").unlink(missing_ok=True)
    result = cluster.invoke("env-export", "--nodes", "node1", inventory=inventory, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (cluster.dir / "envs" / "node0.yml").exists()
    assert (cluster.dir / "envs" / "node1.yml").is_file()


def flip_byte(cluster: Cluster, node: str, path: str) -> None:
    """One byte in the middle of the node's file, inverted in place (same size, other bytes)."""
    size = int(cluster.ssh(node, f"stat -c %s {path}").stdout)
    byte = int(cluster.ssh(node, f"od -An -tu1 -j {size // 2} -N1 {path}").stdout)
    flip = f"printf '\\{byte ^ 0xFF:03o}' | dd of={path} bs=1 seek={size // 2} conv=notrunc"
    assert cluster.ssh(node, flip).returncode == 0
    assert int(cluster.ssh(node, f"stat -c %s {path}").stdout) == size


def test_a_corrupt_wheel_is_sent_again_and_an_interrupted_upload_removed(venv_cluster):
    cluster, _, _ = venv_cluster
    [six] = cluster.ssh("node1", f"cd {HOUSE} && ls six-*.whl").stdout.split()
    [cached] = (cluster.dir / ".ddpfleet" / "wheelhouse").glob(f"cp*/{six}")
    flip_byte(cluster, "node1", f"{HOUSE}/{six}")
    # pip reads the wheel only to install it: six out of the env, and a spec that names it
    cluster.ssh("node1", f"{ENV}/bin/python -m pip uninstall -y -q six")
    cluster.ssh("node1", f"head -c 4096 /dev/zero > {HOUSE}/torch-cut.whl.part")
    inventory = venv_inventory(cluster, "inventory-venv-six.yaml", packages=["jupyterlab", "six"])
    result, _ = bootstrap(cluster, inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    on_node = cluster.ssh("node1", f"sha256sum {HOUSE}/{six}").stdout.split()[0]
    assert on_node == hashlib.sha256(cached.read_bytes()).hexdigest()
    assert not cluster.ssh("node1", f"ls {HOUSE}").stdout.count(".part")
    assert cluster.ssh("node1", f"{ENV}/bin/python -c 'import six'").returncode == 0
