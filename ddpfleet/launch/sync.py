"""Mirror the project directory to every node, sending only what changed.

    files = project_files(Path("."), keep_out)    # what the project is, honouring .gitignore
    change = diff(files, remote_manifest)         # pure: what to send, what to delete
    stats = push(conn, python, code_dir, root, files, change, script, remote, run_id)

The node's side comes from node_helper.py's `probe`: the sha256 and mode of each path the
mirror itself put there (its manifest, CODE_DIR/.ddpfleet/manifest.json), so a sync of an
unchanged tree costs no channel at all, and files a run wrote beside the code (checkpoints,
outputs) are neither hashed nor ever deleted. Modes travel as they are: a 0600 file stays 0600,
and the code dir is made 0700. In a git work tree the file list
is `git ls-files -co --exclude-standard` (tracked plus untracked-but-not-ignored); elsewhere a
walk. Either way logs/, envs/, .venv and .git at the top, and .ddpfleet and __pycache__ at any
depth, stay home: run output, environments, ddpfleet's keys and state (an inventory in a
subdirectory keeps its .ddpfleet/ there), and bytecode for another Python. So does every path in
`keep_out` (the secrets the inventory names: ddpfleet.secretfiles), whatever .gitignore says.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import stat
import subprocess
import tarfile
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ddpfleet import progress
from ddpfleet.errors import CommandError, NodeError, PlanError
from ddpfleet.node import NODE_DIR

ALWAYS_LEFT_OUT = ("logs", "envs", ".venv", ".git")  # at the project's top
NEVER_SYNCED = (".ddpfleet", "__pycache__")  # a directory of that name at any depth
# Reads the helper's source from stdin (length line first) and runs it as __main__; the rest of
# stdin is then the helper's own input. Keeps `ps` short and needs nothing on the node.
# The node side of helper_source: runs the first file sent on stdin, which loads the helpers
# sent after it with load_helper (each a module of its own, its source kept for a replay).
HELPER_LOADER = (
    "import sys,types;b=sys.stdin.buffer\n"
    "def load_helper(n):\n"
    " m=types.ModuleType(n[:-3]);m.__source__=b.read(int(b.readline()))\n"
    " exec(compile(m.__source__,n,'exec'),m.__dict__);return m\n"
    "__source__=b.read(int(b.readline()));exec(compile(__source__,'{name}','exec'))"
)


@dataclass(frozen=True)
class Entry:
    """One synced path: kind 'f' (file) or 'l' (symlink), permission bits (0 for a symlink),
    sha256 (of the target for a symlink). Same shape as a line of the node's manifest."""

    kind: str
    mode: int
    sha256: str

    @property
    def executable(self) -> bool:
        return bool(self.mode & 0o100)

    def as_list(self) -> list:
        return [self.kind, self.mode, self.sha256]


@dataclass(frozen=True)
class Change:
    send: tuple[str, ...]
    delete: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not self.send and not self.delete


@dataclass(frozen=True)
class SyncStats:
    sent: int
    bytes: int
    deleted: int
    script: bool  # the training script is on the node after the sync


def left_out(rel: str, keep_out: Collection[str] = ()) -> bool:
    """Whether a path relative to the project stays home; `keep_out`: relative paths (files or
    directories) that do too, as inside() gives them."""
    parts = rel.split("/")
    if parts[0] in ALWAYS_LEFT_OUT or any(p in NEVER_SYNCED for p in parts):
        return True
    return any(rel == k or rel.startswith(k + "/") for k in keep_out)


def inside(root: Path, paths: Iterable[Path]) -> frozenset[str]:
    """Those of `paths` (absolute) that lie in root, relative to it: as written and with
    symlinks resolved, so a key reached through a linked directory is found too."""
    found = set()
    for path in paths:
        for p, r in (
            (Path(os.path.normpath(path)), root.absolute()),
            (path.resolve(), root.resolve()),
        ):
            try:
                found.add(p.relative_to(r).as_posix())
            except ValueError:
                continue
    found.discard(".")
    return frozenset(found)


def listed_paths(root: Path, keep_out: Collection[str] = ()) -> list[str]:
    """Relative paths the project consists of: git's view when root is in a work tree."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=root,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        return sorted({p for p in out.decode().split("\0") if p})
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        pass
    found = []
    for top, dirs, files in os.walk(root):
        rel_top = Path(top).relative_to(root).as_posix()
        dirs[:] = [
            d for d in dirs if not left_out(d if rel_top == "." else f"{rel_top}/{d}", keep_out)
        ]
        found += [f if rel_top == "." else f"{rel_top}/{f}" for f in files]
        found += [
            d if rel_top == "." else f"{rel_top}/{d}" for d in dirs if (Path(top) / d).is_symlink()
        ]
    return sorted(found)


def entry(path: Path) -> Entry | None:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return Entry("l", 0, hashlib.sha256(os.readlink(path).encode()).hexdigest())
    if not stat.S_ISREG(st.st_mode):
        return None  # a submodule's directory, a socket: not part of the mirror
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return Entry("f", stat.S_IMODE(st.st_mode) & 0o777, h.hexdigest())


def project_files(root: Path, keep_out: Iterable[Path] = ()) -> dict[str, Entry]:
    """{relative path: Entry} for everything that is mirrored to the nodes; `keep_out`: files
    and directories on the controller that never are (ddpfleet.secretfiles.named)."""
    home = inside(root, keep_out)
    files = {}
    for rel in listed_paths(root, home):
        if left_out(rel, home):
            continue
        try:
            found = entry(root / rel)
        except FileNotFoundError:  # tracked but deleted in the work tree
            continue
        if found is not None:
            files[rel] = found
    return files


def diff(local: Mapping[str, Entry], remote: Mapping[str, list]) -> Change:
    """What to send (new, different content or mode) and what to delete (gone from the project).

    `remote` holds only what the mirror put on the node (its manifest), so nothing else there
    can ever be deleted."""
    send = tuple(p for p, e in sorted(local.items()) if list(remote.get(p, ())) != e.as_list())
    delete = tuple(sorted(p for p in remote if p not in local))
    return Change(send, delete)


class _ChannelWriter(io.RawIOBase):
    """A file object for tarfile's stream mode that writes into an SSH channel."""

    def __init__(self, chan, sent: progress.Transfer | None = None):
        self.chan, self.bytes, self.sent = chan, 0, sent

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.chan.sendall(bytes(data))
        self.bytes += len(data)
        if self.sent is not None:
            self.sent.advance(len(data))
        return len(data)


def tar_size(root: Path, paths: tuple[str, ...]) -> int:
    """About the bytes write_tar sends: a 512-byte header per member, a file's data padded to
    512, the two end blocks. Only a progress total: a long name's pax header is not counted."""
    data = 0
    for rel in paths:
        st = (root / rel).lstat()
        if stat.S_ISREG(st.st_mode):
            data += -(-st.st_size // 512) * 512
    return 512 * len(paths) + data + 1024


def write_tar(out, root: Path, files: Mapping[str, Entry], paths: tuple[str, ...]) -> None:
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for rel in paths:
            info = tar.gettarinfo(str(root / rel), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = files[rel].mode
            if info.isreg():
                with open(root / rel, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)


def helper_source(name: str) -> bytes:
    """How a node helper travels: its length on one line, then its source (see HELPER_LOADER)."""
    source = (NODE_DIR / name).read_bytes()
    return str(len(source)).encode() + b"\n" + source


def helper_sources(names: Iterable[str]) -> bytes:
    """A node program and the helpers it loads, in the order it loads them."""
    return b"".join(helper_source(name) for name in names)


def helper_command(python: str, name: str, *args: str) -> str:
    """`python -c LOADER args...` run with helper_source(name) first on stdin, quoted once."""
    return shlex.join([python, "-u", "-c", HELPER_LOADER.format(name=name), *args])


def header(files: Mapping[str, Entry], change: Change) -> bytes:
    """apply's first line: what to delete, what the tar holds, the manifest once it is done."""
    return (
        json.dumps(
            {
                "delete": list(change.delete),
                "send": list(change.send),
                "manifest": {p: files[p].as_list() for p in sorted(files)},
            }
        ).encode()
        + b"\n"
    )


def push(
    conn,
    python: str,
    code_dir: str,
    root: Path,
    files: Mapping[str, Entry],
    change: Change,
    script: str,
    remote: Mapping[str, list],
    run_id: str,
    user: str | None = None,
) -> SyncStats:
    """One exec channel on `conn` (a connection.Conn): node_helper.py `apply` into the code dir
    this run's runner has locked, then header(), then the tar of what changed. Nothing changed:
    no channel at all, and the node's manifest (`remote`) says whether the script is there.
    A long sync shows the node's bytes, rate and time left (ddpfleet.progress)."""
    if change.empty:
        return SyncStats(0, 0, 0, script in remote)
    chan = conn.session(
        helper_command(python, "node_helper.py", "apply", code_dir, run_id, script), user=user
    )
    chan.sendall(helper_source("node_helper.py"))
    chan.sendall(header(files, change))
    with progress.transfer(conn.name, "code", tar_size(root, change.send)) as sent:
        writer = _ChannelWriter(chan, sent)
        write_tar(writer, root, files, change.send)
    chan.shutdown_write()
    out = b"".join(iter(lambda: chan.recv(65536), b"")).decode(errors="replace")
    code = chan.recv_exit_status()
    chan.close()
    if code == 1 and out.strip():  # the helper's own refusal: one line that says why
        raise NodeError(conn.name, f"code sync to {code_dir}: {out.strip().splitlines()[-1]}")
    if code != 0:
        raise CommandError(conn.name, f"sync to {code_dir}", code, out)
    report = json.loads(out.strip().splitlines()[-1])
    return SyncStats(report["written"], writer.bytes, report["deleted"], report["script"])


def code_dir_problems(claims: Mapping[str, Mapping], flag: str) -> list[str]:
    """One line per node whose code dir this run may not use; `claims` are node_helper.claim's
    answers (the runner holds the lock of each one that has no problem)."""
    problems = []
    for name, code in claims.items():
        where, detail = code.get("dir"), code.get("detail")
        if code.get("problem") == "foreign":
            problems.append(
                f"{name}: code dir {where} (--code-dir {flag}) exists and was not "
                "made by ddpfleet; nothing in it was touched: pass a --code-dir "
                "that does not exist yet (ddpfleet makes it)"
            )
        elif code.get("problem") == "busy":
            problems.append(
                f"{name}: code dir {where} is in use by run {detail}; wait for it "
                "to finish or pass another --code-dir"
            )
        elif code.get("problem") == "reserved":
            job = code.get("job") or {}
            run, state = job.get("run_id"), str(job.get("state")).lower()
            what = f"slurm job {job['job_id']}" if job.get("job_id") else "a slurm job"
            problems.append(
                f"{name}: {what} (ddpfleet run {run}) is {state} and will run in code dir "
                f"{where}; wait for it to end, stop it (invoke stop {run}) or leave {name} out "
                f"(--exclude {name})"
            )
        elif code.get("problem"):
            problems.append(
                f"{name}: cannot use code dir {where} ({detail}); fix that or "
                "pass another --code-dir"
            )
    return problems


def require(files: Mapping[str, Entry], script: str, root: Path) -> None:
    """The training script must be part of what is mirrored, or the nodes will not have it."""
    rel = Path(script).as_posix()
    if rel not in files:
        why = (
            "not found" if not (root / rel).exists() else "left out (.gitignore, logs/, envs/ ...)"
        )
        raise PlanError(
            f"--script {script}: {why} in the synced project {root}; "
            "pass a path relative to --project-dir"
        )
