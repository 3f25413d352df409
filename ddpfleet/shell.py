"""Small shell idioms shared by the roles and the jobs:

sh(script, *args)   one sh script with its values as positional parameters, quoted once
tail(text)          the last lines of a command's output as one line, for a message
sha256(data)        the hex digest probes compare with `sha256sum` on the node
Secret              a password or token: prints as *** everywhere, reveal() gives the text
APT_GET             apt-get that waits for the dpkg lock
"""

from __future__ import annotations

import hashlib
import shlex

# Fresh cloud VMs run unattended-upgrades at boot: wait for its dpkg lock instead of failing.
APT_GET = ["apt-get", "-o", "DPkg::Lock::Timeout=600"]


def sh(script: str, *args: str) -> str:
    """`sh -c SCRIPT sh ARGS...`: the script stays a constant, the values arrive as $1, $2 ...
    so nothing the inventory says is ever parsed as shell."""
    return shlex.join(["sh", "-c", script, "sh", *args])


def tail(text: str, lines: int = 3, sep: str = " | ") -> str:
    """The last `lines` lines of `text`, stripped, joined by `sep` ('' for no output).

    A failed command's stderr ends with the reason (a traceback's last line, pip's error);
    one line keeps a recap row a row."""
    return sep.join(line for line in text.strip().splitlines()[-lines:])


def sha256(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


class Secret:
    """A password on its way to argon2. Only reveal() gives the text; everything else says ***."""

    __slots__ = ("_text",)

    def __init__(self, text: str):
        self._text = text

    def reveal(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"
