"""`invoke gpu-status` on the sandbox: node0 with the recorded-output nvidia-smi stand-in
(tests/standins) on its PATH, node1 without one. The helpers here also serve test_doctor.py and
bench/gpu_status.py."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from ddpfleet import inventory as inv
from ddpfleet.gpustatus import REPORT_SCHEMA
from ddpfleet.ssh.connection import Conn, Fleet
from tests.integration.conftest import INVOKE, Cluster
from tests.unit.test_gpu_parse import validate

STANDINS = Path(__file__).resolve().parents[1] / "standins"
STANDIN_DIR = "/usr/local/share/ddpfleet-standin"  # the recordings, on the node
STANDIN_PATHS = ("/usr/local/bin/nvidia-smi", "/etc/ddpfleet-standin-gpu", STANDIN_DIR)
RUN_ID = "20260106-120000-gpus"


def _install(conn: Conn, selection: str) -> None:
    conn.run(["mkdir", "-p", f"{STANDIN_DIR}/recordings"])
    for f in sorted((STANDINS / "recordings").iterdir()):
        conn.put_bytes(f.read_bytes(), f"{STANDIN_DIR}/recordings/{f.name}", 0o644)
    conn.put_bytes((STANDINS / "nvidia-smi").read_bytes(), "/usr/local/bin/nvidia-smi", 0o755)
    conn.put_bytes(standin_config(selection).encode(), "/etc/ddpfleet-standin-gpu", 0o644)


def standin_config(selection: str) -> str:
    """/etc/ddpfleet-standin-gpu: the recording and overrides, e.g. 'a100x8 driver=418.67'."""
    return f"{selection} recordings={STANDIN_DIR}/recordings\n"


def install_standin(inventory: Path, nodes: Sequence[str], selection: str) -> None:
    """The stand-in nvidia-smi on these nodes' PATH, answering from `selection`."""
    with Fleet(inv.load(inventory, ",".join(nodes))) as fleet:
        results = fleet.map(lambda conn: _install(conn, selection))
    assert all(r is None for r in results.values()), results


def remove_standin(inventory: Path, nodes: Sequence[str]) -> None:
    with Fleet(inv.load(inventory, ",".join(nodes))) as fleet:
        results = fleet.run(["rm", "-rf", *STANDIN_PATHS])
    assert all(getattr(r, "ok", False) for r in results.values()), results


@contextmanager
def standin(cluster: Cluster, nodes: Sequence[str], selection: str) -> Iterator[None]:
    install_standin(cluster.inventory, nodes, selection)
    try:
        yield
    finally:  # other tests see GPU-less nodes again
        remove_standin(cluster.inventory, nodes)


def select(cluster: Cluster, node: str, selection: str) -> None:
    """Another recording (or override) for a node that has the stand-in."""
    command = f"printf '%s' '{standin_config(selection).strip()}' >/etc/ddpfleet-standin-gpu"
    assert cluster.ssh(node, command).returncode == 0


# --- the table and --json ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_node0(cluster: Cluster) -> Iterator[int]:
    """node0 with 8 recorded A100s whose two apps are a live process of a ddpfleet run."""
    start = cluster.ssh("node0", f"DDPFLEET_RUN_ID={RUN_ID} setsid sleep 600 "
                        ">/dev/null 2>&1 </dev/null & echo $!")  # fmt: skip
    pid = int(start.stdout.strip())
    with standin(cluster, ["node0"], "a100x8"):
        select(cluster, "node0", f"a100x8 pids={pid},{pid}")
        try:
            yield pid
        finally:
            cluster.ssh("node0", f"kill {pid}")


def table_rows(stdout: str) -> list[list[str]]:
    """The first line of every table row, as cells."""
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in stdout.splitlines()
            if line.startswith("│")]  # fmt: skip
    return [row for row in rows if row[0]]


def test_table_gpus_and_a_no_driver_row(cluster: Cluster, gpu_node0: int) -> None:
    r = cluster.invoke("gpu-status", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = table_rows(r.stdout)
    node0 = [row for row in rows if row[0] == "node0"]
    assert [row[1] for row in node0] == [str(i) for i in range(8)]
    assert node0[0][2:7] == ["NVIDIA A100-SXM4-80GB", "97 %", "29.8 / 80.0 GiB", "61 C",
                             "312 W / 400 W"]  # fmt: skip
    assert node0[0][7].startswith(f"{gpu_node0} root 29.8 GiB sleep 600")
    assert f"[run {RUN_ID}]" in r.stdout
    (node1,) = [row for row in rows if row[0] == "node1"]
    assert node1[1:3] == ["-", "no NVIDIA driver: nvidia-smi not found"]
    assert rows[-1][:5] == ["total", "8", "2 busy, 6 idle", "", "59.6 / 640.0 GiB"]


def test_a_driver_without_devices_is_its_own_row(cluster: Cluster, gpu_node0: int) -> None:
    with standin(cluster, ["node1"], "no_devices"):
        r = cluster.invoke("gpu-status", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    (node1,) = [row for row in table_rows(r.stdout) if row[0] == "node1"]
    assert node1[1] == "-" and node1[2].startswith("no GPU: the driver is loaded"), node1
    assert "reboot" not in r.stdout


def test_json_matches_the_documented_schema(cluster: Cluster, gpu_node0: int) -> None:
    r = cluster.invoke("gpu-status", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    validate(doc, REPORT_SCHEMA)
    node0, node1 = doc["nodes"]
    assert len(node0["gpus"]) == 8 and node0["gpus"][0]["uuid"].startswith("GPU-9126b67c")
    (app,) = node0["gpus"][0]["processes"]
    assert (app["pid"], app["user"], app["run_id"]) == (gpu_node0, "root", RUN_ID)
    assert (node1["reachable"], node1["exit_code"], node1["error"]) == (
        True, 127, "nvidia-smi not found")  # fmt: skip
    assert doc["totals"]["gpus"] == 8 and doc["totals"]["no_gpu"] == 1


def test_watch_refreshes_over_one_connection(cluster: Cluster, gpu_node0: int) -> None:
    before = {n: cluster.logins(n) for n in ("node0", "node1")}
    watch = subprocess.Popen([*INVOKE, "gpu-status", "--watch", "0.3", "--json"], cwd=cluster.dir,
                             env=cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        lines = [watch.stdout.readline() for _ in range(4)]  # type: ignore[union-attr]
    finally:
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err
    docs = [json.loads(line) for line in lines + out.splitlines()]
    assert len(docs) >= 4 and all(d["totals"]["gpus"] == 8 for d in docs)
    after = {n: cluster.logins(n) for n in ("node0", "node1")}
    # one login per node for every refresh; the other new one is the `before` query itself
    assert {n: after[n] - before[n] - 1 for n in after} == {"node0": 1, "node1": 1}


def test_a_stopped_node_is_unreachable_and_the_exit_non_zero(cluster: Cluster,
                                                              gpu_node0: int) -> None:  # fmt: skip
    stop = cluster.invoke("sandbox.stop", "--nodes", "node1", timeout=120)
    assert stop.returncode == 0, stop.stderr
    try:
        table = cluster.invoke("gpu-status", timeout=60)
        as_json = cluster.invoke("gpu-status", "--json", timeout=60)
    finally:
        start = cluster.invoke("sandbox.start", "--nodes", "node1", timeout=300)
        assert start.returncode == 0, start.stderr
    assert table.returncode == 1 and as_json.returncode == 1
    (node1,) = [row for row in table_rows(table.stdout) if row[0] == "node1"]
    assert node1[2].startswith("unreachable: connection refused by ")
    assert len([row for row in table_rows(table.stdout) if row[0] == "node0"]) == 8
    assert "error: gpu-status failed on 1 of 2 node(s): node1: connection refused" in table.stderr
    doc = json.loads(as_json.stdout)
    validate(doc, REPORT_SCHEMA)
    assert doc["nodes"][1]["reachable"] is False and doc["totals"]["unqueried"] == 1
