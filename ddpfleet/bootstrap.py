"""`invoke bootstrap`: the roles on every node in parallel, a per-node lock, a recap at the end."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from ddpfleet import report
from ddpfleet.engine.roles import Host, NodeRun, Step, run_roles
from ddpfleet.engine.settings import Role
from ddpfleet.errors import NodeError, Unreachable
from ddpfleet.hygiene import open_private, private_dir
from ddpfleet.progress import Board, Clock
from ddpfleet.ssh import become
from ddpfleet.ssh.connection import Conn, Fleet, Session

# Root-only (0700): a world-writable /run/lock would let any local user, such as the notebook
# user, hold the lock forever and block every bootstrap of the node.
LOCK_DIR = "/run/ddpfleet"
LOCK_PATH = f"{LOCK_DIR}/bootstrap.lock"
LOCK_WAIT_S = 30
HEARTBEAT_S = 5  # the holder sends a byte this often...
HOLDER_SILENT_S = 20  # ...and the node frees the lock once none came for this long
RECAP_COLUMNS = ("node", "ok", "changed", "failed", "skipped", "unreachable", "seconds")

# $1 the lock dir, $2 the lock file, $3 seconds to wait for it, $4 seconds of holder silence,
# $5 this bootstrap's token (engine.roles.MARK), $6 HOLD. Holding it, the node echoes "locked" and
# stays while a byte arrives every HEARTBEAT_S; "d" (done) lets go. EOF (Ctrl-C, the controller
# died or its connection closed), "s" (stop) or $4 s without a byte (the controller froze or the
# network went silent: sshd alone may take hours to notice) first stops every process that
# carries the token, the bootstrap's commands and their children (pip, dpkg), and lets go only
# once none is left: a second bootstrap never races the first's leftovers.
LOCK_SCRIPT = r"""
mkdir -p -m 0700 "$1" || exit 3
[ "$(stat -c %u "$1")" = "$(id -u)" ] || {
  echo "$1 is owned by uid $(stat -c %u "$1"), not by us: remove it" >&2; exit 3; }
chmod 0700 "$1"
flock -w "$3" "$2" sh -c "$6" sh "$4" "$5" && exit 0
ino=$(stat -c %i "$2")
pid=$(awk -v i=":$ino" 'substr($6, length($6) - length(i) + 1) == i {print $5; exit}' /proc/locks)
echo "held by pid ${pid:-?} (user $(ps -o user= -p "${pid:-0}" 2>/dev/null || echo '?'))" >&2
exit 1
"""
# Inside the flock: $1 seconds of silence, $2 the token. TERM for ~5 s, then KILL, for ~15 s in
# all; "stopped N" says how many it had to end (0: nothing of this bootstrap was running).
HOLD = r"""
echo locked
while c=$(timeout "$1" dd bs=1 count=1 2>/dev/null) && [ "$c" = . ]; do :; done
[ "$c" = d ] && exit 0
n=0 ended=0
while pids=$(grep -l -a -s -e "DDPFLEET_BOOTSTRAP=$2" /proc/[0-9]*/environ | cut -d/ -f3)
      [ -n "$pids" ] && [ "$n" -lt 150 ]; do
  [ "$n" = 0 ] && ended=$(echo $pids | wc -w)
  [ "$n" -lt 50 ] && sig=TERM || sig=KILL
  kill -s "$sig" $pids 2>/dev/null
  n=$((n + 1))
  sleep 0.1
done
echo "stopped $ended"
"""
STOP_WAIT_S = 30  # HOLD's ~15 s sweep, and a slow link's round trips


class NodeLock:
    """flock held by a node-side loop on its own channel while we send heartbeats: released
    when we leave, when the connection dies, or when the controller stops sending (frozen or
    partitioned), so a lost controller never leaves a node locked for long. Short of a clean
    leave, the node first stops what this bootstrap started there (HOLD)."""

    def __init__(self, conn: Conn, wait_s: int = LOCK_WAIT_S):
        self.conn, self.wait_s = conn, wait_s
        self.session: Session | None = None
        self.token = secrets.token_hex(8)  # engine.roles.MARK's value for this node's commands
        self._stop = threading.Event()
        self._sending = threading.Lock()
        self._closed = False  # stop_work or __exit__ closed the session

    def __enter__(self) -> NodeLock:
        argv = ["sh", "-c", LOCK_SCRIPT, "sh", LOCK_DIR, LOCK_PATH, str(self.wait_s)]
        # root's (/run/ddpfleet is 0700): Conn.session wraps it in sudo, password and all
        session = self.conn.session([*argv, str(HOLDER_SILENT_S), self.token, HOLD], root=True)
        try:
            self._until_locked(session)
        except BaseException:
            session.close()
            raise
        session.settimeout(None)
        self.session = session
        threading.Thread(target=self._beat, daemon=True).start()
        return self

    def _until_locked(self, session: Session) -> None:
        answer_s = self.wait_s + self.conn.node.command_timeout
        session.settimeout(answer_s)
        got = b""  # stdout and stderr together: "locked", or why not
        while b"locked" not in got:
            try:
                data = session.recv(64)
            except Unreachable:
                raise
            except NodeError:  # a live connection whose channel stayed quiet: the timeout
                raise NodeError(
                    self.conn.name,
                    f"no answer about {LOCK_PATH} within {answer_s:g}s; is the node overloaded?",
                ) from None
            if not data:
                why = got.decode(errors="replace").strip()
                raise NodeError(self.conn.name, self._refused(session.recv_exit_status(), why))
            got += data

    def _refused(self, code: int, why: str) -> str:
        if code == 1:
            return (
                f"another bootstrap holds {LOCK_PATH} on this node ({why or 'held'}); "
                f"waited {self.wait_s}s. Let it finish, then run again"
            )
        return f"cannot take {LOCK_PATH} (exit {code}): {why or 'no reason given'}"

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self._send(b"."):
                return  # the connection is gone: the node stops the work and lets go itself

    def _send(self, byte: bytes) -> bool:
        with self._sending:
            if self.session is None or self._closed:
                return False
            try:
                self.session.sendall(byte)
                return True
            except NodeError:
                return False

    def stop_work(self) -> str:
        """Ctrl-C: the node stops every process of this bootstrap and then lets the lock go;
        what it said ('stopped N'), once it has, or why that is not known."""
        self._stop.set()
        if not self._send(b"s"):
            return "its connection is gone: the node stops the work itself, then lets go"
        got = b""
        try:
            self.session.settimeout(STOP_WAIT_S)
            while data := self.session.recv(64):
                got += data
        except NodeError:
            return f"no word within {STOP_WAIT_S}s: the node goes on stopping it"
        finally:
            self._close()
        said = got.decode(errors="replace").split()
        ended = said[-1] if said[-2:-1] == ["stopped"] else "?"
        return f"stopped ({ended} process(es) of this bootstrap ended), lock free"

    def _close(self) -> None:
        with self._sending:
            self._closed = True
            if self.session is not None:
                self.session.close()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.session is not None and not self._closed:
            try:
                self._send(b"d")  # done: the node lets go at once, leaving what roles started
                self.session.shutdown_write()
                self.session.exited(self.conn.node.command_timeout)
            except NodeError:
                pass  # a dead connection frees the lock on the node as well
            self._close()


class Progress:
    """What each node is doing: a live row per node on a terminal (progress.Board: its long
    steps show their elapsed time), plain prefixed lines otherwise; all into the log."""

    def __init__(self, nodes: list[str], log_path: Path, clock: Clock = time.monotonic):
        self.board = Board(nodes, clock=clock)
        self.lock = threading.Lock()
        self.log = open_private(log_path)  # step reasons name hosts, paths, package sources

    def __enter__(self) -> Progress:
        self.board.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.board.__exit__(*exc)
        self.log.close()

    def step(self, node: str, step: Step) -> None:
        line = f"[{node}] {step.role}: {step.name}: {step.status}" + (
            f" ({step.reason})" if step.reason else ""
        )
        with self.lock:
            self.log.write(f"{datetime.now().isoformat(timespec='seconds')} {line}\n")
            if step.diff:
                self.log.write(step.diff)
            self.log.flush()
            self.board.set(node, f"{step.role}: {step.name} {step.status}")
            if self.board.live is None and step.status in ("changed", "failed"):
                report.console.print(line, markup=False)

    def doing(self, node: str, text: str) -> None:
        self.board.set(node, text)  # whole: the board cuts it to the window, between words


def bootstrap(
    fleet: Fleet,
    roles: list[Role],
    check: bool = False,
    diff: bool = False,
    flags: Mapping[str, Any] | None = None,
    log_dir: Path = Path("logs"),
    lock_wait_s: int = LOCK_WAIT_S,
) -> dict[str, NodeRun]:
    private_dir(log_dir)
    surveys = {
        r.name: r.module.survey(fleet, r, check) for r in roles if hasattr(r.module, "survey")
    }
    log_path = log_dir / f"bootstrap-{datetime.now():%Y%m%d-%H%M%S}.log"
    names = [n.name for n in fleet.nodes]
    stopping = threading.Event()
    locks: dict[str, NodeLock] = {}
    try:
        with Progress(names, log_path) as progress:

            def one(conn: Conn) -> NodeRun:
                host = Host(
                    conn,
                    fleet.inventory,
                    check=check,
                    diff=diff,
                    on_progress=lambda text: progress.doing(conn.name, text),
                    surveys=surveys,
                    stopping=stopping,
                )
                become.require_root(conn.escalation, conn.name, "bootstrap")
                with NodeLock(conn, lock_wait_s) as lock:
                    locks[conn.name], host.mark = lock, lock.token
                    return run_roles(host, roles, flags, on_step=progress.step)

            start = time.monotonic()
            results = fleet.map(one)
    except KeyboardInterrupt:
        stopping.set()
        stop_work(locks)
        raise
    runs = {}
    for name, r in results.items():
        if isinstance(r, NodeRun):
            runs[name] = r
        elif r.kind == "unreachable":
            runs[name] = NodeRun(name, unreachable=r.message, seconds=time.monotonic() - start)
        else:
            step = "become" if r.kind == "become" else "connect"
            runs[name] = NodeRun(name, [Step("", step, "failed", r.message)])
    if diff:
        for run in runs.values():
            for s in run.steps:
                if s.diff:
                    report.console.print(s.diff, markup=False, end="")
    report.show(recap(runs))
    report.console.print(f"log: {log_path}", markup=False)
    return runs


def stop_work(locks: Mapping[str, NodeLock]) -> None:
    """Ctrl-C: every node stops what this bootstrap started there (pip, apt, ...), in parallel,
    before its lock is let go; one line per node once it has. A second Ctrl-C leaves at once
    (each node still finishes the stop on its own: the connection's end is its signal)."""
    report.console.print("interrupted: stopping the bootstrap's work on every node", markup=False)
    said: dict[str, str] = {}
    threads = [
        threading.Thread(target=lambda n=n, lk=lk: said.setdefault(n, lk.stop_work()), daemon=True)
        for n, lk in locks.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in sorted(said):
        report.console.print(f"{name}: {said[name]}", markup=False)


def recap(runs: dict[str, NodeRun]):
    rows = [
        (
            n,
            r.count("ok"),
            r.count("changed"),
            r.count("failed"),
            r.count("skipped"),
            r.unreachable or 0,
            f"{r.seconds:.1f}",
        )
        for n, r in runs.items()
    ]
    return report.table("recap", RECAP_COLUMNS, rows)


class Failure(NamedTuple):
    """One thing that failed on one node: a role's step, the connection, or escalation."""

    node: str
    what: str  # "role: step", "unreachable", "connect" or "become"
    reason: str

    def __str__(self) -> str:
        return f"{self.node}: {self.what}: {self.reason}"


def failures(runs: dict[str, NodeRun]) -> list[Failure]:
    out = []
    for name, run in runs.items():
        if run.unreachable:
            out.append(Failure(name, "unreachable", run.unreachable))
        for s in run.steps:
            if s.status == "failed":
                what = ": ".join(part for part in (s.role, s.name) if part)
                out.append(Failure(name, what, s.reason))
    return out
