"""Early TCP dials for a cold fleet, started before paramiko is loaded.

sshd forks and re-executes itself for every connection it accepts (sshd -R), reading its
config and host keys: a few milliseconds of the node's CPU before any SSH byte is exchanged. A
cold `ping` or `gpu-status` spends about as long loading paramiko and Fabric; dialing first lets
the nodes do that work meanwhile. A dial is only a head start: connect() takes it when its
host and port are the ones it resolved (~/.ssh/config may say otherwise, or send the node
through a jump host, and then it dials as before), and every failure reads as it would have
without it. Only IP literals are dialed early: resolving names here would block.
"""

from __future__ import annotations

import atexit
import errno
import ipaddress
import socket
import threading
from collections.abc import Iterable

from ddpfleet.inventory import Node

_dials: dict[tuple[str, int], socket.socket] = {}
_lock = threading.Lock()


def start(nodes: Iterable[Node]) -> None:
    """A non-blocking connect to every node whose host is an IP address; never raises."""
    for node in nodes:
        try:
            family = (
                socket.AF_INET6 if ipaddress.ip_address(node.host).version == 6 else socket.AF_INET
            )
        except ValueError:
            continue
        with _lock:
            if (node.host, node.port) in _dials:
                continue
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        if sock.connect_ex((node.host, node.port)) not in (0, errno.EINPROGRESS):
            sock.close()  # connect() dials again and says why
            continue
        with _lock:
            _dials[(node.host, node.port)] = sock


def take(host: str, port: int) -> socket.socket | None:
    """The early dial to host:port, if one was started; the caller owns it from now on."""
    with _lock:
        return _dials.pop((host, port), None)


def close() -> None:
    """Dials nobody took (a node sent through a jump host, or never connected)."""
    with _lock:
        left = list(_dials.values())
        _dials.clear()
    for sock in left:
        sock.close()


atexit.register(close)
