"""Trust on first use: fetch a node's host key, show its fingerprint, record it in the project file.

The user's ~/.ssh/known_hosts is only read. A key that differs from a recorded one is refused
with both fingerprints and never overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import paramiko

from ddpfleet.connection import (
    USER_KNOWN_HOSTS,
    _fabric_connection,
    _tcp_socket,
    fingerprint,
    known_hosts_name,
)
from ddpfleet.errors import HostKeyChanged, Unreachable
from ddpfleet.inventory import Node


@dataclass(frozen=True)
class Offered:
    node: str
    name: str  # known_hosts host field: "10.0.0.1" or "[10.0.0.1]:2222"
    key: paramiko.PKey
    known: bool  # already recorded (same key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    def line(self) -> str:
        return f"{self.name} {self.key.get_name()} {self.key.get_base64()}\n"


def scan(node: Node) -> Offered:
    """The key the node offers, compared with every known_hosts we read (no login needed)."""
    c = _fabric_connection(node)  # for ~/.ssh/config HostName/Port
    host, port = c.host, c.port
    sock = _tcp_socket(host, port, node.connect_timeout, node.name)
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=node.connect_timeout)
        key = transport.get_remote_server_key()
    except (paramiko.SSHException, OSError, EOFError) as e:
        raise Unreachable(node.name, f"SSH handshake with {host}:{port} failed: {e}") from None
    finally:
        transport.close()
    name = known_hosts_name(host, port)
    recorded = _recorded(name, key.get_name(), node.known_hosts)
    if recorded is not None and recorded != key:
        raise HostKeyChanged(node.name, name, fingerprint(recorded), fingerprint(key),
                             str(node.known_hosts))
    return Offered(node.name, name, key, known=recorded is not None)


def _recorded(name: str, key_type: str, project: Path) -> paramiko.PKey | None:
    for path in (project, USER_KNOWN_HOSTS):
        if path.is_file():
            keys = paramiko.HostKeys(str(path)).lookup(name) or {}
            if key_type in keys:
                return keys[key_type]
    return None


def record(offered: Offered, known_hosts: Path) -> None:
    """Append one line; existing lines are never rewritten."""
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    with open(known_hosts, "a") as f:
        f.write(offered.line())
