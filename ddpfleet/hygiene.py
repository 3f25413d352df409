"""What we show and what we keep: node text made inert, credentials masked, private files.

    clean("\x1b]52;c;aGk=\x07ok [bold]")   -> "ok [bold]"     (print it with markup off, or as Text)
    mask_url("https://u:tok@host/simple")  -> "https://u:***@host/simple"
    private_dir(Path("logs"))              -> logs/ made 0700; open_private(path) -> a 0600 file
    state_dir(root / ".ddpfleet" / "slurm") -> made, and .ddpfleet/.gitignore says `*`

Node output is data: a training script, /etc/os-release or a jupyter user's runtime file can hold
terminal escapes (OSC 52 writes the operator's clipboard, cursor moves forge "ok" lines) and rich
markup. Credentials in URLs go to pip through the environment, never argv; where a URL is shown,
its password and query are masked.

ddpfleet keeps its controller state beside the inventory, in .ddpfleet/ (known_hosts, the cluster
CA, the munge key, the wheelhouse, the sandbox's keys, the runs index). The inventory often sits
inside a git project, so every .ddpfleet/ ddpfleet makes holds a .gitignore of `*`: none of it
goes into a commit, or into the `git ls-files` list the code sync starts from.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

# A whole escape sequence goes, not only its ESC, so no '[31m' debris is left: CSI (ESC [ or
# the C1 byte CSI) up to its final byte; OSC, DCS, SOS, PM, APC strings up to BEL or ST; any
# other two-byte ESC sequence. An unterminated string ends at the line's end.
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f]).*?(?:\x07|\x1b\\|\x9c|(?=\n)|$)"
    r"|\x1b[ -~]?",
)
# Every other C0 control, DEL and C1 control, except \t (and \n where a caller keeps lines).
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_CONTROLS_KEEP_NL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# scheme://user:password@ in free text (pip's and curl's errors, our own messages).
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s/@:]*):[^\s/@]*@")


def clean(text: str, keep_newlines: bool = False) -> str:
    """Node text without escape sequences or control characters (\\t stays)."""
    text = _ESCAPES.sub("", text)
    return (_CONTROLS_KEEP_NL if keep_newlines else _CONTROLS).sub("", text)


def mask_url(url: str) -> str:
    """'https://user:token@host/x?key=v' -> 'https://user:***@host/x?***'; others unchanged.

    A bare 'https://token@host/' (no colon) is masked whole, as the token it usually is.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return mask_urls(url)
    if not parts.scheme or not parts.netloc:
        return url
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if colon else f"***@{hostport}"
    if query:
        query = "***"
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def mask_urls(text: str) -> str:
    """Every 'scheme://user:password@' in free text with the password masked."""
    return _USERINFO.sub(r"\1:***@", text)


def private_dir(path: Path) -> Path:
    """Make `path` (and missing parents) a directory only its owner can enter: 0700.

    An existing directory is tightened too: logs/ made by an older ddpfleet was 0755.
    """
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


STATE_DIR = ".ddpfleet"


def state_dir(path: Path, mode: int = 0o777) -> Path:
    """`path` made with its missing parents (`mode` for the last one, as Path.mkdir), and a
    .gitignore of `*` in each .ddpfleet on the way that lacks one: made now, or by an older
    ddpfleet that wrote none. One it cannot write (not ours) is left as it is."""
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    for d in (path, *path.parents):
        if d.name != STATE_DIR:
            continue
        try:  # O_EXCL: an existing .gitignore (or a link named so) is never written through
            fd = os.open(d / ".gitignore", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write("*\n")
    return path


def open_private(path: Path, mode: str = "a") -> IO:
    """Open a file for writing ('a', 'w', 'ab', 'wb') that is created 0600 (never readable by
    others, not even between create and chmod); an existing file is tightened to 0600."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, mode)


def write_private(path: Path, text: str) -> None:
    with open_private(path, "w") as f:
        f.write(text)
