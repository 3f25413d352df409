"""tunnel: local clients reach the node's port through Conn.forward; errors say what to do."""

from __future__ import annotations

import socket
import threading

import pytest

from ddpfleet.errors import NodeError, Unreachable
from ddpfleet.ssh.tunnel import tunnel


class Stream:
    """Conn.forward's stand-in: a plain TCP connection to a port on this machine."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, size: int) -> bytes:
        return self.sock.recv(size)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


class FakeConn:
    name = "node0"

    def __init__(self, refuse: bool = False):
        self.refuse, self.active, self.opened = refuse, True, 0
        self.transport = self

    def is_active(self) -> bool:
        return self.active

    def forward(self, port: int, origin=("127.0.0.1", 0)) -> Stream:
        if self.refuse:
            raise NodeError(self.name, f"nothing answers on 127.0.0.1:{port} on the node (refused)")
        self.opened += 1
        return Stream(port)


@pytest.fixture
def echo():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            with client:
                while data := client.recv(1024):
                    client.sendall(data.upper())

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def test_bytes_go_both_ways_until_the_connection_closes(echo) -> None:
    conn, got = FakeConn(), []

    def ready(port: int) -> None:
        def client() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(b"hello")
                got.append(c.recv(1024))
            conn.active = False  # the SSH connection goes away: the tunnel ends

        threading.Thread(target=client, daemon=True).start()

    with pytest.raises(Unreachable, match="connection closed; run invoke jupyter again"):
        tunnel(conn, echo, 0, ready, rerun="invoke jupyter")  # type: ignore[arg-type]
    assert got == [b"HELLO"] and conn.opened == 2  # the check before on_ready, then the client


def test_nothing_answering_is_said_before_the_url_with_the_fix() -> None:
    ready = []
    with pytest.raises(NodeError, match=r"nothing answers on 127.0.0.1:9 .*; start it so"):
        tunnel(FakeConn(refuse=True), 9, 0, ready.append, start_hint="start it so")  # type: ignore[arg-type]
    assert ready == []


def test_a_busy_local_port_names_the_flag() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(Exception, match=f"cannot listen on 127.0.0.1:{port}.*--local-port"):
            tunnel(FakeConn(), 1, port, lambda p: None)  # type: ignore[arg-type]
