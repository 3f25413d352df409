"""ddpfleet.doctor: every check as a table (facts in, status/message/fix out), the node-side
scripts run on this machine (sh, python3, the nvidia-smi stand-in), and the whole evaluation."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from ddpfleet import doctor, gpu
from ddpfleet import inventory as inv
from ddpfleet.doctor import Check, EnvFacts, NodeFacts, PortTest, Status
from ddpfleet.errors import (
    AuthError,
    CommandError,
    DdpfleetError,
    HostKeyChanged,
    HostKeyUnknown,
    NodeError,
    Unreachable,
)
from ddpfleet.ssh.connection import Result
from tests.unit.test_gpu_parse import STANDINS, probe

PASS, WARN, FAIL = Status.PASS, Status.WARN, Status.FAIL
NODE = inv.Node("node1", "10.0.0.11", 22, "ubuntu", None, Path("kh"), 5.0, 8)


def expect(check: Check, status: Status, *fragments: str) -> None:
    assert check.status is status, check
    for fragment in fragments:
        assert fragment in check.message + " | " + check.fix, (fragment, check)
    if status is not PASS and status is not WARN:
        assert check.fix, check  # every failure says what to do


# --- ssh and sudo ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error, status, fragments",
    [
        (None, PASS, ("ubuntu@10.0.0.11",)),
        (Unreachable("node1", "connection refused by 10.0.0.11:22; is sshd running?"), FAIL,
         ("connection refused", "invoke ping")),
        (HostKeyUnknown("node1", "10.0.0.11", "SHA256:x", "ssh-ed25519"), FAIL,
         ("invoke trust --nodes node1",)),
        (HostKeyChanged("node1", "10.0.0.11", "SHA256:a", "SHA256:b", "kh"), FAIL,
         ("HOST KEY CHANGED", "reinstalled")),
        (AuthError("node1", "authentication failed"), FAIL, ("authorized_keys",)),
    ],
)  # fmt: skip
def test_check_ssh(error, status, fragments) -> None:
    expect(doctor.check_ssh(NODE, error), status, *fragments)


@pytest.mark.parametrize(
    "uid, rc, status, fragment",
    [
        (0, None, PASS, "root"),
        (1000, 0, PASS, "passwordless sudo"),
        (1000, 1, FAIL, "asks ubuntu's password"),
        (1000, 127, FAIL, "no sudo"),
    ],
)
def test_check_sudo(uid, rc, status, fragment) -> None:
    # Issue 11: bootstrap becomes root through sudo, so a login that cannot is a failure.
    check = doctor.check_sudo(uid, rc, "ubuntu")
    expect(check, status, fragment)
    assert status is PASS or "ssh.user: root" in check.fix
    assert "NOPASSWD" not in check.fix


def test_check_sudo_with_a_password_given_or_become_none() -> None:
    expect(doctor.check_sudo(1000, 1, "ubuntu", password_given=True), PASS, "with a password")
    expect(doctor.check_sudo(1000, 0, "ubuntu", become="none"), FAIL, "bootstrap needs root")


@pytest.mark.parametrize(
    "ids, status, fragment",
    [
        ({"node0": "2000:2000", "node1": "2000:2000"}, PASS, "uid:gid 2000:2000"),
        ({"node0": "", "node1": "2000:2000"}, FAIL, "no user train"),
        ({"node0": "1001:1001", "node1": "2000:2000"}, FAIL, "node1 2000:2000"),
    ],
)
def test_check_train_user_same_ids_everywhere(ids, status, fragment) -> None:
    expect(doctor.check_train_user("node0", ids, "2000:2000", "train"), status, fragment)


# --- driver and GPUs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "selection, expected, status, fragment",
    [
        ("a100x8", 8, PASS, "535.161.08 >= 520.61.05"),
        ("a100x8 driver=520.61.05", 8, PASS, "520.61.05 >="),
        ("a100x8 driver=520.56.06", 8, WARN, "minor-version compatibility"),
        ("v100x4", 4, WARN, "470.57.02: CUDA 11.8 through minor-version"),
        ("v100x4 driver=450.80.02", 4, WARN, "450.80.02"),
        ("v100x4 driver=450.51.06", 4, FAIL, "450.51.06 < 450.80.02"),
        ("v100x4 driver=418.67", 4, FAIL, "418.67 < 450.80.02: too old for CUDA 11.8"),
        ("no_driver", None, WARN, "CPU only (NVIDIA-SMI has failed"),
        ("no_driver", 0, WARN, "CPU only"),
        ("no_driver", 8, FAIL, "gpus: 8 in the inventory, but NVIDIA-SMI has failed"),
        ("fail=12", None, WARN, "CPU only (NVIDIA-SMI couldn't find libnvidia-ml.so"),
        ("fail=15", None, FAIL, "nvidia-smi exit 15: Unable to determine the device handle"),
        ("no_devices", None, WARN, "CPU only: the driver lists no device (No devices were found)"),
        ("a100x8 fail=6", 8, FAIL, "gpus: 8 in the inventory, but the driver lists no device"),
    ],
)
def test_check_driver(selection, expected, status, fragment) -> None:
    check = doctor.check_driver(probe(selection), expected)
    expect(check, status, fragment)
    if status is not PASS and selection.startswith(("a100", "v100")) and "fail=6" not in selection:
        assert ">= 520.61.05" in check.fix
    if "fail=6" in selection:  # a driver without devices: no reboot cures it
        assert "reboot" not in check.fix and "lspci" in check.fix


def test_check_driver_absent_binary() -> None:
    expect(doctor.check_driver(gpu.NodeGpus((), gpu.NOT_FOUND, 127), None), WARN, "not found")
    expect(doctor.check_driver(gpu.NodeGpus((), gpu.NOT_FOUND, 127), 2), FAIL, "install an")


@pytest.mark.parametrize(
    "name, counts, expected, status, fragment",
    [
        ("node0", {"node0": 8, "node1": 8}, None, PASS, "8 GPUs on every node"),
        ("node0", {"node0": 8}, 8, PASS, "8 GPUs"),
        ("node0", {"node0": 0, "node1": 0}, None, PASS, "0 GPUs on every node"),
        # a tie goes to the master (node0): node1 is the odd one out
        ("node1", {"node0": 8, "node1": 0}, None, FAIL, "0 GPUs; node0 has 8"),
        ("node0", {"node0": 8, "node1": 0}, None, PASS, "8 GPUs; differs on node1"),
        # otherwise most nodes win, even against the master
        ("node0", {"node0": 4, "node1": 8, "node2": 8}, None, FAIL, "4 GPUs; node1, node2 have 8"),
        ("node1", {"node0": 8, "node1": 4}, 8, FAIL, "4 GPUs, the inventory says gpus: 8"),
        ("node1", {"node0": 8, "node1": 8}, 4, FAIL, "fix nodes.node1.gpus"),
    ],
)
def test_check_gpu_count(name, counts, expected, status, fragment) -> None:
    expect(doctor.check_gpu_count(name, counts, "node0", expected), status, fragment)


# --- env and versions --------------------------------------------------------------------------

PY = "/opt/ddpfleet/venv/bin/python"
GPU_ENV = EnvFacts(PY, True, "2.5.1", "11.8", "2.21.5", available=True, gpus=8)
CPU_ENV = EnvFacts(PY, True, "2.5.1+cpu", None, None, available=False, gpus=0)
NO_CUDA_HERE = EnvFacts(PY, True, "2.5.1", "11.8", "2.21.5", available=False, gpus=0)


@pytest.mark.parametrize(
    "env, gpus, status, fragment",
    [
        (GPU_ENV, 8, PASS, "torch 2.5.1, CUDA 11.8, NCCL 2.21.5"),
        (CPU_ENV, 0, PASS, "torch 2.5.1+cpu, CUDA -, NCCL -"),
        (CPU_ENV, 8, FAIL, "is a CPU build (torch.version.cuda is None) on a node with 8 GPUs"),
        (NO_CUDA_HERE, 8, FAIL, "torch.cuda.is_available() is False"),
        (GPU_ENV, 4, FAIL, "torch.cuda.device_count() is 8, nvidia-smi -L lists 4"),
        (EnvFacts(PY, False), 0, FAIL, f"no env: {PY} not found"),
        (EnvFacts(PY, True, error="ImportError: iJIT_NotifyEvent"), 0, FAIL,
         "import torch failed: ImportError: iJIT_NotifyEvent"),
    ],
)  # fmt: skip
def test_check_env(env, gpus, status, fragment) -> None:
    check = doctor.check_env("node1", env, gpus)
    expect(check, status, fragment)
    assert status is PASS or "invoke bootstrap --nodes node1" in check.fix


@pytest.mark.parametrize(
    "manager, fix",
    [("conda", "python_env.cpu_only: auto (or false) so the env gets pytorch-cuda"),
     ("venv", "pin a CUDA build in python_env (torch, index_url: auto gives cu118)")],
)  # fmt: skip
def test_check_env_fix_fits_the_env_manager(manager, fix) -> None:
    check = doctor.check_env("node1", CPU_ENV, 8, manager)
    expect(check, FAIL)
    assert fix in check.fix and (manager == "venv") == ("index_url" in check.fix)


V = GPU_ENV.versions
OLD = ("2.4.1", "11.8", "2.20.5")


@pytest.mark.parametrize(
    "name, versions, status, fragment",
    [
        ("node1", {"node0": V, "node1": V}, PASS, "same on every node"),
        ("node0", {"node0": V}, PASS, "one env only"),
        ("node1", {"node0": V, "node1": OLD}, FAIL,
         "torch 2.4.1, NCCL 2.20.5; node0: torch 2.5.1, CUDA 11.8, NCCL 2.21.5"),
        ("node0", {"node0": V, "node1": OLD}, PASS, "differs on node1"),
        ("node0", {"node0": OLD, "node1": V, "node2": V}, FAIL, "node1, node2: torch 2.5.1"),
        ("node1", {"node0": V, "node1": CPU_ENV.versions}, FAIL, "torch 2.5.1+cpu, CUDA -"),
    ],
)  # fmt: skip
def test_check_versions(name, versions, status, fragment) -> None:
    expect(doctor.check_versions(name, versions, "node0"), status, fragment)


# --- port, clock, disk, tcp ------------------------------------------------------------------

FREE = PortTest("node0", 29500, True, None, {"node1": None, "node2": "timed out"})
TAKEN = PortTest("node0", 29500, False, "Address already in use", {"node1": "timed out"})
UNTESTED = PortTest("node0", 29500, None, "python3 exited 127: python3: not found", {})


@pytest.mark.parametrize(
    "name, test, status, fragment",
    [
        ("node0", FREE, PASS, "29500 free"),
        ("node1", FREE, PASS, "reached node0:29500"),
        ("node2", FREE, FAIL, "cannot reach node0:29500: timed out"),
        ("node0", TAKEN, FAIL, "29500 in use: Address already in use"),
        ("node0", TAKEN, FAIL, "ss -ltnp 'sport = :29500'"),
        ("node1", TAKEN, WARN, "node0:29500 not tested"),
        ("node0", UNTESTED, WARN, "not tested: python3 exited 127"),
        ("node1", UNTESTED, WARN, "not tested"),
    ],
)
def test_check_port(name, test, status, fragment) -> None:
    expect(doctor.check_port(name, test), status, fragment)


@pytest.mark.parametrize(
    "offset, status, fragment",
    [
        (0.004, PASS, "+0.004s"),
        (-1.9, PASS, "-1.900s"),
        (-3.25, WARN, "-3.250s from this machine"),
        (29.0, WARN, "+29.000s"),
        (45.0, FAIL, "timedatectl set-ntp true"),
        (None, WARN, "could not read"),
    ],
)
def test_check_clock(offset, status, fragment) -> None:
    expect(doctor.check_clock(offset), status, fragment)


GIB = 2**20  # KiB


@pytest.mark.parametrize(
    "free, path, status, fragment",
    [
        (74 * GIB, "/opt/ddpfleet/venv", PASS, "74.0 GiB free at /opt/ddpfleet/venv"),
        (74 * GIB, "/opt", PASS, "at /opt (for /opt/ddpfleet/venv)"),
        (10 * GIB, "/opt", PASS, "10.0 GiB"),
        (10 * GIB - 1, "/opt", WARN, "10.0 GiB"),
        (2 * GIB, "/opt", WARN, "2.0 GiB"),
        (2 * GIB - 1, "/opt", FAIL, "free space on /opt"),
        (None, "", WARN, "could not read the free space under /opt/ddpfleet/venv"),
    ],
)
def test_check_disk(free, path, status, fragment) -> None:
    expect(doctor.check_disk(free, path, "/opt/ddpfleet/venv"), status, fragment)


@pytest.mark.parametrize(
    "tcp, status, fragment",
    [
        ({"node1": None}, PASS, "reached the SSH port of node1"),
        ({f"node{i}": None for i in range(1, 32)}, PASS, "all 31 other nodes"),
        ({}, PASS, "no other node"),
        ({"node1": None, "node2": "Connection refused", "node3": "timed out"}, FAIL,
         "cannot connect to node2: Connection refused; node3: timed out"),
        ("python3 not found", WARN, "not tested: python3 not found"),
    ],
)  # fmt: skip
def test_check_tcp(tcp, status, fragment) -> None:
    expect(doctor.check_tcp(tcp), status, fragment)


# --- the node-side scripts, run here -----------------------------------------------------------

FAKE_TORCH = """\
__version__ = "2.5.1"
version = type("version", (), {"cuda": "11.8"})
class cuda:
    is_available = staticmethod(lambda: True)
    device_count = staticmethod(lambda: 8)
    class nccl:
        @staticmethod
        def version():
            return (2, 21, 5)
"""


@pytest.fixture
def listening():
    """A port something listens on, and one nothing listens on."""
    with socket.socket() as up, socket.socket() as down:
        up.bind(("127.0.0.1", 0))
        up.listen()
        down.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        yield up.getsockname()[1], down.getsockname()[1]


def run_facts(tmp_path: Path, python: str, selection: str, peers, **env) -> NodeFacts:
    script = doctor.facts_script(python, str(tmp_path / "no" / "env"), peers)
    done = subprocess.run(
        ["/bin/sh", "-c", script], check=False, capture_output=True, text=True, timeout=60,
        env={"PATH": f"{STANDINS}:/usr/bin:/bin", "DDPFLEET_STANDIN_GPU": selection,
             "DDPFLEET_STANDIN_GPU_FILE": "/nonexistent", **env},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return doctor.parse_facts(done.stdout, done.stderr, python)


def test_facts_script_with_an_env_and_gpus(tmp_path, listening) -> None:
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(FAKE_TORCH)
    up, down = listening
    peers = [("node1", "127.0.0.1", up), ("node2", "127.0.0.1", down)]
    facts = run_facts(tmp_path, sys.executable, "a100x8", peers, PYTHONPATH=str(tmp_path))
    assert facts.env == EnvFacts(sys.executable, True, "2.5.1", "11.8", "2.21.5", None, True, 8)
    assert facts.tcp == {"node1": None, "node2": "Connection refused"}
    assert facts.disk_path == str(tmp_path) and facts.disk_free_kib > 0
    assert facts.uid is not None and (facts.uid == 0) == (facts.sudo_rc is None)
    assert len(facts.gpus.gpus) == 8 and facts.gpus.gpus[0].driver == "535.161.08"


def test_facts_script_without_torch_or_driver(tmp_path) -> None:
    facts = run_facts(tmp_path, "/usr/bin/python3", "no_driver", [])
    assert facts.env.present and facts.env.error == "ModuleNotFoundError: No module named 'torch'"
    assert facts.tcp == {} and facts.gpus.exit_code == 9
    missing = run_facts(tmp_path, str(tmp_path / "nothing" / "python"), "a100x8", [])
    assert missing.env == EnvFacts(str(tmp_path / "nothing" / "python"), False)


def test_parse_facts_of_a_node_that_said_little() -> None:
    facts = doctor.parse_facts("@@doctor uid 1000\n@@doctor sudo 1\n", "Segmentation fault", PY)
    assert (facts.uid, facts.sudo_rc, facts.disk_free_kib) == (1000, 1, None)
    assert facts.env.error == f"{PY} failed: Segmentation fault"
    assert facts.tcp == "the test printed nothing"
    assert "probe output not recognised" in (facts.gpus.driver_error or "")


class LocalConn:
    """Runs a node's commands on this machine: the port scripts meet on 127.0.0.1."""

    def __init__(self, name: str):
        self.name = name
        self.host = "127.0.0.1"

    def run(self, argv, check=True, timeout=None, **kw) -> Result:
        program = sys.executable if argv[0] == "python3" else argv[0]
        done = subprocess.run([program, *argv[1:]], capture_output=True, text=True,
                              timeout=timeout, check=False)  # fmt: skip
        return Result(self.name, argv[0], done.returncode, done.stdout, done.stderr, 0.0)


class LocalFleet:
    def __init__(self, names):
        self.nodes = [SimpleNamespace(name=n) for n in names]
        self.conns = {n: LocalConn(n) for n in names}

    def map(self, fn, names):
        with ThreadPoolExecutor(8) as pool:
            return dict(zip(names, pool.map(fn, [self.conns[n] for n in names])))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def test_port_test_free_and_reached() -> None:
    port = free_port()
    test = doctor.port_test(LocalFleet(["node0", "node1", "node2"]), "node0", port)
    assert test == PortTest("node0", port, True, None, {"node1": None, "node2": None})
    # The workers close first: no TIME_WAIT on the master's side to trouble a later bind.
    waits = subprocess.run(["ss", "-Htn", "state", "time-wait", f"( sport = :{port} )"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert waits.stdout == ""
    again = doctor.port_test(LocalFleet(["node0", "node1"]), "node0", port)
    assert again.free


def test_port_test_taken() -> None:
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        test = doctor.port_test(LocalFleet(["node0", "node1"]), "node0", port)
    assert (test.free, test.error) == (False, "Address already in use")
    assert test.reached["node1"] is not None  # what answered was not our listener


def test_reach_tells_a_stranger_from_our_listener() -> None:
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]

        def serve():
            conn, _ = stranger.accept()
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            conn.close()

        threading.Thread(target=serve, daemon=True).start()
        argv = ["python3", "-c", doctor._REACH, "127.0.0.1", str(port), "ab" * 8, "2"]
        answer = json.loads(LocalConn("node1").run(argv).stdout)
    assert answer == {"error": "something other than the test listener answered"}


def test_port_test_master_unreachable() -> None:
    fleet = LocalFleet(["node1"])
    fleet.nodes.insert(0, SimpleNamespace(name="node0"))
    test = doctor.port_test(fleet, "node0", 29500)
    assert test.free is None and test.error == "node0 is not reachable"


class DateConn:
    def __init__(self, skew: float):
        self.skew = skew

    def run(self, argv, **kw) -> Result:
        import time

        now = time.time() + self.skew
        return Result("n", "date", 0, f"{now:.9f}\n", "", 0.0)


@pytest.mark.parametrize("skew", [0.0, 5.5, -42.0])
def test_clock_offset(skew: float) -> None:
    assert doctor.clock_offset(DateConn(skew)) == pytest.approx(skew, abs=0.05)  # type: ignore


# --- the whole evaluation ----------------------------------------------------------------------

INVENTORY = """\
cluster: {name: t, master: node0, master_port: 29500}
python_env: {manager: venv, path: /opt/ddpfleet/venv}
nodes:
  node0: {host: 10.0.0.10, gpus: 8}
  node1: {host: 10.0.0.11}
  node2: {host: 10.0.0.12}
"""


@pytest.fixture
def inventory(tmp_path) -> inv.Inventory:
    (tmp_path / "inventory.yaml").write_text(textwrap.dedent(INVENTORY))
    return inv.load(tmp_path / "inventory.yaml", check_files=False)


def facts(selection: str = "a100x8", env: EnvFacts = CPU_ENV, **changes) -> NodeFacts:
    base = NodeFacts(
        0, None, env, 74 * GIB, "/opt/ddpfleet/venv", {}, probe(selection), "2000:2000"
    )
    return NodeFacts(**{**base.__dict__, **changes})


def test_evaluate(inventory) -> None:
    got = doctor.Gathered(
        master="node0",
        facts={
            "node0": facts(tcp={"node1": None, "node2": None}),
            "node1": facts(env=EnvFacts(PY, False), tcp={"node0": None, "node2": "timed out"}),
            "node2": Unreachable("node2", "timeout: no answer from 10.0.0.12:22 within 5s"),
        },
        clocks={"node0": 0.01, "node1": NodeError("node1", "lost")},
        port=PortTest("node0", 29500, True, None, {"node1": None, "node2": "not reachable"}),
    )
    checks = doctor.evaluate(inventory, got)
    table = {name: {c.name: c.status for c in rows} for name, rows in checks.items()}
    assert list(table["node0"]) == ["ssh", "sudo", "driver", "gpus", "env", "train user",
                                    "versions", "master port", "clock", "disk", "tcp"]  # fmt: skip
    assert table["node0"]["env"] is FAIL  # a CPU torch on 8 GPUs cannot train there
    assert set(table["node0"].values()) - {table["node0"]["env"]} == {PASS}
    assert "versions" not in table["node1"]  # no env: its own failure, no comparison
    assert (table["node1"]["env"], table["node1"]["clock"], table["node1"]["tcp"]) == (
        FAIL, WARN, FAIL)  # fmt: skip
    assert table["node1"]["gpus"] is PASS  # the same 8 as node0; node1 sets no gpus:
    assert table["node2"] == {"ssh": FAIL}  # unreachable: its ssh row only
    assert doctor.summary(checks) == "17 pass, 1 warn, 4 fail"  # + the train user, node0 and 1
    with pytest.raises(
        DdpfleetError, match=r"4 check.s. failed: node0 env, node1 env, node1 tcp, node2 ssh"
    ):
        doctor.exit_if_failed(checks)


def test_evaluate_a_node_whose_facts_did_not_come_back(inventory) -> None:
    hung = CommandError("node1", "sh -c ...", None, "timed out after 120.0s")
    port = PortTest("node0", 29500, True, None, {"node1": None})
    got = doctor.Gathered("node0", {"node0": facts(), "node1": hung, "node2": facts()}, {}, port)
    ssh, why = doctor.evaluate(inventory, got)["node1"]
    assert ssh.status is PASS
    expect(why, FAIL, "timed out after 120.0s", "by hand")


def test_evaluate_flags_the_odd_node(inventory) -> None:
    port = PortTest("node0", 29500, True, None, {"node1": None, "node2": None})
    got = doctor.Gathered("node0", {"node0": facts(), "node1": facts("v100x4"),
                                    "node2": facts("no_driver")}, {}, port)  # fmt: skip
    checks = doctor.evaluate(inventory, got)
    gpus = {name: next(c for c in rows if c.name == "gpus") for name, rows in checks.items()}
    expect(gpus["node0"], PASS, "8 GPUs; differs on node1, node2")
    expect(gpus["node1"], FAIL, "4 GPUs; node0 has 8")
    expect(gpus["node2"], FAIL, "0 GPUs; node0 has 8")


def test_render(inventory) -> None:
    checks = {"node0": [doctor.ok("ssh", "root@x"), doctor.fail("disk", "[Errno 5]", "free it")],
              "node1": [doctor.warn("sudo", "asks", "NOPASSWD")]}  # fmt: skip
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(doctor.render(checks))
    lines = console.file.getvalue().splitlines()
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if "│" in line]
    assert rows == [
        ["node0", "ssh", "pass", "root@x", ""],
        ["", "disk", "fail", "[Errno 5]", "free it"],
        ["node1", "sudo", "warn", "asks", "NOPASSWD"],
    ]
    assert lines[-2] == "1 pass, 1 warn, 1 fail"
    assert lines[-1] == (  # the link to the hardware checks
        "next: invoke health (GPU faults, the NCCL/gloo interface; --deep: all_reduce bandwidth)"
    )


def test_doctor_points_at_health_for_the_nodes_whose_gpus_fail() -> None:
    checks = {"node0": [doctor.fail("driver", "nvidia-smi exit 15: GPU is lost", "reboot")],
              "node1": [doctor.ok("driver", "535.161.08")],
              "node2": [doctor.fail("gpus", "7 GPUs, the inventory says gpus: 8", "check")]}  # fmt: skip
    assert doctor.health_hint(checks).startswith(
        "invoke health --nodes node0,node2 names the GPU fault behind it (ECC, Xid events"
    )


def test_master_of(inventory) -> None:
    assert doctor.master_of(inventory) == "node0"
    assert doctor.master_of(inventory.select("node2,node1")) == "node2"
