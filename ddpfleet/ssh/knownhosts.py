"""known_hosts lookups shared by `connect` and `trust`, so both see the same pins.

Precedence: the project file (ssh.known_hosts) first, then ~/.ssh/known_hosts. A host with
any key in the project file is judged by the project file alone: a stale line in the user's
file never shadows a project pin. ~/.ssh/known_hosts is only ever read.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from pathlib import Path
from typing import NamedTuple

import paramiko

from ddpfleet.hygiene import state_dir

USER_KNOWN_HOSTS = "~/.ssh/known_hosts"  # expanded at each lookup: $HOME decides

_parsed: dict[str, tuple[tuple, paramiko.HostKeys]] = {}
_parsed_lock = threading.Lock()


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style 'SHA256:...' fingerprint of a host key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def pinned(name: str, project: Path) -> tuple[dict[str, paramiko.PKey], Path]:
    """Every key recorded for `name` ({type: key}) and the file they come from.

    Empty when no file knows the host; the path is then the project file, where `trust`
    records it.
    """
    for path in (project, Path(USER_KNOWN_HOSTS).expanduser()):
        if path.is_file():
            keys = parsed(path).lookup(name)
            if keys:
                return {t: keys[t] for t in keys}, path
    return {}, project


class PinnedKey(NamedTuple):
    """A pinned host key as code outside the SSH layer uses it: no paramiko type."""

    fingerprint: str  # SHA256:...
    base64: str  # the key as known_hosts writes it


def pinned_keys(name: str, project: Path) -> dict[str, PinnedKey]:
    """pinned(), each key as its fingerprint and base64 ({type: PinnedKey})."""
    keys, _ = pinned(name, project)
    return {t: PinnedKey(fingerprint(k), k.get_base64()) for t, k in keys.items()}


def parsed(path: Path) -> paramiko.HostKeys:
    """The file's keys, parsed once per version of the file: a cold fleet of 32 nodes read
    the same file 32 times (~20 ms). A version is its inode, size and change times; any
    rewrite, `trust`'s appends included, is read afresh."""
    version = file_version(path)
    with _parsed_lock:
        seen = _parsed.get(str(path))
        if seen is None or seen[0] != version:
            seen = _parsed[str(path)] = (version, paramiko.HostKeys(str(path)))
        return seen[1]


def prefer(transport: paramiko.Transport, keys: dict[str, paramiko.PKey]) -> None:
    """Ask the server for a pinned key type first, as OpenSSH does: a host that also has a
    key of another type must not look changed."""
    if keys:
        opts = transport.get_security_options()
        first = next(iter(keys))
        opts.key_types = [first] + [t for t in opts.key_types if t != first]


def append(path: Path, line: str) -> None:
    """Add one line; existing lines are never rewritten. A file whose last line lacks its
    newline gets one first, or the new entry would become part of that line."""
    state_dir(path.parent)
    with open(path, "a+b") as f:
        f.seek(0, 2)
        if f.tell() > 0:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.encode())


def file_version(path: str | os.PathLike) -> tuple | None:
    """A file's version (inode, size, change times; None when it is missing): any rewrite
    changes it. What the caches of parsed files and the keeper's connections key on."""
    try:
        st = os.stat(os.path.expanduser(str(path)))
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
