"""`invoke doctor` on the sandbox: what should pass passes (SSH, sudo, env with torch, port,
clocks, disk, TCP), and a driver below the minimum, a taken master port, unequal GPU counts and
a stopped node each give their fail line. GPUs come from the nvidia-smi stand-in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import Cluster
from tests.integration.test_gpu_status import select, standin

# Its own env path, so the bootstrap tests elsewhere still start from a node without one.
ENV = "/opt/ddpfleet/doctor-venv"
CACHE = "/var/cache/ddpfleet"  # where the wheelhouse goes on a node
PYTHON_ENV = {"manager": "venv", "path": ENV, "torch": "torch==2.13.0", "index_url": "",
              "packages": [], "wheelhouse": True}  # fmt: skip
PORT = 29500  # cluster.master_port of the sandbox inventory
NODES = ("node0", "node1")


@pytest.fixture(scope="module")
def doctored(cluster: Cluster) -> Iterator[tuple[Cluster, Path]]:
    """The cluster with a torch env (venv + wheelhouse) and an inventory that points at it;
    afterwards the nodes are as they were (later tests expect no env and no wheel cache)."""
    data = cluster.data
    data["python_env"] = PYTHON_ENV
    inventory = cluster.dir / "inventory-doctor.yaml"
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    ours = [ENV] + [CACHE] * all(cluster.ssh(n, f"test -e {CACHE}").returncode for n in NODES)
    try:
        r = cluster.invoke("bootstrap", "--roles", "venv_env", inventory=inventory, timeout=1800)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        yield cluster, inventory
    finally:
        for node in NODES:
            assert cluster.ssh(node, f"rm -rf {' '.join(ours)}").returncode == 0


def doctor(doctored: tuple[Cluster, Path]) -> tuple[int, dict, str]:
    """(exit code, {(node, check): (status, detail, fix)}, stderr) of one `invoke doctor`."""
    cluster, inventory = doctored
    r = cluster.invoke("doctor", inventory=inventory, timeout=300)
    return r.returncode, checks_of(r.stdout), r.stderr


def checks_of(stdout: str) -> dict[tuple[str, str], tuple[str, str, str]]:
    """The table as {(node, check): (status, detail, fix)}; wrapped cells joined by a space."""
    rows: dict[tuple[str, str], list[str]] = {}
    node = key = None
    for line in stdout.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.split("│")[1:-1]]
        node = cells[0] or node
        if cells[1]:
            key = (node, cells[1])
            rows[key] = cells[2:]
        elif key is not None:
            rows[key] = [f"{a} {b}".strip() for a, b in zip(rows[key], cells[2:])]
    return {k: (v[0], v[1], v[2]) for k, v in rows.items()}


def statuses(checks: dict) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for (node, check), (status, _, _) in checks.items():
        out.setdefault(node, {})[check] = status
    return out


def test_a_ready_cpu_cluster_passes(doctored) -> None:
    code, checks, err = doctor(doctored)
    assert code == 0, (checks, err)
    for node in NODES:
        got = statuses(checks)[node]
        assert got == {"ssh": "pass", "sudo": "pass", "driver": "warn", "gpus": "pass",
                       "env": "pass", "versions": "pass", "master port": "pass",
                       "clock": "pass", "disk": "pass", "tcp": "pass"}, (node, got)  # fmt: skip
        assert checks[(node, "env")][1].startswith("torch 2.13.0")
        assert checks[(node, "driver")][1] == "CPU only (nvidia-smi not found)"
        other = "node1" if node == "node0" else "node0"
        assert checks[(node, "tcp")][1] == f"reached the SSH port of {other}"
    assert checks[("node0", "master port")][1] == f"{PORT} free"
    assert checks[("node1", "master port")][1] == f"reached node0:{PORT}"
    assert checks[("node0", "disk")][1].endswith(f"GiB free at {ENV}")


def test_unequal_gpu_counts(doctored) -> None:
    cluster, _ = doctored
    with standin(cluster, ["node0"], "a100x8"):
        code, checks, err = doctor(doctored)
    assert code == 1 and "node1 gpus" in err
    status, detail, fix = checks[("node1", "gpus")]
    assert (status, detail) == ("fail", "0 GPUs; node0 has 8") and "--nproc-per-node" in fix
    assert checks[("node0", "gpus")][:2] == ("pass", "8 GPUs; differs on node1")
    assert checks[("node0", "driver")][:2] == ("pass", "535.161.08 >= 520.61.05 (CUDA 11.8)")
    status, detail, fix = checks[("node0", "env")]  # a CPU torch on a node with GPUs
    assert status == "fail" and detail.startswith("torch 2.13.0"), detail
    assert detail.endswith("is a CPU build (torch.version.cuda is None) on a node with 8 GPUs")
    assert "pin a CUDA build in python_env (torch, index_url" in fix and "node0 env" in err


def test_driver_below_the_minimum(doctored) -> None:
    cluster, _ = doctored
    with standin(cluster, list(NODES), "v100x4"):
        for node in NODES:
            select(cluster, node, "v100x4 driver=418.67")
        code, checks, err = doctor(doctored)
    assert code == 1 and "node0 driver" in err and "node1 driver" in err  # env fails too
    for node in NODES:
        status, detail, fix = checks[(node, "driver")]
        assert (status, detail) == ("fail", "418.67 < 450.80.02: too old for CUDA 11.8")
        assert fix == "install an NVIDIA driver >= 520.61.05, then reboot"
        assert checks[(node, "gpus")][:2] == ("pass", "4 GPUs on every node")


@pytest.fixture
def port_taken(doctored) -> Iterator[str]:
    """Something else listening on node0's master port (its pid), killed after."""
    cluster, _ = doctored
    # SO_REUSEADDR, as torchrun's store sets it: earlier tests' TIME_WAITs must not stop it
    listen = ("import socket, time; s = socket.socket(); "
              "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
              f"s.bind(('', {PORT})); s.listen(); time.sleep(600)")  # fmt: skip
    r = cluster.ssh("node0", f'setsid python3 -c "{listen}" >/dev/null 2>&1 </dev/null & '
                    f"echo $!; for i in $(seq 50); do ss -Htln 'sport = :{PORT}' | grep . "
                    "&& break; sleep 0.1; done")  # fmt: skip
    pid, *listening = r.stdout.split("\n")
    assert any(f":{PORT}" in line for line in listening), r.stdout + r.stderr
    try:
        yield pid
    finally:
        cluster.ssh("node0", f"kill {pid}")


def test_master_port_taken(doctored, port_taken: str) -> None:
    code, checks, err = doctor(doctored)
    assert code == 1 and "node0 master port" in err
    status, detail, fix = checks[("node0", "master port")]
    assert (status, detail) == ("fail", f"{PORT} in use: Address already in use")
    assert f"ss -ltnp 'sport = :{PORT}'" in fix and "--master-port" in fix
    assert checks[("node1", "master port")][:2] == ("warn", f"node0:{PORT} not tested")


def test_a_stopped_node(doctored) -> None:
    cluster, _ = doctored
    assert cluster.invoke("sandbox.stop", "--nodes", "node1", timeout=120).returncode == 0
    try:
        code, checks, err = doctor(doctored)
    finally:
        assert cluster.invoke("sandbox.start", "--nodes", "node1", timeout=300).returncode == 0
    assert code == 1 and "node1 ssh" in err and "node0 tcp" in err
    assert [check for node, check in checks if node == "node1"] == ["ssh"]
    status, detail, fix = checks[("node1", "ssh")]
    assert status == "fail" and detail.startswith("connection refused by ") and "ping" in fix
    assert checks[("node0", "tcp")][:2] == ("fail", "cannot connect to node1: Connection refused")
    assert checks[("node0", "master port")][0] == "pass"  # no worker left to reach it
