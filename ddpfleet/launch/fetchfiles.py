"""The local half of `invoke fetch` (fetch.py says what and from where): each file into
NAME.part and renamed into place with the node's mode and mtime, only what changed, an
interrupted file continued, links kept as links, nothing written outside the destination.

    got = Fetched(dest)
    bring("node0", sftp, "/var/lib/ddpfleet/runs/r1/checkpoints", entries, got)

Unchanged means the same size and mtime (whole seconds, SFTP's resolution) as on the node: a
file rewritten within the same second at the same size is not noticed (the checkpoint
contract's MANIFEST.json names each file's SHA-256 for a check that must be exact).
"""

from __future__ import annotations

import os
import posixpath
import stat as st
from dataclasses import dataclass, field
from pathlib import Path

from ddpfleet import progress

TAIL = 64 * 1024  # a .part continues only when its last bytes are still the node's
CHUNK = 1 << 20
IN_FLIGHT = 32  # SFTP reads outstanding per file (32 KiB each), however big the file
PART = ".part"


@dataclass(frozen=True)
class Entry:
    """One thing under PATH on the node, `rel` to PATH ('' is PATH itself)."""

    rel: str
    kind: str  # "dir", "file" or "link"
    size: int = 0
    mtime: int = 0
    mode: int = 0o600
    target: str = ""  # a link: where it points, relative to its own directory


@dataclass
class Fetched:
    """One node's fetch: where it landed and what moved."""

    dest: Path
    files: int = 0  # brought (changed or new)
    bytes: int = 0  # sent over the wire (a resumed file: only its rest)
    unchanged: int = 0
    resumed: list[tuple[str, int]] = field(default_factory=list)  # (rel, from byte)
    problems: list[str] = field(default_factory=list)  # one line each: refused, unreadable

    def summary(self, home: Path) -> str:
        moved = f"{self.files} file{'s' * (self.files != 1)}, {progress.size(self.bytes)}"
        more = [f"{self.unchanged} unchanged"] if self.unchanged else []
        more += [f"resumed {rel} at {progress.size(at)}" for rel, at in self.resumed]
        where = self.dest.relative_to(home) if self.dest.is_relative_to(home) else self.dest
        return f"{moved} into {where}" + (f" ({'; '.join(more)})" if more else "")


def bring(node: str, sftp, real: str, entries: list[Entry], got: Fetched) -> None:
    """`entries` (fetch._walk's, parents first) from `real` on the node into got.dest."""
    base = got.dest if entries and entries[0].kind == "dir" else got.dest.parent
    todo: list[tuple[Entry, Path, int]] = []
    for e in entries:
        local = got.dest / e.rel if e.rel else got.dest
        if not _inside(local, base):  # a local symlink on the way: never written through
            got.problems.append(f"{local}: leads out of {base} locally; not written")
        elif e.kind == "dir":
            _dir(local, got)
        elif e.kind == "link":
            _symlink(local, e, got)
        elif _same(local, e):
            got.unchanged += 1
            if st.S_IMODE(local.lstat().st_mode) != e.mode:
                local.chmod(e.mode)
        else:
            todo.append((e, local, _resumable(sftp, posixpath.join(real, e.rel), local, e)))
    with progress.transfer(
        node, f"fetch {got.dest.name}", sum(e.size - at for e, _, at in todo)
    ) as sent:
        for e, local, at in todo:
            _get(sftp, posixpath.join(real, e.rel), local, e, at, sent, got)
    for e in reversed(entries):  # deepest first: a dir's mode once nothing more goes in
        local = got.dest / e.rel if e.rel else got.dest
        if e.kind == "dir" and local.is_dir() and not local.is_symlink():
            local.chmod(e.mode)


def _inside(local: Path, base: Path) -> bool:
    real, top = os.path.realpath(local.parent), os.path.realpath(base)
    return real == top or real.startswith(top + os.sep) or local == base


def _dir(local: Path, got: Fetched) -> None:
    """A directory here, writable by us while the fetch lasts (its mode comes at the end)."""
    if local.is_symlink() or (local.exists() and not local.is_dir()):
        local.unlink()  # the node has a directory there now
    local.mkdir(mode=0o700, exist_ok=True)
    mode = st.S_IMODE(local.stat().st_mode)
    if mode & 0o700 != 0o700:
        local.chmod(mode | 0o700)


def _symlink(local: Path, e: Entry, got: Fetched) -> None:
    if local.is_symlink() and os.readlink(local) == e.target:
        got.unchanged += 1
        return
    if local.is_dir() and not local.is_symlink():
        got.problems.append(f"{e.rel}: a symlink on the node, a directory here; not replaced")
        return
    if local.is_symlink() or local.exists():
        local.unlink()
    os.symlink(e.target, local)
    got.files += 1


def _same(local: Path, e: Entry) -> bool:
    try:
        a = local.lstat()
    except FileNotFoundError:
        return False
    return st.S_ISREG(a.st_mode) and a.st_size == e.size and int(a.st_mtime) == e.mtime


def _resumable(sftp, remote: str, local: Path, e: Entry) -> int:
    """Where the file's .part continues: its size when its last bytes are still the node's
    there, else 0 (started again)."""
    part = local.with_name(local.name + PART)
    try:
        a = part.lstat()
    except FileNotFoundError:
        return 0
    if not st.S_ISREG(a.st_mode) or not 0 < a.st_size <= e.size:
        return 0
    n = min(TAIL, a.st_size)
    with part.open("rb") as f:
        f.seek(a.st_size - n)
        mine = f.read(n)
    try:
        with sftp.open(remote, "rb") as f:
            f.seek(a.st_size - n)
            theirs = f.read(n)
    except PermissionError:
        return 0  # said once, by _get
    return a.st_size if mine == theirs else 0


def _get(sftp, remote: str, local: Path, e: Entry, at: int, sent, got: Fetched) -> None:
    """The file from byte `at` into its .part, then renamed into place, mode and mtime set."""
    part = local.with_name(local.name + PART)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        f = sftp.open(remote, "rb")
    except PermissionError:
        got.problems.append(f"{e.rel}: permission denied to the run's user; not fetched")
        return
    with f, os.fdopen(os.open(part, flags, 0o600), "wb") as out:
        out.truncate(at)
        out.seek(at)
        f.seek(at)
        if at < e.size:  # (nothing to ask for: a .part that was whole, an empty file)
            f.prefetch(e.size, IN_FLIGHT)
        done = at
        while done < e.size:
            data = f.read(min(CHUNK, e.size - done))
            if not data:
                break
            out.write(data)
            done += len(data)
            got.bytes += len(data)
            sent.advance(len(data))
        out.flush()
        if done != e.size:  # it shrank while we read: the next fetch takes it again
            got.problems.append(f"{e.rel}: changed while fetched; fetch again")
            return
        os.fchmod(out.fileno(), e.mode)
        os.utime(out.fileno(), (e.mtime, e.mtime))
    os.replace(part, local)
    got.files += 1
    if at:
        got.resumed.append((e.rel, at))
