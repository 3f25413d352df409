"""`invoke bootstrap`: the roles on every node in parallel, a per-node lock, a recap at the end."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import paramiko
from rich.live import Live

from ddpfleet import report
from ddpfleet.connection import Conn, Fleet
from ddpfleet.errors import NodeError
from ddpfleet.hygiene import open_private, private_dir
from ddpfleet.roles import Host, NodeRun, Role, Step, run_roles

LOCK_PATH = "/var/lock/ddpfleet-bootstrap.lock"
LOCK_WAIT_S = 30
RECAP_COLUMNS = ("node", "ok", "changed", "failed", "skipped", "unreachable", "seconds")


class NodeLock:
    """flock held by a remote `cat` on its own channel: released when we close the channel or
    when the connection dies, so a killed controller never leaves a node locked."""

    def __init__(self, conn: Conn, wait_s: int = LOCK_WAIT_S):
        self.conn, self.wait_s = conn, wait_s
        self.chan: paramiko.Channel | None = None

    def __enter__(self) -> NodeLock:
        chan = self.conn.transport.open_session()
        chan.exec_command(f"exec flock -w {self.wait_s} {LOCK_PATH} -c 'echo locked; exec cat'")
        got = b""
        while b"locked" not in got:
            data = chan.recv(64)
            if not data:
                code = chan.recv_exit_status()
                chan.close()
                raise NodeError(self.conn.name, f"another bootstrap holds {LOCK_PATH} on this "
                                f"node; waited {self.wait_s}s (exit {code}). Let it finish, "
                                "then run again")
            got += data
        self.chan = chan
        return self

    def __exit__(self, *exc) -> None:
        if self.chan is not None:
            self.chan.shutdown_write()  # cat sees EOF, flock exits, the lock is free
            self.chan.recv_exit_status()
            self.chan.close()


class Progress:
    """A live line per node on a terminal; plain prefixed lines otherwise; all into the log."""

    def __init__(self, nodes: list[str], log_path: Path):
        self.state = {n: "waiting" for n in nodes}
        self.lock = threading.Lock()
        self.log = open_private(log_path)  # step reasons name hosts, paths, package sources
        self.live: Live | None = None

    def __enter__(self) -> Progress:
        if report.is_tty():
            self.live = Live(self._render(), console=report.console, refresh_per_second=8,
                             transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
        self.log.close()

    def _render(self):
        return report.table(None, ("node", "now"), sorted(self.state.items()))

    def step(self, node: str, step: Step) -> None:
        line = f"[{node}] {step.role}: {step.name}: {step.status}" + (
            f" ({step.reason})" if step.reason else "")
        with self.lock:
            self.log.write(f"{datetime.now().isoformat(timespec='seconds')} {line}\n")
            if step.diff:
                self.log.write(step.diff)
            self.log.flush()
            self.state[node] = f"{step.role}: {step.name} {step.status}"
            if self.live is not None:
                self.live.update(self._render())
            elif step.status in ("changed", "failed"):
                report.console.print(line, markup=False)

    def doing(self, node: str, text: str) -> None:
        with self.lock:
            self.state[node] = text[:90]
            if self.live is not None:
                self.live.update(self._render())


def bootstrap(fleet: Fleet, roles: list[Role], check: bool = False, diff: bool = False,
              flags: Mapping[str, Any] | None = None, log_dir: Path = Path("logs"),
              lock_wait_s: int = LOCK_WAIT_S) -> dict[str, NodeRun]:
    private_dir(log_dir)
    log_path = log_dir / f"bootstrap-{datetime.now():%Y%m%d-%H%M%S}.log"
    names = [n.name for n in fleet.nodes]
    with Progress(names, log_path) as progress:

        def one(conn: Conn) -> NodeRun:
            host = Host(conn, fleet.inventory, check=check, diff=diff,
                        on_progress=lambda text: progress.doing(conn.name, text))
            with NodeLock(conn, lock_wait_s):
                return run_roles(host, roles, flags, on_step=progress.step)

        start = time.monotonic()
        results = fleet.map(one)
    runs = {}
    for name, r in results.items():
        if isinstance(r, NodeRun):
            runs[name] = r
        elif r.kind == "unreachable":
            runs[name] = NodeRun(name, unreachable=r.message, seconds=time.monotonic() - start)
        else:
            runs[name] = NodeRun(name, [Step("", "connect", "failed", r.message)])
    if diff:
        for run in runs.values():
            for s in run.steps:
                if s.diff:
                    report.console.print(s.diff, markup=False, end="")
    report.show(recap(runs))
    report.console.print(f"log: {log_path}", markup=False)
    return runs


def recap(runs: dict[str, NodeRun]):
    rows = [(n, r.count("ok"), r.count("changed"), r.count("failed"), r.count("skipped"),
             r.unreachable or 0, f"{r.seconds:.1f}") for n, r in runs.items()]
    return report.table("recap", RECAP_COLUMNS, rows)


def failures(runs: dict[str, NodeRun]) -> list[str]:
    out = []
    for name, run in runs.items():
        if run.unreachable:
            out.append(f"{name}: unreachable: {run.unreachable}")
        for s in run.steps:
            if s.status == "failed":
                out.append(f"{name}: {s.role}: {s.name}: {s.reason}")
    return out
