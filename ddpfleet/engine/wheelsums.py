"""SHA-256 of the wheelhouse on both ends: what a push sends is what differs, not what is absent.

A size check misses a same-size corrupt wheel, and pip then fails on it at every install. So:

    local = local_digests(files)                 # controller: hashed once per file version
    argv, stdin = node_command(remote_dir, names) # node: one python3, every digest at once
    found = parse(stdout)                          # its digests and the .part files it removed
    todo = stale(local, found.digests)             # absent, or other bytes

The controller keeps <dir>/.sha256.json beside its cached wheels ({name: [size, mtime_ns,
digest]}): every node's push asks for the digests, and a torch set (~240 MB) takes ~0.2 s. The
node hashes only the wheels this push needs (other specs' wheels in the same directory are left
alone, unread), and first removes every *.part there: an interrupted push leaves one, up to a
torch wheel's size, and only a push writes them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

CACHE_FILE = ".sha256.json"
LINE = re.compile(r"^([0-9a-f]{64})  (.+)$")
# The node's python3 (stdlib; hashlib is OpenSSL's, about twice coreutils sha256sum's speed on a
# torch wheel), with argv[1] the wheelhouse dir and the wheel names on stdin, one a line. Prints
# 'part NAME' for each interrupted upload it removed, then 'SHA256  NAME' for the names present.
# Names come on stdin so a push of ~100 wheels puts no ~6 KB argv in ps and in the log.
NODE_PY = """
import hashlib, os, sys
d = sys.argv[1]
try:
    entries = os.listdir(d)
except OSError:
    sys.exit(0)
for n in entries:
    p = os.path.join(d, n)
    if n.endswith(".part") and os.path.isfile(p):
        os.remove(p)
        print("part " + n)
for n in sys.stdin.read().splitlines():
    p = os.path.join(d, n)
    if n and os.path.isfile(p):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        print(h.hexdigest() + "  " + n)
"""

_memo: dict[tuple[str, int, int], str] = {}
_memo_lock = threading.Lock()


@dataclass(frozen=True)
class Found:
    """What the node's command reported: {wheel: sha256} and the .part files it removed."""

    digests: Mapping[str, str] = field(default_factory=dict)
    removed: tuple[str, ...] = ()


def node_command(remote_dir: str, names: Iterable[str]) -> tuple[list[str], str]:
    """(argv, stdin) of the one command a push runs on the node."""
    return ["python3", "-I", "-c", NODE_PY, remote_dir], "".join(f"{n}\n" for n in names)


def parse(stdout: str) -> Found:
    """The node command's output, e.g.

    part torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl.part
    9b2c...64 hex...e1f0  six-1.16.0-py2.py3-none-any.whl
    """
    digests, removed = {}, []
    for line in stdout.splitlines():
        if line.startswith("part "):
            removed.append(line[5:])
        elif m := LINE.match(line):
            digests[m[2]] = m[1]
    return Found(digests, tuple(removed))


def stale(local: Mapping[str, str], remote: Mapping[str, str]) -> list[str]:
    """Names to send: absent on the node, or other bytes there (a corrupt or cut-short copy)."""
    return [name for name, digest in sorted(local.items()) if remote.get(name) != digest]


def local_digests(files: Iterable[Path]) -> dict[str, str]:
    """{name: sha256} of the controller's files, each hashed once per (path, size, mtime):
    in this process for the fleet's threads, in the directory's .sha256.json for later runs."""
    out: dict[str, str] = {}
    by_dir: dict[Path, list[Path]] = {}
    for f in files:
        by_dir.setdefault(f.parent, []).append(f)
    for directory, group in by_dir.items():
        out.update(_dir_digests(directory, group))
    return out


def _dir_digests(directory: Path, files: list[Path]) -> dict[str, str]:
    keys = {f: _key(f) for f in files}
    with _memo_lock:
        known = {f.name: _memo[k] for f, k in keys.items() if k in _memo}
    if len(known) == len(files):
        return known
    # flock excludes this process's other threads too: each opens its own file description
    with open(directory / ".sha256.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = _read_cache(directory / CACHE_FILE)
        fresh = dict(cache)
        for f, (_, size, mtime) in keys.items():
            entry = cache.get(f.name)
            if entry is None or entry[:2] != [size, mtime]:
                fresh[f.name] = [size, mtime, _hash(f)]
        if fresh != cache:
            _write_cache(directory / CACHE_FILE, fresh)
    with _memo_lock:
        for f, k in keys.items():
            _memo[k] = fresh[f.name][2]
    return {f.name: fresh[f.name][2] for f in files}


def _key(f: Path) -> tuple[str, int, int]:
    st = f.stat()
    return str(f), st.st_size, st.st_mtime_ns


def _hash(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as src:
        while chunk := src.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_cache(path: Path) -> dict[str, list]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent or damaged: hash again
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, list) and len(v) == 3}


def _write_cache(path: Path, data: Mapping[str, list]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True) + "\n")
    os.replace(tmp, path)
