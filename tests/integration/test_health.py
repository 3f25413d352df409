"""`invoke health` and train's health gate on the sandbox: node0 gets the recorded-output
nvidia-smi stand-in with a fault set (tests/standins), node1 stays a CPU node."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from ddpfleet.health.table import HEALTH_SCHEMA
from tests.integration.conftest import ROOT, Cluster, Four
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


def test_quick_checks_never_fail_a_healthy_node_run_after_run(cluster: Cluster) -> None:
    for _ in range(3):
        r = cluster.invoke("health", "--json", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        doc = json.loads(r.stdout)
        rows = [(n["node"], c["check"], c["verdict"]) for n in doc["nodes"] for c in n["checks"]]
        assert [row for row in rows if row[2] == "fail"] == [], rows
        assert {(n, v) for n, c, v in rows if c == "interface"} == {
            ("node0", "pass"), ("node1", "pass")}, rows  # fmt: skip


# --- the interface NCCL and gloo would use ------------------------------------------------------

DECOYS = [  # what docker leaves on a host: its bridge, and a container's veth with an address
    ["ip", "link", "add", "docker0", "type", "bridge"],
    ["ip", "addr", "add", "172.17.0.1/16", "dev", "docker0"],
    ["ip", "link", "set", "docker0", "up"],
    ["ip", "link", "add", "veth9d0", "type", "veth", "peer", "name", "veth9d1"],
    ["ip", "addr", "add", "192.168.77.1/24", "dev", "veth9d0"],
    ["ip", "link", "set", "veth9d0", "up"],
    ["ip", "link", "set", "veth9d1", "up"],
]


def test_decoy_interfaces_are_never_chosen_and_one_on_the_way_fails(cluster: Cluster) -> None:
    for argv in DECOYS:
        netns(cluster, "node1", *argv)
    master, me = cluster.address("node0"), cluster.address("node1")
    try:
        r = cluster.invoke("health", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert rows_of(r.stdout)[("node1", "interface")][:2] == [
            f"eth0 {me} (NCCL and gloo, as train sets them)", "pass"]  # fmt: skip
        gate = cluster.invoke(
            "train", "--project-dir", str(ROOT), "--run-id", "t-ifname", "--dry-run",
            "--env", "NCCL_SOCKET_IFNAME=veth", timeout=120)  # fmt: skip
        assert gate.returncode == 1, gate.stdout + gate.stderr
        assert "health gate refused 2 of 2 node(s)" in gate.stderr
        lines = gate.stderr.splitlines()  # a line per refused node, not one squashed line
        assert any(line.startswith("  node1: interface: NCCL would use veth9d0, which no other "
                                   "node reaches") for line in lines), gate.stderr  # fmt: skip
        assert any(line.startswith("  node0: interface: NCCL finds no interface")
                   for line in lines), gate.stderr  # fmt: skip
        netns(cluster, "node1", "ip", "route", "add", f"{master}/32", "dev", "docker0")
        r = cluster.invoke("health", "--json", timeout=120)
        assert r.returncode == 1, r.stdout + r.stderr
        got = {(n["node"], c["check"]): c for n in json.loads(r.stdout)["nodes"]
               for c in n["checks"]}  # fmt: skip
        assert got[("node0", "interface")]["verdict"] == "pass"
        bad = got[("node1", "interface")]
        assert (bad["value"], bad["verdict"]) == (
            "NCCL and gloo would use docker0, which no other node reaches by (as train sets them)",
            "fail",
        )
        assert bad["fix"].endswith("--env NCCL_SOCKET_IFNAME==eth0 --env GLOO_SOCKET_IFNAME=eth0")
    finally:
        netns(cluster, "node1", "ip", "link", "del", "veth9d0")
        netns(cluster, "node1", "ip", "link", "del", "docker0")  # and the route through it
    again = cluster.invoke("health", timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr


# --- --deep: all_reduce bandwidth between nodes ---------------------------------------------------

SLOW = ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "20mbit", "burst", "32kbit",
        "latency", "400ms"]  # fmt: skip


@pytest.fixture(scope="module")
def four(grown_four: Four, tmp_path_factory) -> Iterator[Cluster]:
    """The session's sandbox grown to 4 nodes with the training env (conftest.py), lent with an
    inventory of its own: a ring of 4 meets every node twice, in two rounds.

    Its health.busbw_ratio is 0.1, not the default 0.8: the sandbox's nodes share this
    machine's two cores with each other and the other tests, and healthy pairs measured 0.15 to
    0.7 GB/s in one run; the tbf-slowed link is ~0.0025 GB/s, two hundred times below."""
    with grown_four.lend(tmp_path_factory.mktemp("deep"), health={"busbw_ratio": 0.1}) as c:
        yield c


def netns(c: Cluster, node: str, *argv: str) -> None:
    ns = f"{c.data['sandbox']['prefix']}-{node}"
    subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, capture_output=True)


GPU_CHECKS = ("gemm", "memory", "allreduce in node")  # deepgpu's rows, a node without CUDA


def allreduce_rows(stdout: str) -> dict[str, list[str]]:
    return {node: rest for (node, check), rest in rows_of(stdout).items() if check == "allreduce"}


@pytest.mark.timeout(1200)  # first in a session, its fixture bootstraps 4 nodes (6-7 min)
def test_deep_names_the_node_whose_link_is_slowed_and_no_other(four: Cluster) -> None:
    healthy = [four.invoke("health", "--deep", timeout=300) for _ in range(2)]
    for r in healthy:  # zero fails on healthy nodes, run after run
        assert r.returncode == 0, r.stdout + r.stderr
        assert {v[1] for v in allreduce_rows(r.stdout).values()} == {"pass"}, r.stdout
    gpu_rows = {k: v for k, v in rows_of(healthy[0].stdout).items() if k[1] in GPU_CHECKS}
    assert len(gpu_rows) == 4 * len(GPU_CHECKS), healthy[0].stdout  # driverless: "no GPU", pass
    assert {(v[0], v[1]) for v in gpu_rows.values()} == {("no GPU (nvidia-smi not found)", "pass")}
    netns(four, "node2", *SLOW)
    try:
        began = time.monotonic()
        slow = four.invoke("health", "--deep", timeout=300)
        took = time.monotonic() - began
    finally:
        netns(four, "node2", "tc", "qdisc", "del", "dev", "eth0", "root")
    rows = allreduce_rows(slow.stdout)
    assert slow.returncode == 1, slow.stdout + slow.stderr
    assert {n: v[1] for n, v in rows.items()} == {
        "node0": "pass", "node1": "pass", "node2": "fail", "node3": "pass"}, slow.stdout  # fmt: skip
    assert "health failed on 1 of 4 node(s): node2: allreduce: busbw" in slow.stderr
    print(f"measured: health --deep on 4 sandbox nodes, one slowed: {took:.1f}s")
    again = four.invoke("health", "--deep", timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr


def test_deep_probes_gpus_where_nvidia_smi_answers_and_fails_cuda_torch_cannot_use(four) -> None:
    """node1 gets the stand-in nvidia-smi (8 A100s) while its torch has no CUDA: the GPU probe
    runs there (deep_node.py over SSH, in the env's python) and fails node1's cuda row, the
    GPU operator's false "Ready"; the driverless nodes pass as "no GPU", unprobed."""
    with standin(four, ["node1"], "a100x8"):
        r = four.invoke("health", "--deep", "--json", timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    validate(doc, HEALTH_SCHEMA)
    got = {(n["node"], c["check"]): c for n in doc["nodes"] for c in n["checks"]}
    assert {k for k, c in got.items() if c["verdict"] == "fail"} == {("node1", "cuda")}, got
    assert got[("node1", "cuda")]["value"] == (
        "torch sees no GPU (torch.cuda.is_available() is False), but the node has 8"
    )
    assert got[("node1", "cuda")]["fix"].startswith("torch cannot use the GPUs")
    for node in ("node0", "node2", "node3"):
        assert got[(node, "gemm")]["value"] == "no GPU (nvidia-smi not found)"
