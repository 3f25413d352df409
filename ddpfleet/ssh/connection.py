"""One SSH connection per node per run: opened in parallel, host keys checked, reused, closed.

    with Fleet(inventory) as fleet:
        results = fleet.run("uname -m")          # {node name: Result | NodeError}
        results = fleet.map(lambda c: c.run(...)) # any per-node function, in parallel

This module opens connections (connect, Fleet); what a connection does once open is ssh.conn
(Conn, Session, Forwarded: re-exported here, where callers have always found them).

Fabric's Connection resolves ~/.ssh/config (HostName, IdentityFile, ProxyJump); we hand
paramiko a socket with TCP_NODELAY (a command round trip drops from ~48 ms to ~4 ms: Nagle
meets delayed ACK otherwise) and replace Fabric's AutoAddPolicy with a refusing policy that
reads the project known_hosts and ~/.ssh/known_hosts (never written). ProxyJump hops are
opened by `connect` itself, so every hop's host key is checked the same way.

Nothing waits forever: every connection sends keepalives and a silent peer is dropped by the
kernel after SILENT_S (a bounded command: ssh.conn).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
from collections.abc import Iterable
from pathlib import Path

import fabric
import paramiko

from ddpfleet.errors import (
    AuthError,
    DdpfleetError,
    HostKeyChanged,
    HostKeyUnknown,
    NodeError,
    Unreachable,
)
from ddpfleet.inventory import Inventory, Node
from ddpfleet.shell import Secret
from ddpfleet.ssh import dial, jumps, knownhosts
from ddpfleet.ssh.conn import NODE_IO_ERRORS, Conn, Forwarded, Session, describe
from ddpfleet.ssh.fleetbase import FleetBase
from ddpfleet.ssh.knownhosts import fingerprint, known_hosts_name
from ddpfleet.ssh.result import Result

__all__ = [
    "NODE_IO_ERRORS",
    "Conn",
    "Fleet",
    "Forwarded",
    "Result",
    "Session",
    "connect",
    "describe",
    "fingerprint",
    "known_hosts_name",
    "resolve",
]

USER_KNOWN_HOSTS = Path(knownhosts.USER_KNOWN_HOSTS).expanduser()
SYSTEM_SSH_CONFIG = Path("/etc/ssh/ssh_config")
_config: list = [None, None]  # [files' version, their parsed paramiko.SSHConfig]
_config_lock = threading.Lock()
KEEPALIVE_S = 5  # an SSH packet on an idle connection, so a silent peer is noticed...
SILENT_S = 25  # ...and the kernel drops it once data stays unacknowledged this long


class _Refuse(paramiko.MissingHostKeyPolicy):
    """Unknown host key: refuse, carrying the offered key so `trust` can show it."""

    def __init__(self, node: str):
        self.node = node
        self.offered: paramiko.PKey | None = None

    def missing_host_key(self, client, hostname, key):
        self.offered = key
        raise HostKeyUnknown(self.node, hostname, fingerprint(key), key.get_name())


def _fabric_config() -> fabric.Config:
    """A Fabric config of its own for each Connection (a Connection writes to its config, and
    every write re-merges it: a shared one reads empty meanwhile in other threads), over one
    parsed ~/.ssh/config + /etc/ssh/ssh_config per version of those files (read-only)."""
    paths = (SYSTEM_SSH_CONFIG, Path("~/.ssh/config").expanduser())
    version = tuple(map(knownhosts.file_version, paths))
    with _config_lock:
        if _config[0] != version:
            _config[:] = [version, fabric.Config().base_ssh_config]
        parsed = _config[1]
    return fabric.Config(ssh_config=parsed)


def _fabric_connection(node: Node) -> fabric.Connection:
    kwargs: dict = {"banner_timeout": node.connect_timeout, "auth_timeout": node.connect_timeout}
    if node.key is not None:  # the inventory's key only: no agent or ~/.ssh guessing
        kwargs.update(key_filename=[str(node.key)], look_for_keys=False, allow_agent=False)
    return fabric.Connection(
        node.host,
        user=node.user,
        port=node.port,
        config=_fabric_config(),
        connect_timeout=node.connect_timeout,
        connect_kwargs=kwargs,
    )


def resolve(node: Node) -> tuple[str, int]:
    """The address and port `connect` dials for a node: ~/.ssh/config's HostName and Port
    applied (`trust` records the host key under this name)."""
    c = _fabric_connection(node)
    return c.host, int(c.port)


def _tcp_socket(host: str, port: int, timeout: float, node: str) -> socket.socket:
    try:
        sock = _early(host, port, timeout) or socket.create_connection((host, port), timeout)
    except socket.gaierror as e:
        raise Unreachable(
            node,
            f"cannot resolve {host!r} ({e.strerror}); fix host: in the inventory or ~/.ssh/config",
        ) from None
    except TimeoutError:
        raise Unreachable(
            node, f"timeout: no answer from {host}:{port} within {timeout:g}s"
        ) from None
    except ConnectionRefusedError:
        raise Unreachable(node, f"connection refused by {host}:{port}; is sshd running?") from None
    except OSError as e:
        raise Unreachable(node, f"cannot reach {host}:{port}: {e.strerror or e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux: give up on a peer that stopped answering
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, SILENT_S * 1000)
    return sock


def _early(host: str, port: int, timeout: float) -> socket.socket | None:
    """The early dial (ddpfleet.dial) to host:port once it has connected; its failure raised
    as create_connection would raise it."""
    sock = dial.take(host, port)
    if sock is None:
        return None
    try:
        if not select.select([], [sock], [], timeout)[1]:
            raise TimeoutError
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise (ConnectionRefusedError if err == errno.ECONNREFUSED else OSError)(
                err, os.strerror(err)
            )
    except BaseException:
        sock.close()
        raise
    sock.settimeout(timeout)
    return sock


def _client_keys(client: paramiko.SSHClient, node: Node, name: str) -> Path:
    """The pins for `name` (see knownhosts for the precedence), as the only keys paramiko
    knows; returns the file they come from, for messages."""
    keys, source = knownhosts.pinned(name, node.known_hosts)
    for key_type, key in keys.items():
        client.get_host_keys().add(name, key_type, key)
    return source


def connect(
    node: Node, policy: paramiko.MissingHostKeyPolicy | None = None, jump: str | None = None
) -> Conn:
    """Open one node's connection; every failure is a NodeError naming the node and the fix.

    `jump` is a ProxyJump value ("user@host:port,host2"); by default ~/.ssh/config's.
    """
    c = _fabric_connection(node)
    client: paramiko.SSHClient = c.client
    source = _client_keys(client, node, known_hosts_name(c.host, c.port))
    client.set_missing_host_key_policy(policy or _Refuse(node.name))
    if jump is None and isinstance(c.gateway, fabric.Connection):
        jump = c.ssh_config.get("proxyjump")
    hops: tuple[Conn, ...] = ()
    if jumps.hops(jump):
        hops, chan = _through(node, jump, c.host, c.port)
        c.gateway, c.connect_kwargs["sock"] = None, chan  # Fabric's hops are never used
    elif not c.gateway:
        c.connect_kwargs["sock"] = _tcp_socket(c.host, c.port, node.connect_timeout, node.name)
    try:
        c.open()
    except NodeError:
        _close(c, hops)
        raise
    except paramiko.BadHostKeyException as e:
        _close(c, hops)
        raise HostKeyChanged(
            node.name,
            known_hosts_name(c.host, c.port),
            fingerprint(e.expected_key),
            fingerprint(e.key),
            str(source),
        ) from None
    except paramiko.AuthenticationException:
        _close(c, hops)
        key = node.key or "your default keys / agent"
        raise AuthError(
            node.name,
            f"authentication failed for {c.user}@{c.host}:{c.port} "
            f"with {key}; add the public key to the node's authorized_keys or "
            "fix ssh.key",
        ) from None
    except (paramiko.SSHException, OSError, EOFError) as e:
        _close(c, hops)
        raise Unreachable(node.name, f"SSH handshake with {c.host}:{c.port} failed: {e}") from None
    c.transport.set_keepalive(KEEPALIVE_S)
    return Conn(node, c, hops)


def _close(c: fabric.Connection, hops: tuple[Conn, ...]) -> None:
    c.close()
    for hop in reversed(hops):
        hop.close()


def _through(node: Node, jump: str, host: str, port: int) -> tuple[tuple[Conn, ...], object]:
    """Connect to the last hop (through the ones before it), then a channel to host:port."""
    *before, last = jumps.hops(jump)
    hop = jumps.hop_node(node, last)
    try:
        conn = connect(hop, jump=",".join(before) or "none")
    except NodeError as e:
        raise jumps.as_hop(e, node.name, last) from None
    try:
        chan = conn.transport.open_channel(
            "direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=node.connect_timeout
        )
    except (paramiko.SSHException, OSError, EOFError) as e:
        conn.close()
        raise Unreachable(
            node.name, f"jump host {last} could not reach {host}:{port}: {e}"
        ) from None
    return (*conn.hops, conn), chan


class Fleet(FleetBase):
    """The run's connections: one per node, opened in parallel (bounded by ssh.forks)."""

    io_errors = NODE_IO_ERRORS

    def __init__(
        self,
        inventory: Inventory,
        nodes: Iterable[Node] | None = None,
        become_password: Secret | None = None,
    ):
        super().__init__(inventory, nodes)
        self.become_password = become_password  # --ask-become-pass; else env or file per node

    def lost(self, conn: Conn) -> bool:
        return not conn.active

    def open_one(self, node: Node) -> Conn | NodeError:
        outcome = _try(connect)(node)
        if not isinstance(outcome, NodeError):
            outcome.become_password = self.become_password
        return outcome


def _try(fn):
    """connect(node) with that node's failure returned as its own NodeError, never raised."""

    def call(node):
        try:
            return fn(node)
        except NodeError as e:
            return e
        except DdpfleetError as e:
            return NodeError(node.name, str(e))
        except NODE_IO_ERRORS as e:
            return NodeError(node.name, describe(e))

    return call
