"""One node's live SSH connection: commands, streaming sessions, SFTP, port forwards.

    conn.run(["uname", "-m"])                  # a Result; CommandError on a non-zero exit
    conn.run(script, root=True, timeout=20)    # as root (ssh.become), bounded on the node too
    conn.session(argv, user="train")           # a channel both ways, as another user
    conn.sftp(), conn.put_bytes(...), conn.forward(port)

Every paramiko failure becomes this node's NodeError here (Unreachable once the connection is
gone). Opening connections, ~/.ssh/config and host keys: ssh.connection.

Nothing waits forever: a command run with a timeout is also bounded on the node (timeout(1)
kills its process group), so a command we stop waiting for stops there too.
"""

from __future__ import annotations

import select
import shlex
import time
from collections.abc import Callable
from typing import TypeVar

import fabric
import paramiko

from ddpfleet.errors import (
    BecomeError,
    CommandError,
    CommandTimeout,
    DdpfleetError,
    NodeError,
    Unreachable,
)
from ddpfleet.inventory import Node
from ddpfleet.shell import Secret
from ddpfleet.ssh import become
from ddpfleet.ssh.result import IF_ABLE, Result

T = TypeVar("T")
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

    @property
    def active(self) -> bool:
        """Whether the SSH transport is still up (code outside ssh/ asks this, not paramiko)."""
        return self.transport.is_active()

    @property
    def host(self) -> str:
        """The address this connection dialed (~/.ssh/config's HostName applied)."""
        return self.fabric.host

    def run(
        self,
        command: str | list[str],
        stdin: str | bytes | None = None,
        check: bool = True,
        timeout: float | None = None,
        root: bool | str = False,
    ) -> Result:
        """Run a command (argv lists are quoted once with shlex.join); stdin is how secrets go.

        With a timeout the node enforces it too: the command is stopped there, never left
        running behind a closed channel (a later run would race with it). root=True runs it as
        one root script (through sudo unless the login user is root: see ddpfleet.become);
        root=IF_ABLE (ssh.result) does so where this connection can become root, else runs it
        as the login user.
        """
        cmd = shlex.join(command) if isinstance(command, list) else command
        sent = cmd
        esc = self._root(root)
        if esc is not None:
            sent, stdin = esc.wrap(cmd), esc.stdin(stdin)
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

    def _root(self, root: bool | str) -> become.Escalation | None:
        """The escalation a run's `root` asks for; None for none (a BecomeError from root=True)."""
        if not root:
            return None
        try:
            return self.escalation
        except BecomeError:
            if root != IF_ABLE:
                raise
            return None

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

    def exited(self, timeout: float | None) -> bool:
        """Wait up to `timeout` seconds for the command's exit; whether it came."""
        return self.chan.status_event.wait(timeout)

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
