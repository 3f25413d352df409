"""Trust on first use: fetch a node's host key, show its fingerprint, record it in the project file.

The user's ~/.ssh/known_hosts is only read. A key that differs from a recorded one, of the same
type or of another, is refused with both fingerprints and never recorded. A node behind
ProxyJump is scanned through its hops, and each hop is checked (and offered for trust) first.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fabric
import paramiko

from ddpfleet.errors import HostKeyChanged, NodeError, Unreachable
from ddpfleet.inventory import Node
from ddpfleet.ssh import jumps, knownhosts
from ddpfleet.ssh.connection import _fabric_connection, _tcp_socket, connect, resolve
from ddpfleet.ssh.knownhosts import fingerprint, known_hosts_name


@dataclass(frozen=True)
class Offered:
    node: str
    name: str  # known_hosts host field: "10.0.0.1" or "[10.0.0.1]:2222"
    key: paramiko.PKey
    known: bool  # already recorded (same key)
    via: str = ""  # "jump host root@10.0.0.1" for a ProxyJump hop of `node`, else ""

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    def line(self) -> str:
        return f"{self.name} {self.key.get_name()} {self.key.get_base64()}\n"


def scan(node: Node) -> Offered:
    """The key the node offers, compared with every known_hosts we read (no login needed)."""
    return _offered(node, *resolve(node), sock=None)


def scan_chain(node: Node) -> Iterator[Offered]:
    """Each ProxyJump hop's key, then the node's; before moving past a hop the caller records
    or refuses it (a hop is logged into, to reach the next, only once its key is known)."""
    c = _fabric_connection(node)
    jump = c.ssh_config.get("proxyjump") if isinstance(c.gateway, fabric.Connection) else None
    hops = jumps.hops(jump)
    opened = []
    try:
        for i, hop in enumerate(hops):
            hnode = jumps.hop_node(node, hop)
            prev = opened[-1] if opened else None
            offered = _offered(hnode, *resolve(hnode), sock=prev, via=f"jump host {hop}")
            yield offered
            try:
                opened.append(connect(hnode, jump=",".join(hops[:i]) or "none"))
            except NodeError as e:
                raise jumps.as_hop(e, node.name, hop) from None
        yield _offered(node, c.host, c.port, sock=opened[-1] if opened else None)
    finally:
        for conn in reversed(opened):
            conn.close()


def _offered(node: Node, host: str, port: int, sock, via: str = "") -> Offered:
    """Handshake with host:port (directly, or through the previous hop's connection)."""
    label = f"{via}: " if via else ""
    name = known_hosts_name(host, port)
    keys, source = knownhosts.pinned(name, node.known_hosts)
    if sock is None:
        channel = _tcp_socket(host, port, node.connect_timeout, node.name)
    else:
        try:
            channel = sock.transport.open_channel(
                "direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=node.connect_timeout
            )
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise Unreachable(
                node.name, f"{label}{sock.node.host} could not reach {host}:{port}: {e}"
            ) from None
    transport = paramiko.Transport(channel)
    knownhosts.prefer(transport, keys)
    try:
        transport.start_client(timeout=node.connect_timeout)
        key = transport.get_remote_server_key()
    except (paramiko.SSHException, OSError, EOFError) as e:
        raise Unreachable(
            node.name, f"{label}SSH handshake with {host}:{port} failed: {e}"
        ) from None
    finally:
        transport.close()
    if keys and key not in keys.values():
        # a key of another type than the pinned one is no "new" key: it is a different host
        expected = keys.get(key.get_name()) or next(iter(keys.values()))
        raise HostKeyChanged(
            node.name, f"{label}{name}", fingerprint(expected), fingerprint(key), str(source)
        )
    return Offered(node.name, name, key, known=bool(keys), via=via)


def record(offered: Offered, known_hosts: Path) -> None:
    """Append one line; existing lines are never rewritten, a pinned host never gets more."""
    keys, _ = knownhosts.pinned(offered.name, known_hosts)
    if offered.key in keys.values():
        return
    if keys:
        raise HostKeyChanged(
            offered.node,
            offered.name,
            fingerprint(next(iter(keys.values()))),
            offered.fingerprint,
            str(known_hosts),
        )
    knownhosts.append(known_hosts, offered.line())
