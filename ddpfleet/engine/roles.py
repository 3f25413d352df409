"""The roles engine: roles in order on every node, nodes in parallel, steps reported.

A role is a directory roles/<name>/ (loaded by role_settings, which also resolves its settings):
    role.py        ORDER, SECTION, OPT_IN (its header: ddpfleet.catalog), applies(cfg, host) -> bool,
                   apply(host, cfg) -> Iterator[Step], optional HANDLERS {name: fn(host, cfg)}
    defaults.yaml  every knob, prefixed with the role name (miniconda_prefix: /opt/miniconda3)
    templates/     jinja2 templates, rendered with host.template(name, **vars)
    files/         files sent as they are (host.role.directory / "files" / name)
    optional survey(fleet, role, check): read-only, once per bootstrap before any node runs;
                   what it returns reaches every node's run as host.surveys[role name]

cfg is the role's resolved settings, unprefixed and read-only (precedence: role_settings.py).

A role reads what it needs through `host` (probe/run never change anything) and yields one Step
per thing it looked after: ok (already right), changed, skipped (with why) or failed. Check mode
is the engine's: a role changes the node only through host.change()/host.put() (no-ops under
--check), and says each change once, as an action, through host.changed(name, "install sshd",
do): under --check the step reads "would install sshd" and `do` is not called; otherwise `do`
makes the change and the step reads "installed sshd" (or is the Step `do` returned).
A failed step ends its role, and then its node's run: later roles and the role's handlers do
not run. Handlers a role notified run once, after its last step.
"""

from __future__ import annotations

import difflib
import posixpath
import shlex
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ddpfleet.engine import rootfiles
from ddpfleet.engine.settings import (  # noqa: F401  (re-exported: roles and tests import them here)
    ROLES_DIR,
    Role,
    load_role,
    select_roles,
    validate_sections,
)
from ddpfleet.errors import CommandError, DdpfleetError, NodeError
from ddpfleet.facts import FACTS_SCRIPT, parse_facts
from ddpfleet.inventory import Inventory, Node
from ddpfleet.rootlog import BOOTSTRAP_MARK
from ddpfleet.ssh.connection import NODE_IO_ERRORS, Conn, Result

STATUSES = ("ok", "changed", "failed", "skipped")
# Every command a role runs carries this bootstrap's token in its environment (and so do its
# children: pip, apt's dpkg, conda's solver), so the node can find and stop them all when the
# bootstrap is interrupted or its controller vanishes: bootstrap.NodeLock. A daemon a role
# starts through rootlog.start_detached drops it (it outlives the bootstrap).
MARK = BOOTSTRAP_MARK


@dataclass(frozen=True)
class Step:
    role: str
    name: str
    status: str  # one of STATUSES
    reason: str = ""
    diff: str = ""


def ok(name: str, reason: str = "") -> Step:
    return Step("", name, "ok", reason)


def changed(name: str, reason: str = "", diff: str = "") -> Step:
    return Step("", name, "changed", reason, diff)


def skipped(name: str, reason: str) -> Step:
    return Step("", name, "skipped", reason)


def failed(name: str, reason: str) -> Step:
    return Step("", name, "failed", reason)


# Past tenses that are not the verb + "ed"/"d"; the first word of every action must be a verb.
IRREGULAR = {"write": "wrote", "run": "ran", "send": "sent", "make": "made", "stop": "stopped"}


def past(action: str) -> str:
    """'install sshd' -> 'installed sshd': how a change reads once it is made."""
    verb, space, rest = action.partition(" ")
    done = IRREGULAR.get(verb) or verb + ("d" if verb.endswith("e") else "ed")
    return done + space + rest


# -- what a role sees ------------------------------------------------------------------------


@dataclass
class Host:
    """One node during one bootstrap: facts, read-only probes, and the only ways to change it."""

    conn: Conn
    inventory: Inventory
    check: bool = False
    diff: bool = False
    facts: Mapping[str, str] = field(default_factory=dict)
    role: Role | None = None
    notified: list[str] = field(default_factory=list)
    on_progress: Callable[[str], None] = lambda text: None
    changes: list[str] = field(default_factory=list)  # commands that changed the node, in order
    # What each role's survey(fleet, role, check) found across all the run's nodes before any
    # node changed, by role name (a role whose files must agree across nodes: slurm).
    surveys: Mapping[str, Any] = field(default_factory=dict)
    mark: str = ""  # this bootstrap's token (MARK), given by the node lock it holds
    stopping: threading.Event | None = None  # set on Ctrl-C: no command starts after it

    @property
    def name(self) -> str:
        return self.conn.name

    def _marked(self, command: str | list[str]) -> str | list[str]:
        """The command with MARK in its environment: `env MARK=token /bin/sh -c command` inside
        the root script, so the shell itself and everything it starts carry it."""
        if self.stopping is not None and self.stopping.is_set():
            raise NodeError(self.name, "bootstrap interrupted; nothing more was started")
        if not self.mark:
            return command
        text = command if isinstance(command, str) else shlex.join(command)
        return ["env", f"{MARK}={self.mark}", "/bin/sh", "-c", text]

    @property
    def node(self) -> Node:
        return self.conn.node

    def gather(self) -> None:
        """Facts that cannot change during a run (OS, arch, init system), once per node."""
        self.facts = MappingProxyType(self.probe(FACTS_SCRIPT))

    def probe(self, script: str) -> dict[str, str]:
        """Run a read-only sh script printing key=value lines; runs under --check too.
        Bounded by ssh.command_timeout: a probe that hangs is a failed node, not a hung run."""
        return parse_facts(
            self.conn.run(script, timeout=self.node.command_timeout, root=True).stdout
        )

    def run(
        self,
        command: str | list[str],
        stdin: str | bytes | None = None,
        check: bool = True,
        timeout: float | None = None,
    ) -> Result:
        """A read-only command, as root: runs under --check too."""
        command = self._marked(command)
        return self.conn.run(command, stdin=stdin, check=check, timeout=timeout, root=True)

    def change(
        self,
        command: str | list[str],
        stdin: str | bytes | None = None,
        check: bool = True,
        timeout: float | None = None,
    ) -> Result | None:
        """A command that changes the node; skipped under --check (returns None)."""
        if self.check:
            return None
        text = command if isinstance(command, str) else " ".join(command)
        self.changes.append(text)
        self.on_progress(text)
        command = self._marked(command)
        return self.conn.run(command, stdin=stdin, check=check, timeout=timeout, root=True)

    def changed(
        self, name: str, action: str, do: Callable[[], object] | None = None, diff: str = ""
    ) -> Step:
        """A change the role decided on, said once as an action ('install sshd (apt-get)').

        Under --check: 'would install sshd (apt-get)', and `do` is not called. Otherwise `do`
        (when given) makes the change; a Step it returns is the outcome (failed, ok, or changed
        with what it found out), anything else reads 'installed sshd (apt-get)'.
        """
        if self.check:
            return Step("", name, "changed", f"would {action}", diff)
        outcome = do() if do is not None else None
        if isinstance(outcome, Step):
            return outcome
        return Step("", name, "changed", past(action), diff)

    @property
    def sudo(self) -> bool:
        """Root work goes through sudo: files go through ddpfleet.rootfiles, not SFTP."""
        return self.conn.escalation.via_sudo

    def read_file(self, path: str) -> bytes | None:
        if self.sudo:
            return rootfiles.read(self.conn, path)[0]
        try:
            with self.conn.sftp().open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:  # permission denied and the like
            raise CommandError(self.name, f"read {path}", None, str(e)) from None

    def put(
        self, path: str, content: str | bytes, mode: int = 0o644, owner: str | None = None
    ) -> tuple[bool, str]:
        """Make a file hold exactly `content` with `mode`; returns (changed, diff text).

        The file is written beside and renamed into place, so readers never see half of it.
        """
        data = content.encode() if isinstance(content, str) else content
        if self.sudo:
            current, mode_now, owner_now = rootfiles.read(self.conn, path)
            if current == data and mode_now == mode and (owner or "root") == owner_now:
                return False, ""
            if not self.check:
                rootfiles.install(self.conn, path, data, mode, owner or "root")
            return True, _diff(path, current, data) if self.diff else ""
        current = self.read_file(path)
        mode_now = None
        if current is not None:
            mode_now = self.conn.sftp().stat(path).st_mode & 0o7777
        if current == data and mode_now == mode and owner is None:
            return False, ""
        text_diff = _diff(path, current, data) if self.diff else ""
        if current == data and mode_now == mode and owner is not None:
            owner_now = self.run(["stat", "-c", "%U", path]).stdout.strip()
            if owner_now == owner:
                return False, ""
        if not self.check:
            self._replace(path, data, mode, owner)
        return True, text_diff

    def _replace(self, path: str, data: bytes, mode: int, owner: str | None) -> None:
        """Write beside, then rename into place. The temp name is mktemp's (made with O_EXCL,
        so never a planted file or symlink); chown -h and mv -T act on the names themselves,
        never on what a symlink points at. A failed write leaves nothing behind."""
        directory, base = posixpath.split(path)
        quick = self.node.command_timeout
        tmp = self.conn.run(
            ["mktemp", "-p", directory or ".", f".{base}.ddpfleet-XXXXXX"], timeout=quick
        ).stdout.strip()
        try:
            self.conn.put_bytes(data, tmp, mode)
            if owner is not None:
                self.conn.run(["chown", "-h", "--", owner, tmp], timeout=quick)
            self.conn.run(["mv", "-fT", "--", tmp, path], timeout=quick)
        except BaseException:
            try:
                self.conn.run(["rm", "-f", "--", tmp], check=False, timeout=quick)
            except NodeError:
                pass  # the connection is gone too: the original error says more
            raise

    def template(self, template_name: str, /, **values: Any) -> str:
        import jinja2

        assert self.role is not None
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(self.role.directory / "templates")),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            autoescape=False,
        )
        return env.get_template(template_name).render(**values)

    def notify(self, handler: str) -> None:
        if handler not in self.notified:
            self.notified.append(handler)


def _diff(path: str, old: bytes | None, new: bytes) -> str:
    a = (old or b"").decode(errors="replace").splitlines(keepends=True)
    b = new.decode(errors="replace").splitlines(keepends=True)
    return "".join(difflib.unified_diff(a, b, f"{path} (node)", f"{path} (new)"))


# -- running roles on one node ---------------------------------------------------------------


@dataclass
class NodeRun:
    node: str
    steps: list[Step] = field(default_factory=list)
    unreachable: str = ""
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for s in self.steps if s.status == status)

    @property
    def failed(self) -> bool:
        return bool(self.unreachable) or self.count("failed") > 0


def run_roles(
    host: Host,
    roles: list[Role],
    flags: Mapping[str, Any] | None = None,
    on_step: Callable[[str, Step], None] = lambda node, step: None,
) -> NodeRun:
    """Roles in order on one node; a failed role stops this node's later roles."""
    out = NodeRun(host.name)
    start = time.monotonic()

    def record(step: Step) -> None:
        out.steps.append(step)
        on_step(host.name, step)

    try:
        host.gather()
        for role in roles:
            cfg = role.config(host.inventory, host.node, flags)
            host.role, host.notified = role, []
            if not role.module.applies(cfg, host):
                continue
            if not apply_role(host, role, cfg, record):
                break
    except (NodeError, *NODE_IO_ERRORS) as e:
        e = host.conn.failure(e)
        if e.kind in ("unreachable",):
            out.unreachable = e.message
        else:
            record(Step(host.role.name if host.role else "", "connect", "failed", e.message))
    out.seconds = time.monotonic() - start
    return out


def apply_role(
    host: Host, role: Role, cfg: Mapping[str, Any], record: Callable[[Step], None]
) -> bool:
    """One role on one node: its steps, then each handler it notified, once. False when a step
    failed: the role's later steps and its handlers do not run (nor, in run_roles, later roles).
    A node or command error inside the role is its failed step; an unreachable node raises."""
    host.role, host.notified = role, []
    try:
        for step in role.module.apply(host, cfg):
            record(Step(role.name, step.name, step.status, step.reason, step.diff))
            if step.status == "failed":
                return False
        handlers = getattr(role.module, "HANDLERS", {})
        for name in host.notified:
            for step in handlers[name](host, cfg):
                record(Step(role.name, step.name, step.status, step.reason, step.diff))
                if step.status == "failed":
                    return False
    except NodeError as e:
        if e.kind == "unreachable":
            raise
        record(Step(role.name, "error", "failed", e.message))
        return False
    except DdpfleetError as e:
        record(Step(role.name, "error", "failed", str(e)))
        return False
    except NODE_IO_ERRORS as e:  # SFTP disk full / EACCES, output that does not parse
        failure = host.conn.failure(e)
        if failure.kind == "unreachable":
            raise failure from None
        record(Step(role.name, "error", "failed", failure.message))
        return False
    return True
