"""A run's checkpoints on a node: which one is complete, which is newest, what may go, and how
one moves (into another run's dir for `train --resume`, node to node for a recovery). Stdlib
only, python 3.8; sent to the nodes as bytes like the other node programs.

The contract (README "where your checkpoints go"): every run has, on every node,
DDPFLEET_CHECKPOINT_DIR=/var/lib/ddpfleet/runs/<run-id>/checkpoints (the training user's, 0700).
A checkpoint is a directory step-<step, 8 digits>/ of the script's files, and MANIFEST.json
written LAST, atomically (temp file, fsync, rename, fsync the dir):

    {"format": "ddpfleet.checkpoint/1", "step": 120, "world_size": 4,
     "files": {"model.pt": "<sha256 hex>", ...}, "time": 1765012345.6}

Complete: that manifest, in a directory named for its step, and every file it names present,
regular, with that SHA-256. Anything else (no manifest, a hash that differs, a truncated file,
a name with .tmp in it) is never chosen: a node killed while rank 0 writes leaves a partial
checkpoint, and the one before it is the newest complete one.

pack/unpack is the stream a recovery sends from a survivor to a spare: a header line, the
manifest's length and bytes, then each file (sorted by name) as an 8-byte length and its bytes.
unpack writes into a temp dir beside the destination and renames it into place only once every
hash matched, so a stream cut short leaves nothing that looks like a checkpoint.
"""

import hashlib
import json
import os
import re
import shutil
import stat
import struct
import time

FORMAT = "ddpfleet.checkpoint/1"
MANIFEST = "MANIFEST.json"
STEP = re.compile(r"^step-(\d{8,})$")  # 8 digits, more past step 99,999,999
TMP = ".tmp"  # any name holding it is being written (ours: .step-<n>.tmp-<pid>)
MAGIC = b"ddpfleet-checkpoint-stream 1\n"
CHUNK = 1 << 20
SIZE = struct.Struct(">Q")


def step_name(step):
    return "step-%08d" % step


def _unsafe(name):
    """Why `name` may not be a file of a checkpoint (a relative path below it), or None."""
    if not isinstance(name, str) or not name:
        return "not a path"
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or "." in parts or "" in parts:
        return "not a plain relative path"
    if name == MANIFEST or "\0" in name:
        return "a reserved name"
    return None


def _manifest(data):
    """The manifest if `data` is one of ours (every field of the right type), else None."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    step, world, files = data.get("step"), data.get("world_size"), data.get("files")
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        return None
    if not (isinstance(world, int) and not isinstance(world, bool) and world >= 1):
        return None
    if not isinstance(files, dict) or any(_unsafe(n) for n in files):
        return None
    if not isinstance(data.get("time", 0), (int, float)):
        return None
    if not all(isinstance(h, str) and re.match(r"^[0-9a-f]{64}$", h) for h in files.values()):
        return None
    return data


def _open_file(top, name):
    """A read fd on the regular file `name` below `top`, no symlink anywhere on its path."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        parts = name.split("/")
        for part in parts[:-1]:
            sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = sub
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        f = os.open(parts[-1], flags, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(f).st_mode):
        os.close(f)
        raise OSError(f"{name}: not a regular file")
    return f


def _chunks(fd):
    while True:
        data = os.read(fd, CHUNK)
        if not data:
            return
        yield data


def sha256(top, name):
    fd = _open_file(top, name)
    try:
        digest = hashlib.sha256()
        for data in _chunks(fd):
            digest.update(data)
        return digest.hexdigest()
    finally:
        os.close(fd)


def read_manifest(path):
    """The manifest of the checkpoint dir `path`, not verified; None where there is none."""
    try:
        with open(os.path.join(path, MANIFEST), "rb") as f:
            return _manifest(json.loads(f.read().decode()))
    except (OSError, ValueError):
        return None


def complete(path):
    """The verified manifest of the checkpoint dir `path`, or None: its name is step-<its
    step>, no .tmp in it, and every file it names is there with that SHA-256."""
    name = os.path.basename(os.path.normpath(path))
    found = STEP.match(name)
    manifest = read_manifest(path) if found and TMP not in name else None
    if manifest is None or int(found.group(1)) != manifest["step"]:
        return None
    return manifest if _verified(path, manifest) else None


def _verified(path, manifest):
    """True when every file `manifest` names is below `path` with its SHA-256."""
    if manifest is None:
        return False
    try:
        return all(sha256(path, f) == want for f, want in manifest["files"].items())
    except OSError:
        return False


def _steps(directory):
    """[(step, name)] of every step-<n> directory in `directory`, newest first."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = [(int(m.group(1)), n) for n in names for m in [STEP.match(n)] if m]
    # a symlink is no checkpoint: root reads these dirs, and they are the user's to change
    found = [(s, n) for s, n in found if not os.path.islink(os.path.join(directory, n))]
    return sorted(found, reverse=True)


def newest_complete(directory):
    """(path, manifest) of the newest complete checkpoint in `directory`, or None."""
    for _, name in _steps(directory):
        path = os.path.join(directory, name)
        manifest = complete(path)
        if manifest is not None:
            return path, manifest
    return None


def prune(directory, keep=3):
    """Remove old checkpoints; the names removed. Kept: the newest `keep` complete ones (at
    least one: never the newest complete) and anything newer than the newest complete one
    (being written now). Removed: older complete ones, and partial ones (step-<n> without a
    complete manifest, or a .tmp of ours) older than the newest complete one. Nothing else in
    `directory` (final.json, the script's own files) is touched."""
    keep, done, removed = max(1, keep), 0, []
    newest = None
    for step, name in _steps(directory):
        path = os.path.join(directory, name)
        if complete(path) is not None:
            newest = step if newest is None else newest
            done += 1
            if done <= keep:
                continue
        elif newest is None:
            continue  # newer than every complete one: being written
        shutil.rmtree(path, ignore_errors=True)
        removed.append(name)
    if newest is not None:
        for name in os.listdir(directory):
            m = re.match(r"^\.step-(\d{8,})\.tmp-\d+$", name)
            if m and int(m.group(1)) <= newest:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
                removed.append(name)
    return sorted(removed)


# -- writing: a temp dir, the files, the manifest last, one rename ---------------------------


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(path, step, world_size, files, when=None):
    """MANIFEST.json into the checkpoint dir `path`, atomically and last (temp, fsync,
    rename, fsync the dir). `files`: {name: sha256 hex}; `when`: its time (now)."""
    data = {"format": FORMAT, "step": step, "world_size": world_size, "files": dict(files),
            "time": time.time() if when is None else when}  # fmt: skip
    tmp = os.path.join(path, MANIFEST + TMP)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(json.dumps(data, sort_keys=True).encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MANIFEST))
    _fsync_dir(path)
    return data


def _staging(dest_dir, step):
    tmp = os.path.join(dest_dir, ".%s.tmp-%d" % (step_name(step), os.getpid()))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(dest_dir, mode=0o700, exist_ok=True)
    os.mkdir(tmp, 0o700)
    return tmp


def _write_file(top, name, chunks, want):
    """`chunks` into top/name (parents made, 0700), fsynced; ValueError if its hash differs."""
    parent = os.path.join(top, *name.split("/")[:-1]) if "/" in name else top
    os.makedirs(parent, mode=0o700, exist_ok=True)
    digest = hashlib.sha256()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(os.path.join(top, name), flags, 0o600)
    try:
        for data in chunks:
            digest.update(data)
            while data:
                data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if digest.hexdigest() != want:
        raise ValueError(f"{name}: its SHA-256 differs from the manifest's")


def _place(tmp, dest_dir, manifest):
    """Manifest last into the staged dir, then the one rename that makes it a checkpoint.
    A complete checkpoint of that step already there is kept (the staged copy goes); a
    partial one is replaced."""
    m = manifest
    write_manifest(tmp, m["step"], m["world_size"], m["files"], m.get("time"))
    if not _verified(tmp, read_manifest(tmp)):  # what the disk holds, read back
        raise ValueError(f"{tmp}: the copy does not match its manifest")
    final = os.path.join(dest_dir, step_name(manifest["step"]))
    if os.path.isdir(final) and complete(final) is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        return final
    if os.path.lexists(final):
        aside = final + TMP + "-old-%d" % os.getpid()
        os.rename(final, aside)
        shutil.rmtree(aside, ignore_errors=True)
    os.rename(tmp, final)
    _fsync_dir(dest_dir)
    return final


def _copy(src, dest_dir):
    manifest = complete(src)
    if manifest is None:
        raise ValueError(f"{src} is not a complete checkpoint")
    tmp = _staging(dest_dir, manifest["step"])
    try:
        for name, want in sorted(manifest["files"].items()):
            fd = _open_file(src, name)
            try:
                _write_file(tmp, name, _chunks(fd), want)
            finally:
                os.close(fd)
        return _place(tmp, dest_dir, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_into(src, dest_dir, user=None, tree=None):
    """The complete checkpoint `src` copied into dest_dir/step-<n>, every file verified by
    hash while it is copied; the path it lands at. With `user` and `tree` (proctree, as
    root): the copy is done by a child dropped to that user, so the files are the user's and
    a symlink in either dir reaches only what the user could. ValueError: src is partial."""
    manifest = read_manifest(src)
    if manifest is None:
        raise ValueError(f"{src} is not a complete checkpoint (no valid {MANIFEST})")
    if tree is not None and tree.drops_to(user):
        tree.as_user(user, _copy, src, dest_dir)
    else:
        _copy(src, dest_dir)
    return os.path.join(dest_dir, step_name(manifest["step"]))


# -- the stream: node to node ------------------------------------------------------------------


def pack(path):
    """The complete checkpoint at `path` as a stream of bytes: header, manifest, then each
    file (sorted by name) as length and bytes. ValueError where it is not complete."""
    manifest = complete(path)
    if manifest is None:
        raise ValueError(f"{path} is not a complete checkpoint")
    head = json.dumps(manifest, sort_keys=True).encode()
    yield MAGIC + SIZE.pack(len(head)) + head
    for name in sorted(manifest["files"]):
        fd = _open_file(path, name)
        try:
            yield SIZE.pack(os.fstat(fd).st_size)
            for data in _chunks(fd):
                yield data
        finally:
            os.close(fd)


def _exactly(readable, size):
    """`size` bytes from readable, in chunks; ValueError when the stream ends first."""
    while size:
        data = readable.read(min(size, CHUNK))
        if not data:
            raise ValueError("the checkpoint stream ended early")
        size -= len(data)
        yield data


def _read(readable, size):
    return b"".join(_exactly(readable, size))


def unpack(readable, dest_dir):
    """A pack() stream from `readable` (.read(n)) into dest_dir/step-<n>: the manifest, each
    file verified by hash as it is written, all in a temp dir renamed into place only when
    complete. ValueError (nothing left behind) on a corrupt or short stream."""
    if _read(readable, len(MAGIC)) != MAGIC:
        raise ValueError("not a ddpfleet checkpoint stream")
    (size,) = SIZE.unpack(_read(readable, SIZE.size))
    if size > 16 << 20:
        raise ValueError("the checkpoint stream's manifest is too large")
    try:
        manifest = _manifest(json.loads(_read(readable, size).decode()))
    except ValueError:
        manifest = None
    if manifest is None:
        raise ValueError("the checkpoint stream's manifest is not valid")
    tmp = _staging(dest_dir, manifest["step"])
    try:
        for name, want in sorted(manifest["files"].items()):
            (length,) = SIZE.unpack(_read(readable, SIZE.size))
            _write_file(tmp, name, _exactly(readable, length), want)
        _place(tmp, dest_dir, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
