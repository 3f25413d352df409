"""SIGINT, SIGTERM and SIGHUP counted, not raised: a launcher acts on them between its own steps.

A KeyboardInterrupt raised wherever the main thread stands can land inside an SSH write, leave
half a packet on the wire, and the node's sshd then drops the very connection the stop must go
through (seen in CI: an attached Slurm run's scancel lost, the job left running). The handler
only counts (it must not take a lock the loop holds); the SSH gang and the Slurm job look at
the count between polls.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupts:
    """A with-block during which SIGNALS only add to `count`; the handlers before come back at
    its end."""

    def __init__(self):
        self.count = 0
        self.previous: dict = {}

    def __enter__(self) -> Interrupts:
        self.previous = {s: signal.signal(s, self.on_signal) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def on_signal(self, signum, frame) -> None:
        self.count += 1
