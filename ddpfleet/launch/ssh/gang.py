"""Every node's member run as one gang: the first failure, a lost connection or a signal
stops them all."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from ddpfleet.errors import NodeError
from ddpfleet.launch.interrupts import Interrupts
from ddpfleet.launch.output import Output
from ddpfleet.launch.plan import NodePlan, Plan
from ddpfleet.launch.ssh.member import HEARTBEAT_S, STOP_GRACE_S, WATCHDOG_S, Member
from ddpfleet.launch.verdict import RunState


class Gang:
    """Every member runs until all are done; the first failure, a lost connection or a signal
    (SIGINT, SIGTERM, SIGHUP) stops the rest. A second signal kills at once."""

    def __init__(self, members: Sequence[Member], out: Output):
        self.members, self.out = list(members), out
        self.interrupts = Interrupts()
        self.handled = 0
        self.reason: str | None = None  # why the gang was stopped, once it was
        self.deadline: float | None = None

    def run(self, p: Plan, run_dir: Path) -> None:
        with self.interrupts:
            for m, node in zip(self.members, p.nodes):
                self.launch(m, node, p.nproc, run_dir / f"{node.node}.log")
            self.loop()

    def launch(self, m: Member, node: NodePlan, nproc: int, log_path: Path) -> None:
        try:
            m.launch(node, nproc, log_path)
        except NodeError as e:
            m.outcome.why = f"could not start: {e.message}"

    def loop(self) -> None:
        beat = time.monotonic()
        while not all(m.done.is_set() for m in self.members):
            time.sleep(0.05)
            self.check_signals()
            self.check_failures()
            if time.monotonic() - beat >= HEARTBEAT_S:
                beat = time.monotonic()
                for m in self.members:
                    m.send("hb")
                    if not m.done.is_set() and beat - m.last_heard > WATCHDOG_S:
                        m.give_up(f"no word from it for {WATCHDOG_S}s")
            if self.deadline is not None and time.monotonic() > self.deadline:
                self.abandon()
                return

    def check_signals(self) -> None:
        while self.handled < self.interrupts.count:
            self.handled += 1
            if self.handled == 1:
                self.out.line(
                    "ddpfleet: interrupted: stopping every node (interrupt again to kill at once)"
                )
                self.stop("interrupted")
            else:
                self.out.line("ddpfleet: killing every node now")
                self.kill()

    def check_failures(self) -> None:
        if self.reason is not None:
            return
        for m in self.members:
            if m.failing:
                why = "lost its connection" if m.outcome.state is RunState.LOST else "failed"
                self.out.line(f"ddpfleet: {m.name} {why}: stopping every node")
                self.stop(f"{m.name} {why}")
                return

    def stop(self, reason: str) -> None:
        self.reason = self.reason or reason
        for m in self.members:
            m.send("stop")
        # The runners kill after STOP_GRACE_S; past this, stop waiting for a node to confirm.
        # The 12 s: the runner's SIGKILL sweep, its exit report and a slow link's round trips.
        self.deadline = time.monotonic() + STOP_GRACE_S + 12

    def kill(self) -> None:
        self.reason = self.reason or "killed"
        for m in self.members:
            m.send("kill")
        # A kill needs no grace, only the sweep and the report: less time than a stop.
        self.deadline = min(self.deadline or float("inf"), time.monotonic() + 8)

    def abandon(self) -> None:
        """A node that never confirmed: close its channel; its runner sees EOF and kills."""
        for m in self.members:
            if not m.done.is_set():
                m.give_up("did not confirm the stop; its channel was closed")
