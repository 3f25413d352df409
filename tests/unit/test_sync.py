"""Code sync: what the project is, what changed, and the node side applying it (run locally)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddpfleet import sync
from ddpfleet.errors import PlanError


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=root,
                   check=True, capture_output=True)


def make_project(root: Path) -> Path:
    for rel, text in {
        "train.py": "print('hi')\n",
        "pkg/model.py": "W = 1\n",
        "data/big.bin": "ignored by .gitignore\n",
        ".gitignore": "data/\n*.ckpt\n",
        "run.ckpt": "ignored\n",
        "logs/r1/node0.log": "run output\n",
        "envs/e/bin/python": "an env\n",
        ".venv/bin/python": "a venv\n",
        ".ddpfleet/known_hosts": "keys\n",
        "pkg/__pycache__/model.cpython-311.pyc": "bytecode\n",
    }.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    return root


def node_run(args: list[str], stdin: bytes) -> dict:
    """node_helper.py exactly as a node runs it: the loader command line, source on stdin."""
    cmd = sync.helper_command(sys.executable, "node_helper.py", *args)
    r = subprocess.run(["sh", "-c", cmd], input=sync.helper_source("node_helper.py") + stdin,
                       capture_output=True, check=False)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout.decode().strip().splitlines()[-1])


def remote_manifest(code: Path) -> dict:
    return node_run(["probe", str(code), "127.0.0.1"], b"")["manifest"]


def apply(root: Path, code: Path, files, change) -> dict:
    buf = io.BytesIO()
    sync.write_tar(buf, root, files, change.send)
    header = json.dumps({"delete": list(change.delete)}).encode() + b"\n"
    return node_run(["apply", str(code)], header + buf.getvalue())


@pytest.mark.parametrize("in_git", [True, False])
def test_project_files_honour_gitignore_and_leave_out_run_dirs(tmp_path, in_git):
    root = make_project(tmp_path / "proj")
    if in_git:
        git(root, "init", "-q")
        git(root, "add", "train.py")  # tracked; the rest untracked but not ignored
    files = sync.project_files(root)
    expected = {".gitignore", "train.py", "pkg/model.py", "run.sh"}
    if not in_git:  # no git: .gitignore is just a file, its patterns do not apply
        expected |= {"data/big.bin", "run.ckpt"}
    assert set(files) == expected
    assert files["run.sh"].executable and not files["train.py"].executable


def test_deleted_tracked_file_is_not_listed(tmp_path):
    root = make_project(tmp_path / "proj")
    git(root, "init", "-q")
    git(root, "add", "-A")
    (root / "pkg/model.py").unlink()
    assert "pkg/model.py" not in sync.project_files(root)


def test_diff_sends_new_and_changed_deletes_gone():
    e = sync.Entry("f", False, "aa")
    local = {"same": e, "changed": sync.Entry("f", False, "bb"), "new": e,
             "now_exec": sync.Entry("f", True, "aa")}
    remote = {"same": ["f", False, "aa"], "changed": ["f", False, "aa"],
              "now_exec": ["f", False, "aa"], "gone": ["f", False, "cc"]}
    change = sync.diff(local, remote)
    assert change.send == ("changed", "new", "now_exec") and change.delete == ("gone",)
    assert sync.diff(local, {k: v.as_list() for k, v in local.items()}).empty


def test_mirror_round_trip_sends_only_what_changed(tmp_path):
    root = make_project(tmp_path / "proj")
    code = tmp_path / "node" / "code"
    files = sync.project_files(root)
    first = sync.diff(files, remote_manifest(code))
    assert apply(root, code, files, first) == {"written": len(files), "deleted": 0}
    assert remote_manifest(code) == {k: v.as_list() for k, v in files.items()}
    assert os.access(code / "run.sh", os.X_OK)

    (root / "train.py").write_text("print('changed')\n")
    (root / "run.sh").unlink()
    (root / "pkg/model.py").unlink()
    (root / "pkg/model.py").mkdir()  # a file became a directory
    (root / "pkg/model.py/__init__.py").write_text("")
    (root / "link").symlink_to("train.py")
    files = sync.project_files(root)
    change = sync.diff(files, remote_manifest(code))
    assert set(change.send) == {"train.py", "pkg/model.py/__init__.py", "link"}
    assert set(change.delete) == {"run.sh", "pkg/model.py"}
    assert apply(root, code, files, change) == {"written": 3, "deleted": 2}
    assert remote_manifest(code) == {k: v.as_list() for k, v in files.items()}
    assert os.readlink(code / "link") == "train.py"
    assert sync.diff(files, remote_manifest(code)).empty


def test_unsafe_tar_member_is_refused(tmp_path):
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    cmd = sync.helper_command(sys.executable, "node_helper.py", "apply", str(tmp_path / "code"))
    r = subprocess.run(["sh", "-c", cmd], input=sync.helper_source("node_helper.py")
                       + b'{"delete": []}\n' + buf.getvalue(), capture_output=True, check=False)
    assert r.returncode != 0 and b"unsafe path" in r.stderr
    assert not (tmp_path / "escape.txt").exists()


def test_script_must_be_in_the_mirror(tmp_path):
    root = make_project(tmp_path / "proj")
    git(root, "init", "-q")
    files = sync.project_files(root)
    sync.require(files, "train.py", root)
    with pytest.raises(PlanError, match="not found in the synced project"):
        sync.require(files, "scripts/nope.py", root)
    with pytest.raises(PlanError, match="left out"):
        sync.require(files, "data/big.bin", root)
