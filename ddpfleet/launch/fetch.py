"""`invoke fetch RUN [--node N] [PATH]`: a run's checkpoints or outputs home, into
runs/<run-id>/PATH beside the inventory (runs/<run-id>/<node>/PATH for several nodes).

    got = fetch(fleet, index, "det1", nodes=None, path=None)   # node -> Fetched | NodeError

PATH is relative to the run's directory on the node, /var/lib/ddpfleet/runs/<run-id>
(default: checkpoints, $DDPFLEET_CHECKPOINT_DIR), and never leaves it: no `..`, an absolute
path only inside it, and what the node resolves it to (symlinks followed there) inside it too.
The default node is the run's first (node_rank 0, in the index); every node keeps its own copy
of the checkpoints, so --node picks another when that one is down, `--node all` takes each.

Everything is read over SFTP as the run's training user, who owns these files: a symlink
planted among them can never make us read what that user could not (root could read anything).
A symlink inside PATH comes home as a symlink when the node resolves it inside PATH, and is
refused (one line, not fetched) when it points out of it or nowhere. Only what changed comes:
a file whose size and mtime (whole seconds, as SFTP gives them) match the local copy's is left
alone. A file comes into NAME.part, then gets the node's mode and mtime and is renamed into
place; an interrupted fetch leaves the .part, and the next continues it from its end when its
last bytes (up to 64 KiB) are still the node's at that offset, else starts that file again.
"""

from __future__ import annotations

import posixpath
import stat as st
from collections.abc import Mapping
from pathlib import Path

from ddpfleet import trainuser
from ddpfleet.errors import NodeError, PlanError
from ddpfleet.hygiene import private_dir
from ddpfleet.launch import fetchfiles
from ddpfleet.launch.config import RUN_ID_RE
from ddpfleet.launch.fetchfiles import Entry, Fetched
from ddpfleet.launch.index import Index
from ddpfleet.launch.plan import RUNS
from ddpfleet.ssh.connection import Conn, Fleet

DEFAULT_PATH = "checkpoints"  # the checkpoint contract's $DDPFLEET_CHECKPOINT_DIR


def remote_path(run_id: str, path: str | None) -> str:
    """PATH as the node's absolute path inside the run dir; a PlanError when it would leave."""
    if not RUN_ID_RE.match(run_id):
        raise PlanError(f"{run_id!r}: not a run id; invoke runs lists them")
    top = posixpath.join(RUNS, run_id)
    path = path or DEFAULT_PATH
    full = posixpath.normpath(posixpath.join(top, path))
    if ".." in path.split("/") or not (full == top or full.startswith(top + "/")):
        raise PlanError(
            f"fetch {run_id} {path}: outside the run's directory {top}; give a path inside it "
            f"(relative to it, e.g. {DEFAULT_PATH})"
        )
    return full


def nodes_to_ask(index: Index, fleet: Fleet, run_id: str, node: str | None) -> list[str]:
    """--node N[,M], `all` (the run's nodes), or none: the run's first node. A run the index
    does not know (started from another checkout): the inventory's nodes, asked in order."""
    known = [n.name for n in fleet.nodes]
    entry = index.entry(run_id)
    if node not in (None, "", "all"):
        asked = [n.strip() for n in node.split(",") if n.strip()]
        if bad := [n for n in asked if n not in known]:
            raise PlanError(f"--node {','.join(bad)}: not in the inventory ({', '.join(known)})")
        return asked
    if not entry:
        return known
    run_nodes = [n for n in entry["nodes"] if n in known]
    if not run_nodes:
        raise PlanError(f"{run_id} ran on {', '.join(entry['nodes'])}, none of them in this "
                        "inventory; use the inventory that started it")  # fmt: skip
    return run_nodes if node == "all" else run_nodes[:1]


def fetch(
    fleet: Fleet, index: Index, run_id: str, node: str | None, path: str | None, home: Path
) -> dict[str, Fetched | NodeError]:
    """Bring PATH of the run from the nodes (see the module docstring) into home/runs/<id>."""
    remote = remote_path(run_id, path)
    rel = posixpath.relpath(remote, posixpath.join(RUNS, run_id))
    nodes = nodes_to_ask(index, fleet, run_id, node)
    entry = index.entry(run_id) or {}
    if not entry and node in (None, "", "all"):  # the nodes that have the run
        has = fleet.map(lambda c: _has_run(c, _user(fleet, entry, c), run_id), nodes)
        nodes = [n for n, h in has.items() if h is True]
        if not nodes:
            why = "; ".join(str(h) for h in has.values() if isinstance(h, NodeError))
            raise PlanError(f"{run_id}: no node has {posixpath.join(RUNS, run_id)}" +
                            (f" ({why})" if why else "") + "; see invoke runs")  # fmt: skip
        nodes = nodes if node == "all" else nodes[:1]
    several = len(nodes) > 1 or node == "all"
    root = home / "runs" / run_id

    def one(conn: Conn) -> Fetched:
        dest = (root / conn.name if several else root) / ("" if rel == "." else rel)
        return _fetch_node(conn, _user(fleet, entry, conn), run_id, remote, dest)

    got = fleet.map(one, nodes)
    others = [n for n in entry.get("nodes", ()) if n not in got]
    for n, r in got.items():  # every node keeps its copy of the checkpoints: say so
        if isinstance(r, NodeError) and not node and others:
            got[n] = NodeError(n, f"{r.message}; its other nodes keep a copy: --node {others[0]}")
    return got


def _user(fleet: Fleet, entry: Mapping, conn: Conn) -> str | None:
    """Who reads: the job's user for a Slurm run the index recorded, else the training user."""
    if "user" in entry:
        return entry["user"]
    return trainuser.settings(fleet.inventory, conn.node).name


def _has_run(conn: Conn, user: str | None, run_id: str) -> bool:
    try:
        conn.sftp(user).stat(posixpath.join(RUNS, run_id))
    except FileNotFoundError:
        return False
    return True


def _fetch_node(conn: Conn, user: str | None, run_id: str, remote: str, dest: Path) -> Fetched:
    top = posixpath.join(RUNS, run_id)
    sftp = conn.sftp(user)
    got = Fetched(dest)
    try:  # realpath(3) on the node, as the user: where PATH really is
        real, real_top = sftp.normalize(remote), sftp.normalize(top)
        if not (real == real_top or real.startswith(real_top + "/")):
            raise NodeError(conn.name, f"{remote} resolves to {real}, outside {top}; not fetched")
        entries = _walk(sftp, real, got)
    except FileNotFoundError:
        raise NodeError(conn.name, f"no {remote} (as {user or conn.node.user}); "
                        "has the run written any? see invoke runs") from None  # fmt: skip
    except PermissionError:
        raise NodeError(conn.name, f"{remote}: permission denied as {user}") from None
    private_dir(dest.parent)
    fetchfiles.bring(conn.name, sftp, real, entries, got)
    return got


def _walk(sftp, real: str, got: Fetched) -> list[Entry]:
    """Every dir, file and acceptable link under `real` (itself first), parents first; a link
    out of it, a dangling one or something unreadable is a problem line, not an entry."""
    a = sftp.stat(real)
    if not st.S_ISDIR(a.st_mode or 0):
        return [_entry("", a)] if st.S_ISREG(a.st_mode or 0) else []
    out, todo = [_entry("", a)], [""]
    while todo:
        rel = todo.pop(0)
        try:
            listing = sorted(sftp.listdir_attr(posixpath.join(real, rel)), key=lambda x: x.filename)
        except PermissionError:
            got.problems.append(f"{rel or '.'}/: permission denied; not fetched")
            continue
        for a in listing:  # readdir's attributes are lstat's: a link is seen as one
            child = posixpath.join(rel, a.filename) if rel else a.filename
            mode = a.st_mode or 0
            if st.S_ISDIR(mode):
                out.append(_entry(child, a))
                todo.append(child)
            elif st.S_ISREG(mode):
                out.append(_entry(child, a))
            elif st.S_ISLNK(mode):
                link = _link(sftp, real, child, got)
                if link is not None:
                    out.append(link)
    return out


def _entry(rel: str, a) -> Entry:
    kind = "dir" if st.S_ISDIR(a.st_mode or 0) else "file"
    return Entry(rel, kind, a.st_size or 0, int(a.st_mtime or 0), (a.st_mode or 0) & 0o777)


def _link(sftp, real: str, rel: str, got: Fetched) -> Entry | None:
    """A symlink the node resolves inside `real` (kept as a relative link), else None and a
    problem line: never a way out of the run's files."""
    path = posixpath.join(real, rel)
    try:
        said = sftp.readlink(path)
    except OSError:
        said = "?"
    try:
        points = sftp.normalize(path)
    except OSError:  # realpath(3) on the node: the target is not there
        got.problems.append(f"{rel} -> {said}: a dangling symlink; not fetched")
        return None
    if not (points == real or points.startswith(real + "/")):
        got.problems.append(f"{rel} -> {said}: a symlink out of {real}; refused, not fetched")
        return None
    target = posixpath.relpath(points, posixpath.dirname(path))
    return Entry(rel, "link", target=target)


def rows(results: Mapping[str, Fetched | NodeError], home: Path) -> list[tuple[str, str]]:
    """One row per node: what came where (relative to the project), or why not."""
    return [(n, str(r) if isinstance(r, NodeError) else r.summary(home))
            for n, r in results.items()]  # fmt: skip


def problems(results: Mapping[str, Fetched | NodeError]) -> list[str]:
    """One line per thing not fetched, each naming its node."""
    out = []
    for n, r in results.items():
        if isinstance(r, NodeError):
            out.append(str(r))
        else:
            out += [f"{n}: {p}" for p in r.problems]
    return out
