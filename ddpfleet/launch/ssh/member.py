"""One node's gang_runner.py on one exec channel of the run's connection, preflight to exit."""

from __future__ import annotations

import json
import shlex
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path

from ddpfleet.errors import NodeError
from ddpfleet.hygiene import open_private
from ddpfleet.launch import sync
from ddpfleet.launch.clues import Clues, ExitBarrier, split_rank
from ddpfleet.launch.outcome import Outcome
from ddpfleet.launch.output import LineSplitter, Output
from ddpfleet.launch.plan import NodePlan
from ddpfleet.launch.verdict import RESTART_LINE, RunState, own_failure
from ddpfleet.ssh.connection import Conn, Session

STOP_GRACE_S = 3.0  # runner: SIGTERM, then SIGKILL this much later (torchrun's own is 30 s)
HEARTBEAT_S = 2.0
WATCHDOG_S = 30  # silence either way this long: the connection is dead (runner stops the run)
CONTROL = b"\x1e"
TAIL_CHARS = 2000  # of each line kept for the last-lines of a failure message
# gang_runner.py and the helpers it loads, in that order
RUNNER_FILES = ("gang_runner.py", "node_helper.py", "proctree.py", "masterport.py", "part.py")


class Member:
    """One node's gang_runner.py on one exec channel of the run's connection; a thread pumps
    its output. open() starts the preflight, launch() the run, call_off() ends it unstarted."""

    def __init__(self, conn: Conn, python: str, out: Output, user: str | None = None):
        self.conn, self.python, self.out = conn, python, out
        self.user = user  # torchrun and every rank run as this user
        self.chan: Session | None = None
        self.plan: NodePlan | None = None
        self.nproc = 1
        self.log = None
        self.facts: dict | None = None
        self.got_facts = threading.Event()
        self.handoff: dict | None = None  # the runner waiting to hand the master port over
        self.handing = threading.Event()
        self.error: str | None = None  # the runner's last error event
        self.outcome = Outcome(conn.name)
        self.lines: deque[tuple[int | None, str]] = deque(maxlen=400)  # enough for a traceback
        self.clues = Clues()
        self.barrier = ExitBarrier()  # torchrun's exit-barrier noise: to the log only
        self.stopped_by_us = False  # the runner said it is stopping at our word
        self.told_to_stop = False
        self.failed_itself = False  # torchrun said a worker failed before we said stop
        self.restarts: list[str] = []  # torchrun's restart lines (--max-restarts; part.FRESH)
        self.started = self.last_heard = time.monotonic()
        self.done = threading.Event()
        self.finishing = threading.Lock()

    @property
    def name(self) -> str:
        return self.conn.name

    @property
    def failing(self) -> bool:
        """Failed or lost, or torchrun already said a worker died (its exit is seconds off)."""
        return self.failed_itself or (
            self.done.is_set() and self.outcome.state in (RunState.FAILED, RunState.LOST)
        )

    def open(self, request: Mapping[str, object]) -> None:
        """Start the runner: its sources, then the preflight request, on stdin."""
        # The run id in the runner's own environment too: every process of the run carries it.
        env = shlex.join(["env", f"DDPFLEET_RUN_ID={request['run_id']}"])
        command = f"{env} {sync.helper_command(self.python, 'gang_runner.py')}"
        # Another user than the login's: the runner is root, as a detached run's supervisor
        # is (the run's cgroup is root's to make and to kill), and drops torchrun to the user.
        # A login that cannot become root starts it as that user directly, which fails as such.
        other = self.user is not None and self.user != self.conn.node.user
        if other and self.conn.escalation.how != "none":
            chan = self.conn.session(command, root=True)
            request = {**request, "user": self.user}
        else:
            chan = self.conn.session(command, user=self.user)
        chan.sendall(
            sync.helper_sources(RUNNER_FILES)
            + json.dumps({**request, "node": self.name}).encode()
            + b"\n"
        )
        self.chan = chan
        threading.Thread(target=self.pump, name=f"pump-{self.name}", daemon=True).start()

    def wait_facts(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while not self.got_facts.wait(0.05):
            if self.done.is_set() or time.monotonic() > deadline:
                raise NodeError(self.name, self.why_no_facts(timeout))
        return self.facts

    def why_no_facts(self, timeout: float) -> str:
        said = " | ".join(t for _, t in list(self.lines)[-3:])
        if self.outcome.exit_code == 127 or "No such file or directory" in said:
            return (
                f"no python at {self.python} (the training env); run invoke bootstrap, "
                "or fix python_env in the inventory"
            )
        if not self.done.is_set():
            return f"the preflight probe gave no answer within {timeout:g}s"
        return f"the preflight probe failed (exit {self.outcome.exit_code}): {said or 'no output'}"

    def launch(self, node: NodePlan, nproc: int, log_path: Path) -> None:
        """Start torchrun: the spec goes on stdin (--env values may be secrets)."""
        self.plan, self.nproc = node, nproc
        self.clues = Clues(node.rank, nproc)
        self.log = open_private(log_path)  # closed in finish, by the pump thread
        self.started = self.last_heard = time.monotonic()
        spec = {
            "argv": list(node.argv),
            "env": dict(node.env),
            "cwd": node.cwd,
            "grace": STOP_GRACE_S,
            "watchdog": WATCHDOG_S,
            "heartbeat": HEARTBEAT_S,
        }
        self.chan.sendall(json.dumps(spec).encode() + b"\n")

    def hand_off(self, name: str, timeout: float = 60) -> dict:
        """A detached run's master: the runner keeps the port and waits for the run's
        supervisor to take it over the abstract unix socket `name`. Returns what that
        supervisor checks its peer by: {"name", "pid", "uid"} of the runner."""
        self.chan.sendall(json.dumps({"handoff": name}).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while not self.handing.wait(0.05):
            if self.done.is_set() or time.monotonic() > deadline:
                said = self.error or " | ".join(t for _, t in list(self.lines)[-3:])
                raise NodeError(
                    self.name,
                    f"the preflight could not keep the master port: {said or 'no answer'}",
                )
        return self.handoff

    def give_up(self, why: str) -> None:
        """Treat the node as lost: close its channel. Its runner, if it still hears anything,
        sees EOF and stops the run; a dead peer never confirms, so do not wait for it."""
        self.outcome.why = why
        self.chan.close()
        if not self.done.wait(2):  # the pump's own finish, if the close reaches it at once
            self.finish(-1)

    def call_off(self) -> None:
        """EOF before a spec (or before a hand-off was taken): the runner frees the port, if it
        still has it, and exits, having started nothing."""
        if self.chan is not None:
            try:
                self.chan.shutdown_write()
            except NodeError:
                pass
            self.done.wait(5)  # the runner frees the port first; past this, close regardless
            self.chan.close()

    def send(self, word: str) -> None:
        self.told_to_stop = self.told_to_stop or word in ("stop", "kill")
        try:
            if self.chan is not None and not self.done.is_set():
                self.chan.sendall(word.encode() + b"\n")
        except NodeError:
            pass  # its connection is gone: the pump reports that

    def pump(self) -> None:
        lines = LineSplitter()
        try:
            while data := self.chan.recv(65536):
                self.last_heard = time.monotonic()
                for raw in lines.feed(data):
                    self.handle(raw)
            for raw in lines.end():
                self.handle(raw)
            self.show(self.barrier.end())
            code = self.chan.recv_exit_status()
        except NodeError:
            code = -1
        self.finish(code)

    def handle(self, raw: bytes) -> None:
        if raw.startswith(CONTROL):
            return self.control(raw[1:])
        text = raw.decode(errors="replace").rstrip("\r")
        rank, body = (
            (None, text) if self.plan is None else split_rank(text, self.plan.rank, self.nproc)
        )
        self.lines.append((rank, body[:TAIL_CHARS]))  # the tail for a failure message
        if rank is None and RESTART_LINE.match(body):
            self.restarts.append(body)
            self.out.release()  # torchrun starts its workers again: every rank shows again
        if self.plan is not None:
            calm = self.clues.first_at is None  # no sign of failure on this node yet
            if self.clues.feed(rank, body, time.monotonic()):
                # with a restart left, torchrun starts its workers again: not the gang's failure
                self.failed_itself = self.failed_itself or not (
                    self.told_to_stop or self.restarting()
                )
            if calm and self.clues.first_at is not None:  # its first sign of failure: keep to it
                self.out.hold((self.name, self.clues.rank))
        self.show(self.barrier.feed(rank, body))

    def show(self, lines) -> None:
        """(rank, text, show) lines: on the console and in the node's log, or the log only."""
        for rank, body, show in lines:
            prefix = f"[{self.name}]" if rank is None else f"[{self.name} r{rank}]"
            self.out.line(f"{prefix} {body}", self.log, key=(self.name, rank), show=show)

    def control(self, payload: bytes) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            return
        kind = event.pop("event", None)
        if kind == "hb":
            return
        if kind == "facts":
            self.facts = event
            self.got_facts.set()
        elif kind == "handoff":
            self.handoff = event
            self.handing.set()
        elif kind == "stopping":
            self.stopped_by_us = True
            if self.log is not None and not self.log.closed:
                self.log.write(f"[{self.name}] ddpfleet: stopping: {event.get('reason')}\n")
        elif kind == "killed":
            what = (
                "torchrun, its workers gone"
                if event.get("agent_only")
                else f"pids {event.get('pids')}, still there"
            )
            self.out.line(
                f"[{self.name}] ddpfleet: SIGKILLed {what} {event.get('after')}s after SIGTERM",
                self.log,
            )
        elif kind == "error":
            self.error = event.get("error")
            self.out.line(f"[{self.name}] ddpfleet: {event.get('error')}", self.log)

    def finish(self, code: int) -> None:
        with self.finishing:
            if self.done.is_set():
                return  # given up on already; the pump came back late
            self.conclude(code)
            self.done.set()

    def conclude(self, code: int) -> None:
        o = self.outcome
        o.seconds = time.monotonic() - self.started
        o.exit_code = None if code == -1 else code
        if code == 0:
            o.state = RunState.SUCCEEDED
        elif code == -1:
            o.state, o.why = RunState.LOST, o.why or "its connection dropped"
        elif self.stopped_by_us and not self.failed_itself and not self.raised_itself():
            o.state = RunState.STOPPED
        else:
            o.state = RunState.FAILED
        if o.state in (RunState.FAILED, RunState.LOST):
            o.rank = self.clues.rank
            o.evidence_at = self.clues.first_at or time.monotonic()
            if o.exit_code is not None:  # the failed rank's own code, not torchrun's or ours
                o.exit_code = self.clues.exits.get(o.rank, o.exit_code)
        o.last_lines = self.tail(o.rank)
        if self.log is not None:
            self.log.close()

    def restarting(self) -> bool:
        """torchrun has a --max-restarts restart left for the failure it just reported."""
        argv = list(self.plan.argv) if self.plan is not None else []
        most = int(argv[argv.index("--max-restarts") + 1]) if "--max-restarts" in argv else 0
        return len(self.restarts) < most

    def raised_itself(self) -> bool:
        """A rank here raised (its traceback says why, and not that a peer went away), even if
        our stop reached this node before its torchrun said so: the stop may have come from a
        node whose ranks only failed because this one's was gone."""
        rank = self.clues.traceback_rank
        return rank is not None and own_failure(self.tail(rank))

    def tail(self, rank: int | None, n: int = 12) -> tuple[str, ...]:
        """The failing rank's last lines when known (its traceback), else the node's."""
        mine = [t for r, t in self.lines if rank is not None and r == rank]
        return tuple((mine or [t for _, t in self.lines])[-n:])
