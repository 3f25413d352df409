"""A stand-in for ddpfleet.roles.Host in role tests: facts in, steps and commands out.

Not a mock of SSH: it answers each command from a table of (regex, exit code, stdout) so a test
states the node's facts and reads back what the role decided to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from ddpfleet.connection import Result
from ddpfleet.errors import CommandError
from ddpfleet.facts import parse_facts
from ddpfleet.roles import Role, Step, load_role

FACTS = {"hostname": "node0", "os_id": "debian", "os_like": "", "arch": "x86_64",
         "python3": "3.11.2", "pid1": "init"}


@dataclass
class FakeHost:
    answers: list[tuple[str, int, str]] = field(default_factory=list)  # (regex, code, stdout)
    files: dict[str, bytes] = field(default_factory=dict)
    facts: Mapping[str, str] = field(default_factory=lambda: MappingProxyType(FACTS))
    check: bool = False
    diff: bool = False
    name: str = "node0"
    role: Role | None = None
    changes: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    written: dict[str, bytes] = field(default_factory=dict)
    stdin: dict[str, str | bytes] = field(default_factory=dict)  # change command -> its stdin
    notified: list[str] = field(default_factory=list)
    inventory: Any = None
    node: Any = None

    def _answer(self, command) -> Result:
        cmd = command if isinstance(command, str) else " ".join(command)
        self.ran.append(cmd)
        for pattern, code, out in self.answers:
            if re.search(pattern, cmd, re.S):
                return Result(self.name, cmd, code, out, "" if code == 0 else out, 0.0)
        return Result(self.name, cmd, 0, "", "", 0.0)

    def probe(self, script: str) -> dict[str, str]:
        return parse_facts(self._answer(script).stdout)

    def run(self, command, stdin=None, check=True, timeout=None) -> Result:
        r = self._answer(command)
        if check and r.exit_code != 0:
            raise CommandError(self.name, r.command, r.exit_code, r.stderr)
        return r

    def change(self, command, stdin=None, check=True, timeout=None):
        if self.check:
            return None
        self.changes.append(command if isinstance(command, str) else " ".join(command))
        if stdin is not None:
            self.stdin[self.changes[-1]] = stdin
        return self.run(command, stdin=stdin, check=check)

    def read_file(self, path: str) -> bytes | None:
        return self.files.get(path)

    def put(self, path, content, mode=0o644, owner=None):
        data = content.encode() if isinstance(content, str) else content
        if self.files.get(path) == data:
            return False, ""
        if not self.check:
            self.files[path] = data
            self.written[path] = data
        return True, ""

    def template(self, template_name: str, /, **values: Any) -> str:
        import jinja2

        assert self.role is not None
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(self.role.directory / "templates")),
            undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
        )
        return env.get_template(template_name).render(**values)

    def notify(self, handler: str) -> None:
        if handler not in self.notified:
            self.notified.append(handler)


def apply(role_name: str, host: FakeHost, **overrides) -> tuple[list[Step], Mapping]:
    """Run a role's apply (and its notified handlers) on a FakeHost; returns steps and cfg."""
    role = load_role(role_name)
    host.role = role
    cfg = MappingProxyType({**role.defaults, **overrides})
    steps = list(role.module.apply(host, cfg))
    for name in host.notified:
        steps += list(getattr(role.module, "HANDLERS", {})[name](host, cfg))
    return steps, cfg


ROLES = Path(__file__).resolve().parents[2] / "roles"
