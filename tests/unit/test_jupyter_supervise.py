"""roles/jupyter/files/jupyter-supervise on this machine, installed as the role installs it (beside
ddpfleet/node/proctree.py), supervising a stand-in server that starts a kernel the way jupyter_server
does (its own session) and a kernel that will not go: SIGTERM ignored, a double-forked child in a
session of its own. Processes are found by an environment marker, never by name."""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddpfleet import jupyter
from ddpfleet.engine.roles import load_role
from tests.integration.jupyter_kernels import FAKE_KERNEL_PY

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the supervisor needs Linux")

SUPERVISE = load_role("jupyter").directory / "files" / "jupyter-supervise"
# The stand-in server: starts the kernel in a new session with the marker, exits on SIGTERM
# without shutting it down (what a server that fails to stop its kernels leaves).
SERVER_PY = f"""import os, subprocess, sys, time
kernel = {FAKE_KERNEL_PY!r}
env = {{**os.environ, "DDPFLEET_TEST_KERNEL": sys.argv[1]}}
subprocess.Popen([sys.executable, "-c", kernel], env=env, start_new_session=True)
while True:
    time.sleep(60)
"""


def cgroup_possible() -> bool:
    """Whether root here can make the server a cgroup (proctree's own answer)."""
    spec = importlib.util.spec_from_file_location("proctree", jupyter.PROCTREE_SOURCE)
    proctree = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(proctree)
    return os.getuid() == 0 and proctree.cgroup2_mount() is not None


def marked(mark: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if f"DDPFLEET_TEST_KERNEL={mark}".encode() in env and state != b"Z":
            found.append(int(pid))
    return found


def until(what, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := what()):
        assert time.monotonic() < deadline, f"never happened: {what.__doc__ or what}"
        time.sleep(0.05)
    return value


@pytest.fixture
def supervised(tmp_path: Path):
    """(supervisor Popen, state dir, marker): the supervisor running the stand-in server."""
    libexec, state = tmp_path / "libexec", tmp_path / "state"
    libexec.mkdir()
    state.mkdir()
    shutil.copy(SUPERVISE, libexec / "jupyter-supervise")
    shutil.copy(jupyter.PROCTREE_SOURCE, libexec / "proctree.py")
    mark = secrets.token_hex(8)
    proc = subprocess.Popen(
        [sys.executable, "-I", str(libexec / "jupyter-supervise"), str(state)]
        + [sys.executable, "-c", SERVER_PY, mark],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        until(lambda: len(marked(mark)) == 2)  # the kernel and its double-forked child
        yield proc, state, mark
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        proc.stdout.close()
        for pid in marked(mark):
            os.kill(pid, signal.SIGKILL)


def test_a_stop_leaves_nothing_of_the_servers_tree(supervised):
    proc, state, mark = supervised
    cgroup = (state / "cgroup").read_text() if (state / "cgroup").exists() else ""
    assert bool(cgroup) == cgroup_possible()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert marked(mark) == []  # once the supervisor has exited, nothing of the tree
    assert sorted(os.listdir(state)) == []  # pidfiles and the cgroup's name gone
    assert not cgroup or not os.path.exists(cgroup)
    assert "SIGKILLed 2 processes the server left" in out


def test_a_dead_servers_kernels_are_ended_before_the_restart(supervised):
    proc, state, mark = supervised
    first = int((state / "server.pid").read_text())
    kernels = marked(mark)
    os.kill(first, signal.SIGKILL)
    until(lambda: not any(pid in marked(mark) for pid in kernels))

    def restarted() -> bool:
        pid = (state / "server.pid").read_text().strip() if (state / "server.pid").exists() else ""
        return pid.isdigit() and int(pid) != first

    until(restarted)
    assert proc.poll() is None  # still supervising
