"""proctree.as_user's non-root path, for real: the work runs in a child dropped to the training
user (here `nobody`, the tests run as root), so what it makes is that user's and what only root
may touch stays out of its reach, a symlink planted in the user's dir included. Recovery uses
it to discard newer checkpoints in the training user's dir (node/generation.py)."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ddpfleet.node import proctree

USER = "nobody"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not any(p.pw_name == USER for p in pwd.getpwall()),
    reason="needs root and a user nobody: the drop is what is tested",
)


@pytest.fixture
def dirs() -> Iterator[tuple[Path, Path]]:
    """(the user's dir, root's dir beside it), under a root-owned 0755 dir in /tmp: pytest's own
    tmp_path is 0700 root, which nobody could not even traverse."""
    top = Path(tempfile.mkdtemp(prefix="ddpfleet-as-user-", dir="/tmp"))
    top.chmod(0o755)
    pw = pwd.getpwnam(USER)
    mine, roots = top / "user", top / "root"
    mine.mkdir(mode=0o700)
    os.chown(mine, pw.pw_uid, pw.pw_gid)
    roots.mkdir(mode=0o755)
    (roots / "secret").write_text("root's")
    (roots / "secret").chmod(0o600)
    (roots / "kept").write_text("root's")  # world-readable, in a dir only root may change
    try:
        yield mine, roots
    finally:
        shutil.rmtree(top)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)


def test_what_the_work_makes_belongs_to_the_user(dirs):
    mine, _ = dirs
    pw = pwd.getpwnam(USER)
    assert proctree.as_user(USER, write, mine / "step-00000002" / "MANIFEST.json", "{}") is None
    for path in (mine / "step-00000002", mine / "step-00000002" / "MANIFEST.json"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (pw.pw_uid, pw.pw_gid), path
    assert os.geteuid() == 0  # the caller stays root: only the child dropped


def test_the_user_cannot_touch_roots_files(dirs):
    mine, roots = dirs
    with pytest.raises(OSError, match="Permission denied"):
        proctree.as_user(USER, os.remove, roots / "kept")
    with pytest.raises(OSError, match="Permission denied"):
        proctree.as_user(USER, write, roots / "kept", "the user's")
    with pytest.raises(OSError, match="Permission denied"):
        proctree.as_user(USER, Path.read_text, roots / "secret")
    # a link the user planted in its own dir reaches only what the user could reach anyway
    (mine / "step-00000004").symlink_to(roots)
    with pytest.raises(OSError, match="Permission denied"):
        proctree.as_user(USER, os.remove, mine / "step-00000004" / "kept")
    assert (roots / "kept").read_text() == "root's" and (roots / "secret").exists()


def test_root_or_no_user_does_the_work_itself(dirs):
    _, roots = dirs
    assert proctree.as_user(None, Path.read_text, roots / "secret") == "root's"
    assert proctree.as_user("root", Path.read_text, roots / "secret") == "root's"


# In a process of its own: a Reaper's waitpid(-1) would take the exits of pytest's children too.
BESIDE_A_REAPER = """
import subprocess, sys
from ddpfleet.node import proctree
kept = subprocess.Popen(["sleep", "60"])  # torchrun's place: the child the Reaper keeps
proctree.reaper_for(kept.pid)
fails = []
for i in range(int(sys.argv[1])):
    try:
        proctree.as_user("nobody", lambda: None)
    except OSError as e:
        fails.append(str(e))
kept.kill()
print(len(fails), fails[:1])
"""


def test_as_user_beside_a_running_reaper_gets_its_childs_exit():
    """A detached run's supervisor reaps every child (proctree.Reaper) while a recovery places
    the checkpoint as the training user: the Reaper's waitpid(-1) took the dropped child's exit
    and as_user's own waitpid failed, "[Errno 10] No child processes" (bench/recovery.py in the
    cloud shape: the run FAILED instead of recovering). 200 tries, none may fail."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", BESIDE_A_REAPER, "200"], capture_output=True,
                       text=True, cwd=root, timeout=120)  # fmt: skip
    assert r.returncode == 0 and r.stdout.split()[0] == "0", r.stdout + r.stderr
