"""A stand-in for one node's connection in role tests: facts in, steps and commands out.

FakeHost plays ddpfleet.connection.Conn: it answers each command from a table of
(regex, exit code, stdout) and keeps files in a dict behind a small SFTP. The real engine drives
it (roles.Host: change/put/changed/template/notify, check mode; roles.apply_role: steps,
handlers, stop at a failure), so a test states the node's facts and reads back what the role
decided to do. Commands are recorded as ' '.join(argv), the form the tests pin.
"""

from __future__ import annotations

import io
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any

from ddpfleet.engine.roles import Host, Role, Step, apply_role, load_role
from ddpfleet.errors import CommandError, NodeError
from ddpfleet.ssh.become import Escalation
from ddpfleet.ssh.connection import Result

FACTS = {
    "hostname": "node0",
    "os_id": "debian",
    "os_like": "",
    "arch": "x86_64",
    "python3": "3.11.2",
    "pid1": "init",
}
TMP_MARK = ".ddpfleet-tmp"  # what the fake mktemp names Host.put's temp files


def stub_node(name: str = "node0") -> SimpleNamespace:
    """What roles and Host read of an inventory Node, for tests without an inventory."""
    return SimpleNamespace(name=name, command_timeout=60.0, vars={}, user="root")


@dataclass
class FakeHost:
    answers: list[tuple[str, int, str]] = field(default_factory=list)  # (regex, code, stdout)
    files: dict[str, bytes] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)  # a file's mode, 0o644 when not here
    facts: Mapping[str, str] = field(default_factory=lambda: MappingProxyType(FACTS))
    check: bool = False
    diff: bool = False
    name: str = "node0"
    role: Role | None = None
    ran: list[str] = field(default_factory=list)
    written: dict[str, bytes] = field(default_factory=dict)
    stdin: dict[str, str | bytes] = field(default_factory=dict)  # command -> what it got
    inventory: Any = None
    node: Any = None
    _host: Host | None = None

    def __post_init__(self) -> None:
        if self.node is None:
            self.node = stub_node(self.name)

    # -- what the engine sees: a Conn ---------------------------------------------------------

    # the login user is root: root work runs as it is (ddpfleet.become)
    escalation = Escalation("root", "root")

    def run(self, command, stdin=None, check=True, timeout=None, root=False) -> Result:
        plumbing = self._plumbing(command)
        if plumbing is not None:
            return plumbing
        if stdin is not None:
            self.stdin[_text(command)] = stdin
        r = self._answer(command)
        if check and r.exit_code != 0:
            raise CommandError(self.name, r.command, r.exit_code, r.stderr)
        return r

    def _answer(self, command) -> Result:
        cmd = _text(command)
        self.ran.append(cmd)
        for pattern, code, out in self.answers:
            if re.search(pattern, cmd, re.S):
                return Result(self.name, cmd, code, out, "" if code == 0 else out, 0.0)
        return Result(self.name, cmd, 0, "", "", 0.0)

    def sftp(self) -> _FakeSftp:
        return _FakeSftp(self)

    def put_bytes(self, data: bytes, remote: str, mode: int = 0o600) -> None:
        self.files[remote], self.modes[remote] = data, mode

    def failure(self, e: BaseException) -> NodeError:
        return e if isinstance(e, NodeError) else NodeError(self.name, str(e))

    def _plumbing(self, command) -> Result | None:
        """Host.put's mktemp / chown / mv / rm of its temp file, done on `files`."""
        if not isinstance(command, list) or not any(
            TMP_MARK in a or a.endswith("-XXXXXX") for a in command
        ):
            return None
        argv = command
        out = ""
        if argv[0] == "mktemp":
            base = argv[-1].removesuffix("-XXXXXX").removesuffix(".ddpfleet")
            out = posixpath.join(argv[2], base + TMP_MARK) + "\n"
        elif argv[:2] == ["mv", "-fT"]:
            tmp, path = argv[3], argv[4]
            self.files[path], self.modes[path] = self.files.pop(tmp), self.modes.pop(tmp)
            self.written[path] = self.files[path]
        elif argv[0] == "rm":
            self.files.pop(argv[-1], None)
        return Result(self.name, " ".join(argv), 0, out, "", 0.0)

    # -- what a test reads ----------------------------------------------------------------------

    @property
    def host(self) -> Host:
        """The real engine's view of this node (one per FakeHost, like one per bootstrap)."""
        if self._host is None:
            self._host = Host(
                self,
                self.inventory,
                check=self.check,
                diff=self.diff,
                facts=self.facts,
                role=self.role,
            )
        return self._host

    @property
    def changes(self) -> list[str]:
        return self.host.changes

    @property
    def notified(self) -> list[str]:
        return self.host.notified


class _FakeSftp:
    def __init__(self, conn: FakeHost):
        self.conn = conn

    def open(self, path: str, mode: str = "rb") -> io.BytesIO:
        if path not in self.conn.files:
            raise FileNotFoundError(path)
        return io.BytesIO(self.conn.files[path])

    def stat(self, path: str) -> SimpleNamespace:
        return SimpleNamespace(st_mode=0o100000 | self.conn.modes.get(path, 0o644))

    def put(self, local: str, remote: str) -> None:
        self.conn.files[remote] = self.conn.written[remote] = Path(local).read_bytes()


def _text(command) -> str:
    return command if isinstance(command, str) else " ".join(command)


def apply(role_name: str, fake: FakeHost, **overrides) -> tuple[list[Step], Mapping]:
    """One role on a FakeHost through the real engine (its steps, then the handlers it
    notified; a failed step stops both); returns the steps and the cfg."""
    role = load_role(role_name)
    cfg = MappingProxyType({**role.defaults, **overrides})
    steps: list[Step] = []
    apply_role(fake.host, role, cfg, steps.append)
    return steps, cfg


def template(role_name: str, name: str, /, **values: Any) -> str:
    """A role's template rendered by the engine, as the role would render it."""
    return Host(FakeHost(), None, role=load_role(role_name)).template(name, **values)


ROLES = Path(__file__).resolve().parents[2] / "roles"
