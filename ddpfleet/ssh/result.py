"""What one command on one node gave back. Its own module: the warm path (kept.py) uses it
without loading paramiko."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Result:
    node: str
    command: str
    exit_code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0
