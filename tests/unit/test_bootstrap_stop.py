"""The node side of bootstrap's lock (bootstrap.LOCK_SCRIPT + HOLD), run here as it runs on a
node: short of a clean "done", it stops every process carrying the bootstrap's token before the
lock is free (issue 24 item 7). And Host marks every command it runs with that token."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import threading
import time

import pytest

from ddpfleet import bootstrap
from ddpfleet.engine.roles import MARK, Host
from ddpfleet.errors import NodeError


def holder(tmp_path, token: str) -> subprocess.Popen:
    argv = ["sh", "-c", bootstrap.LOCK_SCRIPT, "sh", str(tmp_path / "run"), str(tmp_path / "run" / "lock"),
            "5", "20", token, bootstrap.HOLD]  # fmt: skip
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def step(token: str) -> subprocess.Popen:
    """A role's command as Host runs it: a shell with children, the token in its environment."""
    return subprocess.Popen(
        ["env", f"{MARK}={token}", "/bin/sh", "-c", "sleep 300 & sleep 301; wait"],
        start_new_session=True,  # its own group: the test cleans up by it, whatever happens
    )


def alive(p: subprocess.Popen) -> bool:
    return p.poll() is None


def end(work: subprocess.Popen) -> None:
    try:
        os.killpg(work.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    work.wait()


def lock_free(tmp_path) -> bool:
    return subprocess.run(["flock", "-n", str(tmp_path / "run" / "lock"), "true"]).returncode == 0


@pytest.mark.parametrize("how", ["stop", "eof"])
def test_the_lock_is_let_go_only_after_the_work_is_stopped(tmp_path, how):
    token = secrets.token_hex(8)
    lock = holder(tmp_path, token)
    work = step(token)
    try:
        time.sleep(0.3)  # the shell has started its children
        assert not lock_free(tmp_path)
        if how == "stop":
            lock.stdin.write("s")
        lock.stdin.close()
        said = lock.stdout.read().split()
        assert lock.wait(30) == 0
        assert said == ["stopped", "3"]  # the shell and both sleeps
        assert work.wait(5) is not None  # reaped: it was killed before the lock went
        assert lock_free(tmp_path)
        left = subprocess.run(["pgrep", "-f", f"{MARK}={token}"], capture_output=True)
        assert left.stdout == b""
    finally:
        end(work)


def test_a_clean_done_leaves_what_the_roles_started(tmp_path):
    """A bootstrap that finished may have started a service (Jupyter's supervised process)."""
    token = secrets.token_hex(8)
    lock = holder(tmp_path, token)
    work = step(token)
    try:
        lock.stdin.write("d")
        lock.stdin.close()
        assert lock.wait(10) == 0 and lock.stdout.read() == ""
        assert alive(work) and lock_free(tmp_path)
    finally:
        end(work)


class Recording:
    """A Conn that records what it is asked to run."""

    name = "node0"

    def __init__(self):
        self.ran = []

    def run(self, command, **kw):
        self.ran.append(command)


def test_every_command_a_role_runs_carries_the_token_and_none_starts_after_a_stop():
    conn, stopping = Recording(), threading.Event()
    host = Host(conn, None, mark="abc123", stopping=stopping)  # type: ignore[arg-type]
    host.change(["pip", "install", "x y"])
    host.run("cat /etc/os-release | head -1")
    assert conn.ran == [
        ["env", f"{MARK}=abc123", "/bin/sh", "-c", "pip install 'x y'"],
        ["env", f"{MARK}=abc123", "/bin/sh", "-c", "cat /etc/os-release | head -1"],
    ]
    assert host.changes == ["pip install x y"]  # what the recap and --check say is unchanged
    stopping.set()
    with pytest.raises(NodeError, match="bootstrap interrupted"):
        host.change(["apt-get", "install", "-y", "z"])
    assert len(conn.ran) == 2
