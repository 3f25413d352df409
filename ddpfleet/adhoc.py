"""Ad-hoc work on every node: `ddpfleet run "CMD"`, `put`, `get`, over the same SSH core as every
other task (one strict connection per node, in parallel, bounded by ssh.forks).

Output comes grouped per node, nodes whose output and exit code are identical folded into one
group (as `clush -b` / `dshbak -c` fold them), so 32 nodes that agree print once:

    ---------------- node[0-2,4] (4) exit 0
    Linux
    ---------------- node3: unreachable
    node3: timeout: no answer from 10.0.0.13:22 within 10s
"""

from __future__ import annotations

import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ddpfleet.errors import DdpfleetError, NodeError
from ddpfleet.hygiene import clean
from ddpfleet.names import hostlist
from ddpfleet.ssh.result import Result

RULE = "-" * 16


@dataclass(frozen=True)
class Group:
    nodes: tuple[str, ...]
    heading: str  # "exit 0", "unreachable", ...
    text: str  # the output (stdout, then stderr), or the error


def command_for(conn, command: str, sudo: bool, train_user: str | None) -> tuple[str, bytes | None]:
    """The command line as sent, and its stdin (a sudo password, when sudo needs one): as the
    login user, as root (--sudo) or as the training user (setpriv from root, see ssh.become)."""
    if not sudo and train_user is None:
        return command, None
    esc = conn.escalation
    wrapped = esc.as_user(train_user, command) if train_user else esc.wrap(command)
    return wrapped, esc.stdin(None)


def run(fleet, command: str, sudo: bool = False, train_users: Mapping[str, str] | None = None):
    """`command` on every node; {node: Result | NodeError}. A non-zero exit is a Result, not an
    error: its output is what the user asked to see."""

    def one(conn) -> Result:
        user = (train_users or {}).get(conn.name)
        sent, stdin = command_for(conn, command, sudo, user)
        result = conn.run(sent, stdin=stdin, check=False)
        return Result(
            conn.name, command, result.exit_code, result.stdout, result.stderr, result.seconds
        )

    return fleet.map(one)


def fold(results: Mapping[str, object]) -> list[Group]:
    """Nodes with the same output and exit code in one group, groups in first-node order."""
    groups: dict[tuple[str, str], list[str]] = {}
    for node, r in results.items():
        if isinstance(r, Result):
            key = (f"exit {r.exit_code}", _joined(r.stdout, r.stderr))
        else:
            kind = getattr(r, "kind", "error")
            key = (kind, str(r))
        groups.setdefault(key, []).append(node)
    return [Group(tuple(nodes), heading, text) for (heading, text), nodes in groups.items()]


def _joined(stdout: str, stderr: str) -> str:
    parts = [p if p.endswith("\n") or not p else p + "\n" for p in (stdout, stderr)]
    return "".join(parts)


def render(groups: list[Group]) -> str:
    lines = []
    for g in groups:
        count = f" ({len(g.nodes)})" if len(g.nodes) > 1 else ""
        lines.append(f"{RULE} {hostlist(g.nodes)}{count} {g.heading}")
        if g.text:
            lines.append(clean(g.text, keep_newlines=True).rstrip("\n"))
    return "\n".join(lines)


def failures(results: Mapping[str, object]) -> list[str]:
    """'node2 (exit 1)', 'node3 (unreachable)': every node that did not exit 0."""
    bad = []
    for node, r in results.items():
        if isinstance(r, Result):
            if r.exit_code != 0:
                bad.append(f"{node} (exit {r.exit_code})")
        else:
            bad.append(f"{node} ({getattr(r, 'kind', 'error')})")
    return bad


# -- files -------------------------------------------------------------------------------------


def put(fleet, local: Path, remote: str) -> dict[str, object]:
    """The local file to `remote` on every node (its mode kept); {node: remote path | error}."""
    if not local.is_file():
        raise DdpfleetError(f"{local}: no such file (put copies one file; for a directory, tar it)")
    mode = stat.S_IMODE(local.stat().st_mode)

    def one(conn):
        sftp = conn.sftp()
        target = remote
        try:
            if stat.S_ISDIR(sftp.stat(remote).st_mode):
                target = f"{remote.rstrip('/')}/{local.name}"
        except OSError:
            pass  # not there yet: the file's own name
        try:
            sftp.put(str(local), target)
            sftp.chmod(target, mode)
        except OSError as e:
            raise NodeError(conn.name, f"put {target}: {_why(e)}") from None
        return target

    return fleet.map(one)


def get(fleet, remote: str, local_dir: Path) -> dict[str, object]:
    """`remote` from every node to local_dir/<node>/<its name>; {node: local path | error}."""
    name = Path(remote).name
    if not name:
        raise DdpfleetError(f"get {remote!r}: name a file on the nodes")

    def one(conn):
        target = local_dir / conn.name / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn.sftp().get(remote, str(target))
        except OSError as e:
            target.unlink(missing_ok=True)
            raise NodeError(conn.name, f"get {remote}: {_why(e)}") from None
        return str(target)

    return fleet.map(one)


def _why(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def copied_rows(results: Mapping[str, object]) -> list[tuple[str, str]]:
    return [
        (node, str(r) if not isinstance(r, NodeError) else f"failed: {r.message}")
        for node, r in results.items()
    ]
