"""What one command on one node gave back, and IF_ABLE, a way to ask for it. Its own module:
the warm path (kept.py, gpustatus.py) uses them without loading paramiko or ssh.become."""

from __future__ import annotations

from dataclasses import dataclass

# run(..., root=IF_ABLE): as root where the connection can become root (ssh.become), else as
# the login user: for a read-only job that sees more as root (gpu-status reads other users'
# processes). The run itself decides, so through the keeper it is one request, not two.
IF_ABLE = "if-able"


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
