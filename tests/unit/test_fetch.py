"""`invoke fetch`'s pure half: PATH never leaves the run dir; the local half's rules (a .part
continued only when its last bytes are still the node's, nothing written through a local
symlink out of the destination). The SFTP side is tests/integration/test_fetch.py's, on real
nodes; here a node's file is a local file read through the same few calls."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ddpfleet.errors import PlanError
from ddpfleet.launch import fetchfiles
from ddpfleet.launch.fetch import remote_path
from ddpfleet.launch.fetchfiles import Entry, Fetched

TOP = "/var/lib/ddpfleet/runs/r1"


@pytest.mark.parametrize(
    ("path", "want"),
    [
        (None, f"{TOP}/checkpoints"),
        ("checkpoints/step-00000010", f"{TOP}/checkpoints/step-00000010"),
        ("outputs/", f"{TOP}/outputs"),
        (".", TOP),
        (f"{TOP}/checkpoints", f"{TOP}/checkpoints"),
    ],
)
def test_paths_inside_the_run_dir(path, want):
    assert remote_path("r1", path) == want


@pytest.mark.parametrize(
    "path", ["..", "../r2/checkpoints", "checkpoints/../../r2", "/etc", f"{TOP}/../r2", "/"]
)
def test_paths_out_of_the_run_dir_are_refused(path):
    with pytest.raises(PlanError, match=r"outside the run's directory /var/lib/ddpfleet/runs/r1"):
        remote_path("r1", path)


def test_a_run_id_that_is_no_run_id():
    with pytest.raises(PlanError, match="not a run id"):
        remote_path("../etc", None)


class LocalSftp:
    """The SFTP calls fetchfiles makes, on local files (the node's side of the test)."""

    def __init__(self):
        self.read_from: list[int] = []

    def open(self, path, mode):
        return _File(path, self)


class _File:
    def __init__(self, path, owner):
        self.f, self.owner = open(path, "rb"), owner  # noqa: SIM115

    def seek(self, at):
        self.f.seek(at)

    def prefetch(self, size, inflight):
        self.owner.read_from.append(self.f.tell())

    def read(self, n):
        return self.f.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def node_file(tmp_path: Path, data: bytes, mode=0o640, mtime=1_700_000_000) -> Entry:
    src = tmp_path / "node"
    src.mkdir(exist_ok=True)
    (src / "w.bin").write_bytes(data)
    return Entry("w.bin", "file", len(data), mtime, mode)


def bring(tmp_path: Path, entries, sftp=None) -> Fetched:
    (tmp_path / "home").mkdir(exist_ok=True)  # fetch.py makes it (0700)
    got = Fetched(tmp_path / "home" / "checkpoints")
    top = Entry("", "dir", mode=0o700)
    fetchfiles.bring("node0", sftp or LocalSftp(), str(tmp_path / "node"), [top, *entries], got)
    return got


def test_a_part_continues_only_when_its_end_is_still_the_nodes(tmp_path):
    data = os.urandom(300_000)
    e = node_file(tmp_path, data)
    home = tmp_path / "home" / "checkpoints"
    home.mkdir(parents=True)
    (home / "w.bin.part").write_bytes(data[:200_000])
    sftp = LocalSftp()
    got = bring(tmp_path, [e], sftp)
    assert sftp.read_from == [200_000] and got.resumed == [("w.bin", 200_000)]
    assert (home / "w.bin").read_bytes() == data and not (home / "w.bin.part").exists()
    assert stat.S_IMODE((home / "w.bin").stat().st_mode) == 0o640
    assert int((home / "w.bin").stat().st_mtime) == 1_700_000_000
    assert got.bytes == 100_000 and got.files == 1
    # a .part of another version of the file: started again
    (home / "w.bin").unlink()
    (home / "w.bin.part").write_bytes(os.urandom(200_000))
    sftp = LocalSftp()
    got = bring(tmp_path, [e], sftp)
    assert sftp.read_from == [0] and got.resumed == [] and (home / "w.bin").read_bytes() == data
    # unchanged (size and mtime): nothing read
    sftp = LocalSftp()
    got = bring(tmp_path, [e], sftp)
    assert sftp.read_from == [] and got.unchanged == 1 and got.files == 0


def test_nothing_is_written_through_a_local_symlink_out(tmp_path):
    e = node_file(tmp_path, b"weights")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    home = tmp_path / "home" / "checkpoints"
    home.mkdir(parents=True)
    (home / "sub").symlink_to(elsewhere)
    sub = Entry("sub/w.bin", "file", e.size, e.mtime, e.mode)
    (tmp_path / "node" / "sub").mkdir()
    (tmp_path / "node" / "sub" / "w.bin").write_bytes(b"weights")
    got = bring(tmp_path, [sub])
    assert got.problems and "leads out of" in got.problems[0]
    assert list(elsewhere.iterdir()) == []
    # the node has a directory there: the local link is replaced by one, nothing goes out
    got = bring(tmp_path, [Entry("sub", "dir", mode=0o750), sub])
    assert not got.problems and (home / "sub").is_dir() and not (home / "sub").is_symlink()
    assert (home / "sub" / "w.bin").read_bytes() == b"weights" and list(elsewhere.iterdir()) == []
    assert stat.S_IMODE((home / "sub").stat().st_mode) == 0o750


def test_an_empty_file_comes_too(tmp_path):
    got = bring(tmp_path, [node_file(tmp_path, b"", mode=0o600)])
    assert got.files == 1 and (tmp_path / "home" / "checkpoints" / "w.bin").read_bytes() == b""
