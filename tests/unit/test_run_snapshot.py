"""run_snapshot.py: a detached run's code snapshot never lets the training user steer root.

The code dir and its manifest are the training user's (security review 2026-12-06, #1 and #2):
a `..` or absolute manifest path, a symlinked directory on either side, a set-id mode or a
directory swapped for a symlink must reach nothing outside the snapshot. The tests that drop to
a real user need root (this box runs the tests as root) and use `nobody`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import stat
from pathlib import Path

import pytest

from ddpfleet.node import NODE_DIR


def load(name: str):
    spec = importlib.util.spec_from_file_location(name[:-3], NODE_DIR / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


snapshot, proctree = load("run_snapshot.py"), load("proctree.py")
as_root = pytest.mark.skipif(os.getuid() != 0, reason="dropping to another user needs root")
NOBODY = "nobody"


def code_dir(root: Path, paths: dict, files: dict[str, str] | None = None) -> Path:
    """A code dir as the sync leaves it: files, and the manifest listing `paths`."""
    code = root / "code"
    (code / ".ddpfleet").mkdir(parents=True, exist_ok=True)
    for rel, text in (files or {}).items():
        (code / rel).parent.mkdir(parents=True, exist_ok=True)
        (code / rel).write_text(text)
    (code / ".ddpfleet" / "manifest.json").write_text(json.dumps({"paths": paths}))
    return code


def runs(root: Path) -> Path:
    (root / "runs" / "R").mkdir(parents=True)
    return root / "runs" / "R" / "code"


def test_the_reviews_dotdot_through_a_symlinked_dir_is_refused(tmp_path: Path):
    deep = tmp_path / "deep" / "1" / "2" / "3"
    (deep / "etc").mkdir(parents=True)
    (deep / "etc" / "x").write_text("train ALL=(ALL) NOPASSWD:ALL\n")
    (tmp_path / "outside").mkdir()
    rel = ".s/../../../../outside/x"
    code = code_dir(tmp_path, {rel: ["f", 420, "0"]})
    (code / ".s").symlink_to(deep)
    with pytest.raises(ValueError) as e:
        snapshot.take(str(code), str(runs(tmp_path)), None, proctree)
    assert not (tmp_path / "outside" / "x").exists()
    assert str(e.value) == (
        f"{code}/.ddpfleet/manifest.json: refusing the entry {rel!r}: a '..', '.' or empty part"
    )


def test_an_absolute_path_is_refused(tmp_path: Path):
    target = tmp_path / "etc" / "pwn2"
    code = code_dir(tmp_path, {str(target): ["f", 0o440, "0"]}, {"a.py": "x"})
    with pytest.raises(ValueError, match=r"manifest\.json: refusing the entry '/.*pwn2': an abs"):
        snapshot.take(str(code), str(runs(tmp_path)), None, proctree)
    assert not target.exists()


def test_a_symlinked_parent_to_a_closed_dir_copies_nothing(tmp_path: Path):
    secret = tmp_path / "root-only"
    secret.mkdir(mode=0o700)
    (secret / "secret").write_text("s3cret")
    code = code_dir(tmp_path, {"leakdir/secret": ["f", 0o644, "0"]})
    (code / "leakdir").symlink_to(secret)
    dest = runs(tmp_path)
    with pytest.raises(ValueError, match="the entry 'leakdir/secret': a symlink on its path"):
        snapshot.take(str(code), str(dest), None, proctree)
    assert [p for p in dest.rglob("*") if p.is_file()] == []


def test_a_symlinked_parent_in_the_snapshot_is_refused(tmp_path: Path):
    """`l` then a file under it: the second entry would write through the first's link."""
    (tmp_path / "elsewhere").mkdir()
    code = code_dir(tmp_path, {"d": ["l", 0, "0"], "d/f": ["f", 0o644, "0"]})
    (code / "d").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="the entry 'd/f': a symlink on its path"):
        snapshot.take(str(code), str(runs(tmp_path)), None, proctree)
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_setuid_mode_ends_0755_and_links_stay_links(tmp_path: Path):
    code = code_dir(
        tmp_path,
        {"bin/tool": ["f", 0o4755, "0"], "lib/a.py": ["f", 0o644, "0"], "cur": ["l", 0, "0"]},
        {"bin/tool": "#!/bin/sh\n", "lib/a.py": "a = 1\n"},
    )
    (code / "cur").symlink_to("/etc/passwd")
    dest = Path(snapshot.take(str(code), str(runs(tmp_path)), None, proctree))
    assert stat.S_IMODE((dest / "bin" / "tool").stat().st_mode) == 0o755
    assert (dest / "lib" / "a.py").read_text() == "a = 1\n"
    assert os.readlink(dest / "cur") == "/etc/passwd"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700
    assert sorted(p.name for p in dest.iterdir()) == ["bin", "cur", "lib"]  # not .ddpfleet


def test_a_fifo_in_place_of_a_file_is_refused_not_waited_on(tmp_path: Path):
    code = code_dir(tmp_path, {"f": ["f", 0o644, "0"]})
    os.mkfifo(code / "f")
    with pytest.raises(ValueError, match="the entry 'f': not a regular file"):
        snapshot.take(str(code), str(runs(tmp_path)), None, proctree)


# -- as a real other user (root on this box) ---------------------------------------------------


@pytest.fixture
def user_tree(tmp_path: Path) -> tuple[Path, pwd.struct_passwd]:
    """tmp_path reachable by `nobody` (pytest makes it 0700), its code dir nobody's."""
    pw = pwd.getpwnam(NOBODY)
    for p in (tmp_path, *tmp_path.parents):
        if p == Path("/"):
            break
        p.chmod(p.stat().st_mode | 0o711)
    (tmp_path / "home").mkdir()
    os.chown(tmp_path / "home", pw.pw_uid, pw.pw_gid)
    return tmp_path / "home", pw


def chown_all(root: Path, pw: pwd.struct_passwd) -> None:
    for p in [root, *root.rglob("*")]:
        os.lchown(p, pw.pw_uid, pw.pw_gid)


def never_chown(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chown walk after the copy follows what the user swapped in meanwhile (review #2)."""
    for name in ("lchown", "chown"):
        monkeypatch.setattr(os, name, lambda *a, name=name: pytest.fail(f"os.{name}{a}"))


@as_root
def test_the_copy_is_made_by_the_training_user_nothing_chowned(
    user_tree, monkeypatch: pytest.MonkeyPatch
):
    home, pw = user_tree
    code = code_dir(home, {"a.py": ["f", 0o640, "0"], "pkg/b.py": ["f", 0o600, "0"]},
                    {"a.py": "a", "pkg/b.py": "b"})  # fmt: skip
    chown_all(home, pw)
    dest = runs(home.parent)
    never_chown(monkeypatch)
    snapshot.take(str(code), str(dest), NOBODY, proctree)
    owners = {str(p.relative_to(dest)): (p.stat().st_uid, p.stat().st_gid)
              for p in [dest, *dest.rglob("*")]}  # fmt: skip
    assert set(owners.values()) == {(pw.pw_uid, pw.pw_gid)}, owners
    assert sorted(owners) == [".", "a.py", "pkg", "pkg/b.py"]
    assert dest.parent.stat().st_uid == 0


@as_root
def test_what_the_user_cannot_read_is_not_copied(user_tree):
    home, pw = user_tree
    code = code_dir(home, {"a.py": ["f", 0o644, "0"], "leak/shadow": ["f", 0o644, "0"]},
                    {"a.py": "a", "leak/shadow": "root:secret"})  # fmt: skip
    chown_all(home, pw)
    os.chown(code / "leak" / "shadow", 0, 0)  # root's, 0600: root could read it, nobody not
    os.chmod(code / "leak" / "shadow", 0o600)
    dest = runs(home.parent)
    with pytest.raises(OSError, match=r"the entry 'leak/shadow': Permission denied"):
        snapshot.take(str(code), str(dest), NOBODY, proctree)
    assert not (dest / "leak" / "shadow").exists()

    closed = home.parent / "closed"
    closed.mkdir(mode=0o700)
    (closed / "shadow").write_text("root:secret")
    os.unlink(code / "leak" / "shadow")
    os.symlink(closed / "shadow", code / "leak" / "shadow")  # the last part a link
    again = dest.parent / "again"
    with pytest.raises(OSError, match=r"the entry 'leak/shadow': a symlink on its path"):
        snapshot.take(str(code), str(again), NOBODY, proctree)
    assert not (again / "leak" / "shadow").exists()


@as_root
def test_the_reviews_dotdot_is_refused_as_the_user_too(user_tree):
    home, pw = user_tree
    rel = ".s/../../../etc/pwn"
    code = code_dir(home, {rel: ["f", 0o440, "0"]})
    chown_all(home, pw)
    with pytest.raises(OSError, match=r"manifest\.json: refusing the entry '\.s/\.\./"):
        snapshot.take(str(code), str(runs(home.parent)), NOBODY, proctree)


# -- resume -------------------------------------------------------------------------------------


def old_snapshot(root: Path) -> Path:
    old = root / "runs" / "OLD" / "code"
    (old / "ckpt").mkdir(parents=True)
    (old / "train.py").write_text("t")
    (old / "ckpt" / "epoch-1.pt").write_text("w")
    (old / "latest").symlink_to("ckpt/epoch-1.pt")
    (old / "abs").symlink_to("/etc")
    return old


def test_resume_copies_links_as_links(tmp_path: Path):
    old = old_snapshot(tmp_path)
    dest = Path(snapshot.resume(str(old), str(runs(tmp_path)), None, proctree))
    assert os.readlink(dest / "latest") == "ckpt/epoch-1.pt"
    assert os.readlink(dest / "abs") == "/etc" and (dest / "abs").is_symlink()
    assert (dest / "ckpt" / "epoch-1.pt").read_text() == "w"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700


@pytest.mark.parametrize("when", ["listed", "looked at"])
def test_resume_never_follows_a_dir_swapped_for_a_symlink(tmp_path: Path, monkeypatch, when):
    """The user swaps ckpt/ for a link to a closed dir once the copy has listed its parent, or
    once it has found ckpt/ to be a directory: a link copied as a link, or a refusal."""
    old = old_snapshot(tmp_path)
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    (closed / "secret").write_text("s")
    real = {"listed": os.listdir, "looked at": os.stat}[when]

    def swap(*args, **kw):
        found = real(*args, **kw)
        ours = when == "listed" or (args[0] == "ckpt" and "dir_fd" in kw)
        if ours and not os.path.islink(old / "ckpt"):  # lstat: not the patched os.stat
            os.rename(old / "ckpt", tmp_path / "moved")
            os.symlink(closed, old / "ckpt")
        return found

    dest = runs(tmp_path)
    monkeypatch.setattr(os, {"listed": "listdir", "looked at": "stat"}[when], swap)
    if when == "listed":
        snapshot.resume(str(old), str(dest), None, proctree)
        assert (dest / "ckpt").is_symlink() and os.readlink(dest / "ckpt") == str(closed)
    else:
        with pytest.raises(ValueError, match=r"snapshot .*/OLD/code: a symlink on its path"):
            snapshot.resume(str(old), str(dest), None, proctree)
    monkeypatch.undo()
    assert not list(dest.rglob("secret"))


@as_root
def test_resume_is_copied_by_the_user_nothing_chowned(user_tree, monkeypatch):
    home, pw = user_tree
    old = old_snapshot(home)
    chown_all(home, pw)
    (home / "runs" / "OLD").chmod(0o755)
    never_chown(monkeypatch)
    dest = Path(snapshot.resume(str(old), str(runs(home.parent)), NOBODY, proctree))
    assert {p.lstat().st_uid for p in [dest, *dest.rglob("*")]} == {pw.pw_uid}
    assert (dest / "latest").is_symlink()
