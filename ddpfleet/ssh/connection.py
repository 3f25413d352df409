"""One SSH connection per node per run: opened in parallel, host keys checked, reused, closed.

    with Fleet(inventory) as fleet:
        results = fleet.run("uname -m")          # {node name: Result | NodeError}
        results = fleet.map(lambda c: c.run(...)) # any per-node function, in parallel

Fabric's Connection resolves ~/.ssh/config (HostName, IdentityFile, ProxyJump); we hand
paramiko a socket with TCP_NODELAY (a command round trip drops from ~48 ms to ~4 ms: Nagle
meets delayed ACK otherwise) and replace Fabric's AutoAddPolicy with a refusing policy that
reads the project known_hosts and ~/.ssh/known_hosts (never written). ProxyJump hops are
opened by `connect` itself, so every hop's host key is checked the same way.

Nothing waits forever: every connection sends keepalives and a silent peer is dropped by the
kernel after SILENT_S; a command run with a timeout is also bounded on the node (timeout(1)
kills its process group), so a command we stop waiting for stops there too.
"""

from __future__ import annotations

import errno
import os
import select
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import fabric
import paramiko

from ddpfleet.errors import (
    AuthError,
    BecomeError,
    CommandError,
    CommandTimeout,
    DdpfleetError,
    HostKeyChanged,
    HostKeyUnknown,
    NodeError,
    Unreachable,
)
from ddpfleet.inventory import Inventory, Node
from ddpfleet.shell import Secret
from ddpfleet.ssh import become, dial, jumps, knownhosts
from ddpfleet.ssh.fleetbase import FleetBase
from ddpfleet.ssh.knownhosts import fingerprint, known_hosts_name
from ddpfleet.ssh.result import Result

__all__ = ["Conn", "Fleet", "Result", "connect", "fingerprint", "known_hosts_name"]

T = TypeVar("T")
USER_KNOWN_HOSTS = Path(knownhosts.USER_KNOWN_HOSTS).expanduser()
SYSTEM_SSH_CONFIG = Path("/etc/ssh/ssh_config")
_config: list = [None, None]  # [files' version, their parsed paramiko.SSHConfig]
_config_lock = threading.Lock()
KEEPALIVE_S = 5  # an SSH packet on an idle connection, so a silent peer is noticed...
SILENT_S = 25  # ...and the kernel drops it once data stays unacknowledged this long
KILL_GRACE_S = 5  # timeout(1) on the node: SIGKILL this long after SIGTERM
# I/O failures of one node (SFTP disk full or EACCES, no sftp subsystem, a lost channel, output
# that does not parse): that node's failure, never the whole run's.
NODE_IO_ERRORS = (OSError, EOFError, paramiko.SSHException, ValueError)
# OpenSSH's sftp-server where Debian, Red Hat and Arch put it: run as another user it serves
# SFTP as that user over a plain exec channel.
SFTP_SERVER = (
    "for p in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server "
    '/usr/lib/ssh/sftp-server; do [ -x "$p" ] && exec "$p"; done; '
    "echo 'no sftp-server found' >&2; exit 127"
)
# Run by the login shell: the command itself still runs under the login shell, bounded.
BOUNDED = (
    'command -v timeout >/dev/null 2>&1 || exec "${SHELL:-/bin/sh}" -c "$3"; '
    'exec timeout -k "$1" "$2" "${SHELL:-/bin/sh}" -c "$3"'
)


class _Refuse(paramiko.MissingHostKeyPolicy):
    """Unknown host key: refuse, carrying the offered key so `trust` can show it."""

    def __init__(self, node: str):
        self.node = node
        self.offered: paramiko.PKey | None = None

    def missing_host_key(self, client, hostname, key):
        self.offered = key
        raise HostKeyUnknown(self.node, hostname, fingerprint(key), key.get_name())


class Conn:
    """A live SSH connection to one node; `run` is cheap, call it as often as needed."""

    def __init__(self, node: Node, fabric_conn: fabric.Connection, hops: tuple[Conn, ...] = ()):
        self.node = node
        self.fabric = fabric_conn
        self.transport: paramiko.Transport = fabric_conn.transport
        self.hops = hops  # ProxyJump connections this one is tunnelled through
        self._sftp: paramiko.SFTPClient | None = None
        self.become_password: Secret | None = None  # --ask-become-pass, handed on by Fleet
        self._escalation: become.Escalation | None = None
        self._sftp_users: dict[str, paramiko.SFTPClient] = {}

    @property
    def escalation(self) -> become.Escalation:
        """How this connection does root work (found out once: become.establish); a
        BecomeError naming this node, the reason and the fix when it cannot."""
        if self._escalation is None and self.node.user == "root":
            self._escalation = become.Escalation("root", "root")  # no probe needed
        if self._escalation is None:

            def run(command: str, stdin: bytes | None) -> tuple[int, str, str]:
                r = self.run(command, stdin=stdin, check=False, timeout=self.node.command_timeout)
                return r.exit_code, r.stdout, r.stderr

            def password() -> Secret | None:
                return become.password_for(
                    self.name, self.become_password, self.node.become_password_file
                )

            try:
                self._escalation = become.establish(run, self.node.user, self.node.become, password)
            except BecomeError as e:
                raise BecomeError(self.name, e.message) from None
        return self._escalation

    @property
    def name(self) -> str:
        return self.node.name

    def run(
        self,
        command: str | list[str],
        stdin: str | bytes | None = None,
        check: bool = True,
        timeout: float | None = None,
        root: bool = False,
    ) -> Result:
        """Run a command (argv lists are quoted once with shlex.join); stdin is how secrets go.

        With a timeout the node enforces it too: the command is stopped there, never left
        running behind a closed channel (a later run would race with it). root=True runs it as
        one root script (through sudo unless the login user is root: see ddpfleet.become).
        """
        cmd = shlex.join(command) if isinstance(command, list) else command
        sent = cmd
        if root:
            sent, stdin = self.escalation.wrap(cmd), self.escalation.stdin(stdin)
        wire = (
            sent
            if timeout is None
            else shlex.join(["sh", "-c", BOUNDED, "sh", str(KILL_GRACE_S), f"{timeout:g}", sent])
        )
        start = time.monotonic()
        try:
            chan = self.transport.open_session(timeout=self.node.connect_timeout)
            chan.exec_command(wire)
            if stdin is not None:
                chan.sendall(stdin.encode() if isinstance(stdin, str) else stdin)
            chan.shutdown_write()
            # the node stops the command at `timeout`; past that plus the kill grace and a
            # round trip the node itself is not answering
            out, err = _drain(
                chan,
                None if timeout is None else timeout + KILL_GRACE_S + self.node.connect_timeout,
            )
            code = chan.recv_exit_status()
            chan.close()
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise Unreachable(
                self.name, f"connection lost while running {cmd[:60]!r}: {e}"
            ) from None
        except _Late:
            raise CommandTimeout(self.name, cmd, timeout, on_node=False) from None
        if code == -1:  # the channel closed with no exit status: the node's sshd went away
            raise Unreachable(self.name, f"connection lost while running {cmd[:60]!r}")
        seconds = time.monotonic() - start
        if timeout is not None and code in (124, 137) and seconds >= timeout:
            raise CommandTimeout(self.name, cmd, timeout, on_node=True)
        result = Result(
            self.name,
            cmd,
            code,
            out.decode(errors="replace"),
            err.decode(errors="replace"),
            seconds,
        )
        if check and code != 0:
            raise CommandError(self.name, cmd, code, result.stderr or result.stdout)
        return result

    def session(
        self, command: str | list[str], root: bool = False, user: str | None = None
    ) -> Session:
        """An exec channel left open for a caller that streams both ways (the gang runner's
        lifeline, the code sync's tar); stderr comes merged into its output. root=True runs it
        as root, user=NAME as that user (root drops to it with setpriv; see ddpfleet.become)."""
        cmd = shlex.join(command) if isinstance(command, list) else command
        head = None
        if root or (user is not None and user != self.node.user):
            esc = self.escalation
            cmd = esc.as_user(user, cmd) if user is not None else esc.wrap(cmd)
            head = esc.stdin(b"") or None
        try:
            chan = self.transport.open_session(timeout=self.node.connect_timeout)
            chan.set_combine_stderr(True)
            chan.exec_command(cmd)
            if head:  # sudo's password, read before the command sees its stdin
                chan.sendall(head)
        except NODE_IO_ERRORS as e:
            raise self.failure(e) from None
        return Session(self, chan)

    def sftp(self, user: str | None = None) -> paramiko.SFTPClient:
        """The login user's SFTP client, or one that acts as `user` (its own sftp-server,
        started by root and dropped to that user: ddpfleet.become), each opened once."""
        if user is not None and user != self.node.user:
            return self._sftp_as(user)
        if self._sftp is None:
            try:
                self._sftp = paramiko.SFTPClient.from_transport(self.transport)
            except NODE_IO_ERRORS as e:
                if not self.transport.is_active():
                    raise self.failure(e) from None
                raise CommandError(
                    self.name,
                    "sftp",
                    None,
                    f"cannot start SFTP ({e or 'refused'})"
                    "; the node's sshd_config needs a working 'Subsystem sftp' "
                    "line",
                ) from None
        return self._sftp

    def _sftp_as(self, user: str) -> paramiko.SFTPClient:
        if user not in self._sftp_users:
            session = self.session(SFTP_SERVER, user=user)
            session.chan.set_combine_stderr(False)  # the SFTP stream must stay clean
            try:
                self._sftp_users[user] = paramiko.SFTPClient(session.chan)
            except NODE_IO_ERRORS as e:
                session.close()
                raise CommandError(
                    self.name, f"sftp as {user}", None, f"cannot start sftp-server: {e}"
                ) from None
        return self._sftp_users[user]

    def put_bytes(self, data: bytes, remote: str, mode: int = 0o600) -> None:
        """Write a file with its mode set before any content lands (secrets stay 0600)."""
        sftp = self.sftp()
        try:
            with sftp.open(remote, "wb") as f:
                f.chmod(mode)
                f.write(data)
        except NODE_IO_ERRORS as e:
            if not self.transport.is_active():
                raise self.failure(e) from None
            raise CommandError(self.name, f"write {remote} (sftp)", None, describe(e)) from None

    def forward(self, port: int, origin: tuple[str, int] = ("127.0.0.1", 0)) -> Forwarded:
        """A TCP connection to 127.0.0.1:port as the node sees it, carried by this SSH connection
        (one direct-tcpip channel: what `ssh -L` opens for each client). NodeError when nothing
        answers there, Unreachable when the SSH connection is gone."""
        try:
            chan = self.transport.open_channel(
                "direct-tcpip", ("127.0.0.1", port), origin, timeout=self.node.connect_timeout
            )
        except paramiko.ChannelException as e:
            raise NodeError(
                self.name, f"nothing answers on 127.0.0.1:{port} on the node ({e.text})"
            ) from None
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise Unreachable(self.name, f"SSH connection lost ({e})") from None
        return Forwarded(chan)

    def failure(self, e: BaseException) -> NodeError:
        """One node's exception as that node's NodeError: unreachable when the connection is
        gone, else a failure carrying the exception's reason."""
        if isinstance(e, NodeError):
            return e
        if isinstance(e, DdpfleetError):
            return NodeError(self.name, str(e))
        if not self.transport.is_active():
            return Unreachable(self.name, f"connection lost ({describe(e)})")
        return NodeError(self.name, describe(e))

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
        for client in self._sftp_users.values():
            client.close()
        self.fabric.close()
        for hop in reversed(self.hops):
            hop.close()


class Session:
    """Conn.session's channel: the few calls its callers make, each failure this node's
    NodeError (Unreachable once the connection is gone), so paramiko stays in this module."""

    def __init__(self, conn: Conn, chan: paramiko.Channel):
        self.conn, self.chan = conn, chan

    def _do(self, fn: Callable[..., T], *args) -> T:
        try:
            return fn(*args)
        except NODE_IO_ERRORS as e:
            raise self.conn.failure(e) from None

    def sendall(self, data: bytes) -> None:
        self._do(self.chan.sendall, data)

    def recv(self, size: int = 65536) -> bytes:
        return self._do(self.chan.recv, size)

    def settimeout(self, seconds: float | None) -> None:
        """recv and sendall give up (this node's NodeError) after `seconds` without progress."""
        self.chan.settimeout(seconds)

    def shutdown_write(self) -> None:
        self._do(self.chan.shutdown_write)

    def recv_exit_status(self) -> int:
        """The command's exit status; -1 when the channel closed without one."""
        return self._do(self.chan.recv_exit_status)

    def close(self) -> None:
        """Never raises: closing a channel whose connection is gone is not a failure."""
        try:
            self.chan.close()
        except NODE_IO_ERRORS:
            pass


def describe(e: BaseException) -> str:
    """An exception as one line for a recap: 'OSError: No space left on device: /x'."""
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror + (f": {e.filename}" if e.filename else "")
    else:
        text = str(e) or "(no message)"
    if text == "Failure":  # SFTP's generic status: sftp-server sends it for ENOSPC and EDQUOT
        text = "Failure (the SFTP server gives no reason; most often a full disk or quota)"
    return f"{type(e).__name__}: {text}"


class Forwarded:
    """One forwarded TCP connection, used like a socket (select, recv, sendall, close); an SSH
    failure while carrying it is an OSError, as a socket's would be."""

    def __init__(self, chan: paramiko.Channel):
        self._chan = chan

    def fileno(self) -> int:
        return self._chan.fileno()

    def recv(self, size: int) -> bytes:
        try:
            return self._chan.recv(size)
        except paramiko.SSHException as e:
            raise OSError(str(e)) from None

    def sendall(self, data: bytes) -> None:
        try:
            self._chan.sendall(data)
        except paramiko.SSHException as e:
            raise OSError(str(e)) from None

    def close(self) -> None:
        self._chan.close()


class _Late(Exception):
    """The controller-side deadline of a bounded command passed."""


def _drain(chan: paramiko.Channel, timeout: float | None) -> tuple[bytes, bytes]:
    out, err = bytearray(), bytearray()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        got = False
        while chan.recv_ready():
            out += chan.recv(65536)
            got = True
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
            got = True
        done = chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready()
        if done and (chan.eof_received or chan.closed):
            return bytes(out), bytes(err)
        if got:
            continue
        if deadline is not None and time.monotonic() > deadline:
            chan.close()
            raise _Late
        select.select(
            [chan],
            [],
            [],
            0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic())),
        )


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
