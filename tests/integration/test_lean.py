"""The installed command's lean path (ddpfleet/__main__.py): with a warm connection keeper,
`ddpfleet ping` and `ddpfleet gpu-status [--json]` skip Invoke, and print and exit exactly as the
full tasks do, on real nodes in the cloud shape (login ubuntu + passwordless sudo), a stopped
node included; with no keeper, or a flag it does not take, the full Program runs."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ddpfleet import inventory as inv
from ddpfleet.ssh import kept
from ddpfleet.ssh.connection import Fleet
from tests.integration.conftest import (
    PREFIX,
    ROOT,
    Cluster,
    sandbox,
    second_subnet,
    write_inventory,
)

STANDINS = ROOT / "tests" / "standins"
STANDIN_DIR = "usr/local/share/ddpfleet-standin"  # as tests/integration/test_gpu_status.py


def install_standin_sudo(inventory: Path, selection: str) -> None:
    """The stand-in nvidia-smi on every node, written as root through the login user's sudo
    (test_gpu_status.py's install needs a root login): one tar on stdin per node."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))

        for f in sorted((STANDINS / "recordings").iterdir()):
            add(f"{STANDIN_DIR}/recordings/{f.name}", f.read_bytes())
        add("usr/local/bin/nvidia-smi", (STANDINS / "nvidia-smi").read_bytes(), 0o755)
        add(
            "etc/ddpfleet-standin-gpu",
            f"{selection} recordings=/{STANDIN_DIR}/recordings\n".encode(),
        )
    data = buf.getvalue()
    with Fleet(inv.load(inventory)) as fleet:
        results = fleet.map(lambda c: c.run(["tar", "-xf", "-", "-C", "/"], stdin=data, root=True))
    assert all(getattr(r, "ok", False) for r in results.values()), results


@pytest.fixture(scope="module")
def cloud(tmp_path_factory) -> Iterator[Cluster]:
    """2 nodes in the default cloud shape, kept connections on, 8 recorded A100s each."""
    directory = tmp_path_factory.mktemp("lean")
    path = write_inventory(directory, prefix=PREFIX + "l", subnet=second_subnet(), cloud=True)
    data = yaml.safe_load(path.read_text())
    data["ssh"]["persist"] = 120  # kept connections on: the lean path's subject
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    c = Cluster(directory, path)
    with sandbox(c, "--sudo", "nopasswd"):
        install_standin_sudo(path, "a100x8")
        try:
            yield c
        finally:
            c.invoke("disconnect")


def ddpfleet(c: Cluster, *args: str, importtime: bool = False) -> subprocess.CompletedProcess:
    """`ddpfleet ARGS` as installed (python -m ddpfleet: the same main()), from the project
    directory, this checkout's code first on the path."""
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run(
        [sys.executable, *flags, "-m", "ddpfleet", *args],
        cwd=c.dir,
        env=c.env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )


def imported(r: subprocess.CompletedProcess) -> set[str]:
    """The modules a run with -X importtime loaded."""
    return {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if "|" in line}


def warm(c: Cluster) -> Path:
    """A keeper holding both nodes' connections (the first command starts it)."""
    sock = kept.socket_path(inv.load(c.inventory))
    if not (sock.exists() and kept.warm(inv.load(c.inventory))):
        assert c.invoke("ping").returncode == 0
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert time.monotonic() < deadline, "no keeper started"
            time.sleep(0.05)
    return sock


def cells(out: str, *drop: str) -> list[list[str]]:
    """A table's rows as cells (rich's box lines gone), without the columns `drop`."""
    rows = [[x.strip() for x in line.split("│")[1:-1]] for line in out.splitlines() if "│" in line]
    head = [x.strip() for x in next(line for line in out.splitlines() if "┃" in line).split("┃")]
    gone = {head[1:-1].index(name) for name in drop}
    return [[cell for i, cell in enumerate(row) if i not in gone] for row in rows]


# what changes from one ping to the next: the round trip, and the disk the box shares
CHANGING = ("rtt ms", "free disk")


def test_a_warm_ping_skips_invoke_and_prints_what_the_task_prints(cloud: Cluster):
    warm(cloud)
    lean = ddpfleet(cloud, "ping", "--nodes", "node1,node0")
    full = cloud.invoke("ping", "--nodes", "node1,node0")
    assert (lean.returncode, lean.stderr) == (full.returncode, full.stderr) == (0, "")
    assert cells(lean.stdout, *CHANGING) == cells(full.stdout, *CHANGING)
    assert [r[0] for r in cells(lean.stdout)] == ["node1", "node0"]
    loaded = imported(ddpfleet(cloud, "ping", importtime=True))
    assert "ddpfleet.ping" in loaded
    # to a pipe the table is plaintable's (rich's own drawing, tests/unit/test_plaintable.py)
    assert not loaded & {"invoke", "paramiko", "fabric", "ddpfleet.cli.tasks", "rich"}, loaded


def test_a_warm_gpu_status_table_and_json_are_the_tasks_own(cloud: Cluster):
    warm(cloud)
    lean = ddpfleet(cloud, "gpu-status", "--exclude", "node0")
    full = cloud.invoke("gpu-status", "--exclude", "node0")
    assert (lean.returncode, lean.stdout, lean.stderr) == (full.returncode, full.stdout, "")
    assert "A100" in lean.stdout and "node0" not in lean.stdout
    lean = ddpfleet(cloud, "gpu-status", "--json", "--inventory", str(cloud.inventory))
    full = cloud.invoke("gpu-status", "--json")
    docs = [yaml.safe_load(r.stdout) for r in (lean, full)]
    for d in docs:
        d.pop("time")
    assert lean.returncode == full.returncode == 0 and docs[0] == docs[1]
    assert docs[0]["totals"]["gpus"] == 16
    loaded = imported(ddpfleet(cloud, "gpu-status", "--json", importtime=True))
    assert "ddpfleet.gpustatus" in loaded
    # --json draws no table: not even rich is loaded
    assert not loaded & {"invoke", "paramiko", "rich", "ddpfleet.report"}, loaded


RUN_ID = "20261206-120000-lean"


def as_root(c: Cluster, node: str, script: str) -> str:
    """`script` as root on the node (the login user's passwordless sudo); its stdout."""
    with Fleet(inv.load(c.inventory, node)) as fleet:
        (r,) = fleet.map(lambda conn: conn.run(script, root=True)).values()
    assert getattr(r, "ok", False), r
    return r.stdout


def test_gpu_status_probes_as_root_in_one_keeper_request_per_node(cloud: Cluster):
    """The probe runs as root where sudo allows (root's process shows its run id, which
    /proc/PID/environ shows root only), and that costs one keeper request per node: the run
    decides the escalation itself (root=IF_ABLE), no separate escalation request."""
    sock = warm(cloud)
    pid = as_root(
        cloud,
        "node0",
        f"DDPFLEET_RUN_ID={RUN_ID} setsid sleep 600 >/dev/null 2>&1 </dev/null & echo $!",
    ).strip()
    config = f"a100x8 recordings=/{STANDIN_DIR}/recordings"
    as_root(cloud, "node0", f"echo '{config} pids={pid},{pid}' >/etc/ddpfleet-standin-gpu")
    try:
        before = kept.ask(sock, {"op": "stats"})["asked"]
        lean = ddpfleet(cloud, "gpu-status", "--json")
        after = kept.ask(sock, {"op": "stats"})["asked"]
        asked = {op: n - before.get(op, 0) for op, n in after.items() if op != "stats"}
        assert {op: n for op, n in asked.items() if n} == {"open": 1, "run": 2}, asked
        full = cloud.invoke("gpu-status", "--json")
        docs = [yaml.safe_load(r.stdout) for r in (lean, full)]
        for d in docs:
            d.pop("time")
        assert lean.returncode == full.returncode == 0 and docs[0] == docs[1]
        (app,) = docs[0]["nodes"][0]["gpus"][0]["processes"]
        assert (app["pid"], app["user"], app["run_id"]) == (int(pid), "root", RUN_ID)
    finally:
        as_root(cloud, "node0", f"kill {pid}; echo '{config}' >/etc/ddpfleet-standin-gpu")


def test_a_stopped_node_fails_both_paths_alike(cloud: Cluster):
    warm(cloud)
    assert cloud.invoke("sandbox.stop", "--nodes", "node1").returncode == 0
    try:
        for args in (["ping"], ["gpu-status"], ["gpu-status", "--json"]):
            lean = ddpfleet(cloud, *args)
            full = cloud.invoke(*args)
            assert lean.returncode == full.returncode == 1, (args, lean.stderr)
            assert lean.stderr == full.stderr and lean.stderr.startswith("error: ")
            assert "node1" in lean.stderr and lean.stderr.count("\n") == 1
            if args == ["ping"]:
                assert cells(lean.stdout, *CHANGING) == cells(full.stdout, *CHANGING)
            elif args == ["gpu-status"]:
                assert lean.stdout == full.stdout
    finally:
        assert cloud.invoke("sandbox.start", "--nodes", "node1").returncode == 0


def test_without_a_keeper_or_with_other_flags_the_full_program_runs(cloud: Cluster):
    warm(cloud)
    r = ddpfleet(cloud, "ping", "-n", "node0", importtime=True)  # a short flag: Invoke's
    assert r.returncode == 0 and "invoke" in imported(r)
    r = ddpfleet(cloud, "ping", "--nodes", "nodeX")  # a bad inventory choice: the task says it
    assert r.returncode == 1 and r.stderr.startswith("error: --nodes: unknown node 'nodeX'"), (
        r.stderr
    )
    assert cloud.invoke("disconnect").returncode == 0
    r = ddpfleet(cloud, "ping", importtime=True)  # no keeper: direct, and one started
    assert r.returncode == 0 and {"invoke", "paramiko"} <= imported(r)


def test_a_closed_pipe_ends_the_lean_path_quietly(cloud: Cluster):
    """`ddpfleet ping | true`: the reader is gone before Python has started; exit 1, no
    traceback, as the tasks end (cli/common.py)."""
    warm(cloud)
    for args in ("ping", "gpu-status --json", "gpu-status"):
        shell = f'{sys.executable} -m ddpfleet {args} | true; echo "${{PIPESTATUS[0]}}"'
        r = subprocess.run(
            ["bash", "-c", shell],
            cwd=cloud.dir,
            env=cloud.env(PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (r.stdout.strip(), r.stderr) == ("1", ""), (args, r.stderr)
