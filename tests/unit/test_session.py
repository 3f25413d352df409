"""Conn.session: the streaming exec channel launch uses, with paramiko's errors turned into ours
at the connection boundary (a stand-in transport; the real one is exercised by test_train)."""

from __future__ import annotations

from types import SimpleNamespace

import paramiko
import pytest

from ddpfleet.errors import NodeError, Unreachable
from ddpfleet.ssh.connection import Conn


class Chan:
    def __init__(self, fail: BaseException | None = None):
        self.fail = fail
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, *args))
            if self.fail is not None and name != "set_combine_stderr":
                raise self.fail
            return 7 if name == "recv_exit_status" else b""

        return call


class Transport:
    def __init__(self, chan: Chan, active: bool = True):
        self.chan, self.active = chan, active

    def open_session(self, timeout=None) -> Chan:
        return self.chan

    def is_active(self) -> bool:
        return self.active


def conn(chan: Chan, active: bool = True) -> Conn:
    node = SimpleNamespace(name="node0", connect_timeout=5)
    return Conn(node, SimpleNamespace(transport=Transport(chan, active)))  # type: ignore[arg-type]


def test_an_argv_is_quoted_once_and_stderr_merged():
    chan = Chan()
    s = conn(chan).session(["python3", "-c", "print('a b')"])
    s.sendall(b"x")
    assert s.recv_exit_status() == 7
    assert chan.calls[:3] == [
        ("set_combine_stderr", True),
        ("exec_command", "python3 -c 'print('\"'\"'a b'\"'\"')'"),
        ("sendall", b"x"),
    ]


@pytest.mark.parametrize(("active", "kind"), [(True, NodeError), (False, Unreachable)])
def test_channel_errors_become_the_nodes_own(active, kind):
    chan = Chan()
    s = conn(chan, active).session("true")
    chan.fail = paramiko.SSHException("Channel closed.")
    with pytest.raises(kind, match=r"^node0: ") as got:
        s.sendall(b"hb\n")
    assert type(got.value) is kind
    with pytest.raises(kind):
        s.recv()


def test_a_session_that_cannot_open_is_the_node_unreachable():
    with pytest.raises(Unreachable, match="node0: connection lost"):
        conn(Chan(EOFError()), active=False).session("true")


def test_close_never_raises():
    chan = Chan(OSError("Socket is closed"))
    s = conn(Chan()).session("true")
    s.chan = chan
    s.close()
    assert chan.calls == [("close",)]
