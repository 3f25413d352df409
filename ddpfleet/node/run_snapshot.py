"""A detached run's code snapshot: what the mirror synced, copied into the run's own directory.

Stdlib only; run_supervisor.py receives this file on stdin after run_lifeline.py. A detached
run does not hold the code dir's lock for days, so a later `invoke train` may sync new code
there; the run itself works in /var/lib/ddpfleet/runs/<run-id>/code, a copy of exactly the
files the mirror put in the code dir (its manifest), modes kept (0o777 of them), owned by the
training user. `train --resume RUN` copies RUN's snapshot instead, with whatever the run wrote
there (a relative --checkpoint-dir), so it goes on from that run's code and checkpoint.

The code dir, its manifest and the old snapshot are the training user's to change at any
moment, so root never copies them: root makes the empty code/ (0700, the user's) in the run
dir it owns, and a child dropped to the user copies (proctree.as_user); nothing is chowned.
Where the run is root's, root copies as is. Either way a manifest path must pass the sync's
rule (node_helper.safe_target), every directory on a path is opened with O_NOFOLLOW (a
symlinked parent is refused), only regular files and symlinks are copied, never followed.
"""

import errno
import json
import os
import pwd
import stat

MANIFEST = ".ddpfleet/manifest.json"  # node_helper.py's: {"paths": {path: [kind, mode, sha]}}
DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
CHUNK = 1 << 20


def take(code_dir, dest, user, tree):
    """Copy the synced files of code_dir into dest (made here), as `user` (tree: proctree)."""
    _make_dest(dest, user, tree)
    tree.as_user(user, _copy_listed, code_dir, dest)
    return dest


def resume(old, dest, user, tree):
    """The old run's snapshot, whatever it holds now, copied into dest as `user`."""
    _make_dest(dest, user, tree)
    tree.as_user(user, _copy_tree, old, dest)
    return dest


def _make_dest(dest, user, tree):
    """dest, empty and 0700, handed to the user before anything is in it: its parent (the run
    dir) is root's, so the user can change what is inside it, never where it is."""
    os.mkdir(dest, 0o700)
    if tree.drops_to(user):
        pw = pwd.getpwnam(user)
        fd = os.open(dest, DIR)
        try:
            os.fchown(fd, pw.pw_uid, pw.pw_gid)
        finally:
            os.close(fd)


def unsafe(rel):
    """Why rel may not be a path in the snapshot (node_helper.safe_target's rule), or None."""
    if not isinstance(rel, str) or not rel:
        return "not a path"
    parts = rel.split("/")
    if rel.startswith("/"):
        return "an absolute path"
    if ".." in parts or "" in parts or "." in parts:
        return "a '..', '.' or empty part"
    return None


def _entries(code_dir):
    """The manifest's [(rel, kind, mode)], every one checked before anything is copied."""
    where = os.path.join(code_dir, MANIFEST)
    try:
        with open(where) as f:
            paths = json.load(f)["paths"]
        items = sorted(paths.items())
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{where}: not a manifest the code sync wrote ({e})") from None
    entries = []
    for rel, entry in items:
        why = unsafe(rel)
        if why is None and not (
            isinstance(entry, list) and len(entry) == 3 and entry[0] in ("f", "l")
            and isinstance(entry[1], int)
        ):  # fmt: skip
            why = "not a [kind, mode, sha] entry"
        if why:
            raise ValueError(f"{where}: refusing the entry {rel!r}: {why}")
        entries.append((rel, entry[0], entry[1] & 0o777))
    return where, entries


def _open_parent(top, parts, make):
    """A fd on the directory holding parts[-1] under the fd `top`, each directory on the way
    opened with O_NOFOLLOW (a symlink there is ELOOP); `make` creates missing ones (0700)."""
    fd = os.dup(top)
    try:
        for part in parts[:-1]:
            if make:
                try:
                    os.mkdir(part, 0o700, dir_fd=fd)
                except FileExistsError:
                    pass
            sub = _open_dir(part, fd)
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_dir(name, parent):
    """A directory below the fd `parent`, never a symlink (ELOOP then, whatever the kernel said)."""
    try:
        return os.open(name, DIR, dir_fd=parent)
    except NotADirectoryError:
        if stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP)) from None
        raise


def _copy_file(src_dir, dst_dir, name, mode):
    """A regular file, never through a symlink on either side; mode & 0o777 (no set-id bit)."""
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        if not stat.S_ISREG(os.fstat(src).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        dst = os.open(name, flags, 0o600, dir_fd=dst_dir)
        try:
            while data := os.read(src, CHUNK):
                while data:
                    data = data[os.write(dst, data) :]
            os.fchmod(dst, mode & 0o777)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_link(src_dir, dst_dir, name):
    os.symlink(os.readlink(name, dir_fd=src_dir), name, dir_fd=dst_dir)


def _reason(e):
    if isinstance(e, OSError) and e.errno == errno.ELOOP:
        return "a symlink on its path"
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


def _copy_listed(code_dir, dest):
    """take's copy, done by whoever may read the code dir (the training user)."""
    where, entries = _entries(code_dir)
    src_top, dst_top = os.open(code_dir, DIR & ~os.O_NOFOLLOW), os.open(dest, DIR)
    try:
        for rel, kind, mode in entries:
            parts = rel.split("/")
            src_dir = dst_dir = None
            try:
                src_dir = _open_parent(src_top, parts, make=False)
                dst_dir = _open_parent(dst_top, parts, make=True)
                if kind == "l":
                    _copy_link(src_dir, dst_dir, parts[-1])
                else:
                    _copy_file(src_dir, dst_dir, parts[-1], mode)
            except OSError as e:
                raise ValueError(f"{where}: cannot copy the entry {rel!r}: {_reason(e)}") from None
            finally:
                for fd in (src_dir, dst_dir):
                    if fd is not None:
                        os.close(fd)
    finally:
        os.close(src_top)
        os.close(dst_top)


def _copy_tree(old, dest):
    """resume's copy: directories, regular files and symlinks (as symlinks) of old, opened
    below a fd each, with O_NOFOLLOW: a directory swapped for a symlink is never followed."""
    src, dst = os.open(old, DIR), os.open(dest, DIR)
    try:
        _copy_dir(src, dst)
    except OSError as e:
        raise ValueError(f"cannot copy the snapshot {old}: {_reason(e)}") from None
    finally:
        os.close(src)
        os.close(dst)


def _copy_dir(src, dst):
    for name in sorted(os.listdir(src)):
        st = os.stat(name, dir_fd=src, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            _copy_link(src, dst, name)
        elif stat.S_ISREG(st.st_mode):
            _copy_file(src, dst, name, st.st_mode)
        elif stat.S_ISDIR(st.st_mode):
            os.mkdir(name, 0o700, dir_fd=dst)
            sub_src = _open_dir(name, src)
            try:
                sub_dst = os.open(name, DIR, dir_fd=dst)
                try:
                    _copy_dir(sub_src, sub_dst)
                    os.fchmod(sub_dst, stat.S_IMODE(os.fstat(sub_src).st_mode) & 0o777)
                finally:
                    os.close(sub_dst)
            finally:
                os.close(sub_src)
        # anything else (a fifo, a socket, a device node) is no part of a snapshot
