"""Warm connections: the client side of the connection keeper (keeper.py).

The short, frequent commands (ping, gpu-status) spend most of their time on one SSH handshake
per node. The first such command starts a keeper in the background (its own connections, kept
`ssh.persist` seconds after the last use) and connects directly as before; later commands find
the keeper's socket and run their commands over its connections. Nothing here imports paramiko:
a warm command starts in the time Python and the inventory take.

The socket lives in a directory only its user can enter (0700, checked, never followed when
someone else owns it), one per inventory file and $HOME; the keeper checks the peer's uid too.
Any trouble with the keeper means a direct connection, never an error of its own.
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import hashlib
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ddpfleet import errors
from ddpfleet.errors import DdpfleetError, NodeError
from ddpfleet.inventory import Inventory, Node
from ddpfleet.ssh.fleetbase import FleetBase
from ddpfleet.ssh.result import Result

START_WAIT_S = 3.0  # `invoke disconnect` and tests wait this long for a keeper to come or go


def runtime_dir() -> Path:
    """The user's own directory for keeper sockets ($XDG_RUNTIME_DIR, else /tmp)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return Path(base) / "ddpfleet"
    return Path("/tmp") / f"ddpfleet-{os.getuid()}"


def private_dir() -> Path | None:
    """runtime_dir(), made 0700 if missing; None when it is not ours alone (then no keeper)."""
    d = runtime_dir()
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return d


def socket_path(inventory: Inventory) -> Path | None:
    d = private_dir()
    if d is None:
        return None
    ident = f"{Path(inventory.path).resolve()}\0{os.environ.get('HOME', '')}"
    return d / f"keeper-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.sock"


def node_spec(node: Node) -> dict[str, Any]:
    """A node as JSON: what the keeper connects with (it has no inventory of its own)."""
    spec = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    for name, value in spec.items():
        if isinstance(value, Path):
            spec[name] = str(value)
    spec["vars"] = dict(node.vars)
    return spec


def ask(path: Path, request: dict, timeout: float | None = None) -> dict:
    """One request, one answer, one Unix connection (cheap, and parallel callers never mix)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        data = b"".join(iter(lambda: s.recv(1 << 20), b""))
    if not data:
        raise OSError("the keeper closed the connection without an answer")
    return json.loads(data)


def as_error(d: dict) -> DdpfleetError:
    """The keeper's error, rebuilt as the same class with the same text (never unpickled)."""
    cls = getattr(errors, d.get("class", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, NodeError)):
        return NodeError(d.get("node", "?"), d.get("message", "the keeper failed"))
    e = cls.__new__(cls)
    e.__dict__.update(d.get("attrs", {}))
    e.args = tuple(d.get("args", ()))
    return e


@dataclasses.dataclass(frozen=True)
class Escalated:
    via_sudo: bool


class KeptConn:
    """One node through the keeper: `run` as Conn.run (same wrapper, timeout and errors; with
    root=IF_ABLE the keeper's connection decides and runs in the one request)."""

    def __init__(self, path: Path, node: Node):
        self.path, self.node, self.spec = path, node, node_spec(node)
        self._escalation: Escalated | None = None

    @property
    def escalation(self) -> Escalated:
        """Whether the keeper's connection does root work through sudo (Conn.escalation); a
        BecomeError when it cannot become root. The keeper never holds a sudo password."""
        if self._escalation is None:
            try:
                answer = ask(self.path, {"op": "escalation", "node": self.spec})
            except (OSError, ValueError) as e:
                raise errors.Unreachable(self.name, f"the connection keeper failed: {e}") from None
            if "error" in answer:
                raise as_error(answer["error"])
            self._escalation = Escalated(answer["via_sudo"])
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
        root: bool | str = False,
    ) -> Result:
        data = stdin.encode() if isinstance(stdin, str) else stdin
        request = {
            "op": "run",
            "node": self.spec,
            "command": command,
            "stdin": None if data is None else base64.b64encode(data).decode(),
            "timeout": timeout,
            "root": root,
        }
        try:
            answer = ask(self.path, request)
        except (OSError, ValueError) as e:
            raise errors.Unreachable(self.name, f"the connection keeper failed: {e}") from None
        if "error" in answer:
            raise as_error(answer["error"])
        r = answer["result"]
        result = Result(self.name, r["command"], r["exit_code"], r["stdout"], r["stderr"], r["s"])
        if check and result.exit_code != 0:
            raise errors.CommandError(
                self.name, result.command, result.exit_code, result.stderr or result.stdout
            )
        return result

    def failure(self, e: BaseException) -> NodeError:
        return NodeError(self.name, str(e) or type(e).__name__)

    def close(self) -> None:
        """The keeper keeps it."""


class KeptFleet(FleetBase):
    """connection.Fleet's interface over the keeper's connections."""

    batch_open = True  # one request opens every node

    def __init__(self, inventory: Inventory, path: Path, nodes: Iterable[Node] | None = None):
        super().__init__(inventory, nodes)
        self.path = path

    def open(self) -> Mapping[str, KeptConn | NodeError]:
        todo = [n for n in self.nodes if n.name not in self.conns and n.name not in self.errors]
        if todo:
            answer = ask(
                self.path,
                {
                    "op": "open",
                    "inventory": str(self.inventory.path),
                    "nodes": [node_spec(n) for n in todo],
                },
            )
            for node in todo:
                got = answer["nodes"][node.name]
                if got == "ok":
                    self.conns[node.name] = KeptConn(self.path, node)
                else:
                    self.errors[node.name] = as_error(got)
        return {n.name: self.conns.get(n.name) or self.errors[n.name] for n in self.nodes}


def start(path: Path, idle: float) -> None:
    """Start a keeper for `path` in the background, detached from this process and terminal.
    Two at once is harmless: the second finds the first's lock and exits."""
    import subprocess  # here: a warm command never starts one (nor loads subprocess)

    env = {k: v for k, v in os.environ.items() if k != "DDPFLEET_BECOME_PASSWORD"}
    # The keeper runs this very ddpfleet (a checkout's, a wheel's), whatever its cwd ("/")
    # and the environment would find first: client and keeper speak one version.
    here = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
    subprocess.Popen(
        [sys.executable, "-m", "ddpfleet.ssh.keeper", str(path), f"{idle:g}"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
        cwd="/",
    )


def keeper_socket(inventory: Inventory) -> Path | None:
    """The socket a keeper of this inventory would serve; None when its nodes must not use one
    (ssh.persist is 0, or a node names ssh.become_password_file: the keeper never holds a sudo
    password (keeper.py), and their root work, gpu-status reading other users' processes as
    root, needs it)."""
    direct = any(n.become_password_file is not None for n in inventory.nodes)
    return socket_path(inventory) if inventory.persist > 0 and not direct else None


def warm(inventory: Inventory) -> KeptFleet | None:
    """The keeper's fleet, opened, when a keeper answers for this inventory; else None (and
    nothing started). The installed command's lean path asks this before loading anything
    more (ddpfleet/__main__.py)."""
    path = keeper_socket(inventory)
    if path is None or not path.exists():
        return None
    try:
        kept = KeptFleet(inventory, path)
        kept.open()
        return kept
    except (OSError, ValueError, KeyError):
        return None


def fleet(inventory: Inventory):
    """Warm connections when a keeper answers (warm()); else a direct Fleet, and a keeper
    started for the next command unless keeper_socket() says none may serve these nodes."""
    kept = warm(inventory)
    if kept is not None:
        return kept
    path = keeper_socket(inventory)
    if path is not None:
        # started as this command exits: its imports and handshakes would compete with ours
        atexit.register(start, path, inventory.persist)
    from ddpfleet.ssh import dial

    dial.start(inventory.nodes)  # the nodes' sshd get going while paramiko loads
    from ddpfleet.ssh.connection import Fleet

    return Fleet(inventory)


def disconnect(inventory: Inventory) -> str:
    """Close the keeper of this inventory; says what it closed."""
    path = socket_path(inventory)
    if path is None or not path.exists():
        return "no connection keeper is running for this inventory"
    try:
        answer = ask(path, {"op": "exit"}, timeout=START_WAIT_S)
    except (OSError, ValueError):
        return "no connection keeper is running for this inventory"
    deadline = time.monotonic() + START_WAIT_S
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    n = answer.get("closed", 0)
    return f"closed the connection keeper ({n} connection{'s' if n != 1 else ''})"
