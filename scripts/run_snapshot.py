"""A detached run's code snapshot: what the mirror synced, copied into the run's own directory.

Stdlib only; run_supervisor.py receives this file on stdin after run_lifeline.py. A detached
run does not hold the code dir's lock for days, so a later `invoke train` may sync new code
there; the run itself works in /var/lib/ddpfleet/runs/<run-id>/code, a copy of exactly the
files the mirror put in the code dir (its manifest), modes kept, owned by the training user.
`train --resume RUN` copies RUN's snapshot instead, with whatever the run wrote there (a
relative --checkpoint-dir), so it goes on from that run's code and checkpoint.
"""

import json
import os
import pwd
import shutil

MANIFEST = ".ddpfleet/manifest.json"  # node_helper.py's: {"paths": {path: [kind, mode, sha]}}


def _owner(user):
    if not user or os.getuid() != 0:
        return None
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


def _chown_tree(root, owner):
    if owner is None:
        return
    for where, dirs, files in os.walk(root):
        for name in [where, *(os.path.join(where, n) for n in dirs + files)]:
            os.lchown(name, *owner)


def take(code_dir, dest, user):
    """Copy the synced files of code_dir into dest (made here, 0700)."""
    with open(os.path.join(code_dir, MANIFEST)) as f:
        paths = json.load(f)["paths"]
    os.mkdir(dest, 0o700)
    for rel, (kind, mode, _sha) in sorted(paths.items()):
        src, dst = os.path.join(code_dir, rel), os.path.join(dest, rel)
        os.makedirs(os.path.dirname(dst), 0o700, exist_ok=True)
        if kind == "l":
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copyfile(src, dst)
            os.chmod(dst, mode)
    _chown_tree(dest, _owner(user))
    return dest


def resume(old, dest, user):
    """The old run's snapshot, whatever it holds now, copied into dest."""
    shutil.copytree(old, dest, symlinks=True)
    _chown_tree(dest, _owner(user))
    return dest
