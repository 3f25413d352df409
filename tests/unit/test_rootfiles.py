"""rootfiles.install through a stand-in connection that runs the real node-side commands here
(in a temp dir standing in for the node's /tmp): the private temp dir holding the content (a
munge key) is gone afterwards on every path: installed, sudo refused, timed out, connection
lost. Only sudo and the SSH transport are stood in for."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from ddpfleet.engine import rootfiles
from ddpfleet.errors import CommandError, CommandTimeout, Unreachable
from ddpfleet.inventory import Node
from ddpfleet.ssh.result import Result

KEY = b"\x00munge key bytes\xff" * 64


class Transport:
    def __init__(self):
        self.active = True

    def is_active(self) -> bool:
        return self.active


class Session:
    """A node-side process on its channel: stdin, merged output, exit status."""

    def __init__(self, conn: StandIn, command: str):
        self.conn = conn
        self.proc = subprocess.Popen(
            ["sh", "-c", command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def _alive(self) -> None:
        if not self.conn.transport.active:
            raise Unreachable(self.conn.name, "connection lost")

    def recv(self, size: int = 65536) -> bytes:
        self._alive()
        return os.read(self.proc.stdout.fileno(), size)

    def settimeout(self, seconds: float | None) -> None:
        pass

    def shutdown_write(self) -> None:
        self._alive()
        self.proc.stdin.close()

    def recv_exit_status(self) -> int:
        self._alive()
        return self.proc.wait(10)

    def close(self) -> None:
        """What sshd does when the channel closes or the connection goes: the command's
        stdin ends."""
        if not self.proc.stdin.closed:
            self.proc.stdin.close()


class StandIn:
    """A login user's connection: commands run here, with /tmp/ddpfleet.* moved into `tmp`;
    root=True is sudo, which answers as `sudo` says ('ok', 'refused', 'timeout')."""

    def __init__(self, tmp: Path, sudo: str = "ok", lose_after_send: bool = False):
        self.tmp, self.sudo, self.lose_after_send = tmp, sudo, lose_after_send
        self.node = Node("node1", "10.0.0.11", 22, "ubuntu", None, Path("/nonexistent"), 2.0)
        self.transport = Transport()
        self.sessions: list[Session] = []

    name = "node1"

    @property
    def active(self) -> bool:
        return self.transport.active

    def _here(self, command) -> str:
        cmd = shlex.join(command) if isinstance(command, list) else command
        return cmd.replace("/tmp/ddpfleet.", f"{self.tmp}/ddpfleet.")

    def session(self, command, root: bool = False, user: str | None = None) -> Session:
        assert not root and user is None  # the temp dir is the login user's
        self.sessions.append(Session(self, self._here(command)))
        return self.sessions[-1]

    def run(self, command, stdin=None, check=True, timeout=None, root=False) -> Result:
        if not self.transport.active:
            raise Unreachable(self.name, "connection lost")
        cmd = self._here(command)
        if root and self.sudo == "refused":
            r = Result(self.name, cmd, 1, "", "sudo: a password is required\n", 0.0)
        elif root and self.sudo == "timeout":
            raise CommandTimeout(self.name, cmd, timeout or 0, on_node=True)
        else:
            p = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=20)
            r = Result(self.name, cmd, p.returncode, p.stdout, p.stderr, 0.0)
        if check and r.exit_code != 0:
            raise CommandError(self.name, cmd, r.exit_code, r.stderr)
        return r

    def put_bytes(self, data: bytes, remote: str, mode: int = 0o600) -> None:
        fd = os.open(remote, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if self.lose_after_send:  # the key is on the node; the network goes before INSTALL
            self.transport.active = False
            for s in self.sessions:
                s.close()
            raise Unreachable(self.name, "connection lost while writing")


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    (tmp_path / "nodetmp").mkdir()
    return tmp_path / "nodetmp"  # a path StandIn moves once: it has no "/tmp/ddpfleet."


def _left(tmp: Path) -> list[str]:
    """What is left of the temp dirs once the node side has had its moment."""
    deadline = time.monotonic() + 5
    while list(tmp.glob("ddpfleet.*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    return sorted(p.name for p in tmp.glob("ddpfleet.*"))


def test_installed_content_lands_and_no_temp_dir_stays(tmp: Path, tmp_path: Path):
    target = tmp_path / "etc" / "munge.key"
    target.parent.mkdir()
    rootfiles.install(StandIn(tmp), str(target), KEY, 0o400)
    assert target.read_bytes() == KEY and (target.stat().st_mode & 0o777) == 0o400
    assert _left(tmp) == []


@pytest.mark.parametrize(
    ("sudo", "error"), [("refused", CommandError), ("timeout", CommandTimeout)]
)
def test_when_the_root_step_fails_the_temp_dir_is_removed(tmp: Path, tmp_path: Path, sudo, error):
    conn = StandIn(tmp, sudo=sudo)
    with pytest.raises(error):
        rootfiles.install(conn, str(tmp_path / "munge.key"), KEY, 0o400)
    assert _left(tmp) == []
    assert not (tmp_path / "munge.key").exists()


def test_when_the_connection_is_lost_the_node_removes_the_temp_dir(tmp: Path, tmp_path: Path):
    conn = StandIn(tmp, lose_after_send=True)
    with pytest.raises(Unreachable):
        rootfiles.install(conn, str(tmp_path / "munge.key"), KEY, 0o400)
    assert _left(tmp) == []
