"""Early dials (ddpfleet.dial): a head start that connect() takes only for the host and port
it dials, and whose failures read exactly as a direct dial's. Loopback only."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ddpfleet.errors import Unreachable
from ddpfleet.inventory import Node
from ddpfleet.ssh import connection, dial


def node(host: str, port: int) -> Node:
    return Node("node0", host, port, "root", None, Path("/nonexistent/known_hosts"), 2.0)


@pytest.fixture
def listener():
    srv = socket.create_server(("127.0.0.1", 0))
    yield srv
    srv.close()
    dial.close()


def test_an_early_dial_is_taken_once_for_its_own_host_and_port(listener):
    port = listener.getsockname()[1]
    dial.start([node("127.0.0.1", port), node("localhost", port)])  # a name: not dialed early
    assert dial.take("localhost", port) is None
    assert dial.take("127.0.0.1", port + 1) is None
    sock = connection._tcp_socket("127.0.0.1", port, 2.0, "node0")
    try:
        peer, _ = listener.accept()
        assert peer.getpeername() == sock.getsockname()  # the early one, not a second dial
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.gettimeout() == 2.0
        assert dial.take("127.0.0.1", port) is None
        peer.close()
    finally:
        sock.close()


def test_a_refused_early_dial_reads_as_a_refused_connection():
    spare = socket.create_server(("127.0.0.1", 0))
    port = spare.getsockname()[1]
    spare.close()  # nothing listens there now
    dial.start([node("127.0.0.1", port)])
    with pytest.raises(Unreachable, match=r"connection refused by 127\.0\.0\.1:\d+; is sshd"):
        connection._tcp_socket("127.0.0.1", port, 2.0, "node0")
    assert dial.take("127.0.0.1", port) is None


def test_dials_nobody_took_are_closed(listener):
    port = listener.getsockname()[1]
    dial.start([node("127.0.0.1", port)])
    peer, _ = listener.accept()
    dial.close()
    peer.settimeout(2.0)
    assert peer.recv(1) == b""  # the node's sshd sees the connection end
    peer.close()
