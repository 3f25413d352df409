"""`invoke health` and train's health gate on the sandbox: node0 gets the recorded-output
nvidia-smi stand-in with a fault set (tests/standins), node1 stays a CPU node."""

from __future__ import annotations

import json

from ddpfleet.health.table import HEALTH_SCHEMA
from tests.integration.conftest import ROOT, Cluster
from tests.integration.test_gpu_status import standin, table_rows
from tests.unit.test_gpu_parse import validate

ECC = "a100x8 set=ecc.errors.uncorrected.volatile.total:2@3"


def rows_of(stdout: str) -> dict[tuple[str, str], list[str]]:
    return {(row[0], row[1]): row[2:] for row in table_rows(stdout)}


def test_a_healthy_sandbox_passes(cluster: Cluster) -> None:
    r = cluster.invoke("health", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = rows_of(r.stdout)
    for node in ("node0", "node1"):
        assert rows[(node, "gpus")][:2] == ["no GPU (nvidia-smi not found)", "pass"], rows
    kept = cluster.inventory.parent / ".ddpfleet" / "health.jsonl"
    lines = [json.loads(line) for line in kept.read_text().splitlines()]
    assert {x["node"] for x in lines[-2:]} == {"node0", "node1"}


def test_a_stand_in_fault_fails_health_and_names_the_gpu(cluster: Cluster) -> None:
    with standin(cluster, ["node0"], ECC):
        r = cluster.invoke("health", timeout=120)
        j = cluster.invoke("health", "--json", timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    rows = rows_of(r.stdout)
    assert rows[("node0", "ecc")][:2] == ["GPU 3: 2 uncorrected", "fail"], rows
    assert rows[("node0", "gpus")][:2] == ["8 (inventory: not set)", "pass"]
    assert "error: health failed on 1 of 2 node(s): node0: ecc: GPU 3: 2 uncorrected" in r.stderr
    doc = json.loads(j.stdout)
    validate(doc, HEALTH_SCHEMA)
    verdicts = {n["node"]: n["verdict"] for n in doc["nodes"]}
    assert verdicts["node0"] == "fail" and verdicts["node1"] != "fail", verdicts
    assert j.returncode == 1


def test_train_refuses_the_faulty_node_with_its_reason(cluster: Cluster) -> None:
    code_dir = "/root/ddpfleet-health-gate-code"
    args = ["train", "--project-dir", str(ROOT), "--code-dir", code_dir, "--run-id", "t-gate"]
    with standin(cluster, ["node0"], ECC):
        r = cluster.invoke(*args, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "health gate refused 1 of 2 node(s); nothing was started" in r.stderr
    assert "node0: ecc: GPU 3: 2 uncorrected; fix: drain the node" in r.stderr
    assert "node1:" not in r.stderr
    for node in ("node0", "node1"):  # nothing synced, no run started anywhere
        assert cluster.ssh(node, f"test -e {code_dir}").returncode == 1
    assert not (cluster.inventory.parent / "logs" / "t-gate").exists()
    lines = (cluster.inventory.parent / ".ddpfleet" / "health.jsonl").read_text().splitlines()
    last = [json.loads(line) for line in lines[-2:]]
    assert [(x["node"], x["source"]) for x in last] == [("node0", "train"), ("node1", "train")]
    assert last[0]["verdict"] == "fail" and last[1]["verdict"] != "fail"
