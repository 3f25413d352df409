"""Ctrl-C on an attached Slurm run is acted on between polls, never inside one: a
KeyboardInterrupt raised inside an SSH write can break the connection the scancel goes
through (CI saw the job left running)."""

import os
import signal

from ddpfleet.launch.interrupts import Interrupts
from ddpfleet.launch.slurm.run import Job


class Polled(Job):
    """A Job with no cluster: each poll is one SSH round trip that a signal lands inside."""

    def __init__(self, states: list[str], signal_in_poll: int | None = None):
        self.states, self.signal_in_poll = states, signal_in_poll
        self.polls, self.finished = 0, []
        self.info, self.output, self.id = {}, None, "7"

    def poll(self) -> None:
        self.polls += 1
        if self.polls == self.signal_in_poll:
            os.kill(os.getpid(), signal.SIGINT)  # lands here, mid "write"
        self.finished.append(self.polls)  # the rest of the round trip still ran
        self.info = {"JobState": self.states[min(self.polls, len(self.states)) - 1]}

    def read(self) -> None:
        pass


def test_a_signal_inside_a_poll_lets_the_poll_finish_then_ends_the_follow():
    job = Polled(["RUNNING"] * 50, signal_in_poll=2)
    with Interrupts() as interrupts:
        assert job.follow(interrupts) is False
    assert job.finished == [1, 2] and interrupts.count == 1


def test_a_job_that_ends_unsignalled_is_followed_to_its_end():
    job = Polled(["PENDING", "RUNNING", "COMPLETED"])
    with Interrupts() as interrupts:
        assert job.follow(interrupts) is True
    assert job.polls == 3 and interrupts.count == 0


def test_the_handlers_before_are_back_after():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    with Interrupts():
        assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
    assert {s: signal.getsignal(s) for s in before} == before
