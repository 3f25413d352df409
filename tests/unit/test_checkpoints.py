"""node/checkpoints.py: a partial checkpoint is never chosen, prune keeps what it must, and a
checkpoint moves (copy_into, pack/unpack) whole or not at all.

The partial cases are the ways a node dies mid-write: before the manifest, with a file cut
short, with a file rewritten after the manifest, while a temp dir is being filled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import pwd
from pathlib import Path

import pytest

from ddpfleet.node import NODE_DIR


def load(name: str):
    spec = importlib.util.spec_from_file_location(name[:-3], NODE_DIR / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ck, proctree = load("checkpoints.py"), load("proctree.py")
as_root = pytest.mark.skipif(os.getuid() != 0, reason="dropping to another user needs root")


def write(top: Path, step: int, files: dict[str, bytes] | None = None, manifest=True) -> Path:
    """A checkpoint the way the contract writes it: the files, then MANIFEST.json."""
    files = (
        {"model.pt": b"weights %d" % step, "opt/state.pt": b"o" * 3000} if files is None else files
    )
    path = top / ck.step_name(step)
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    if manifest:
        sums = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
        ck.write_manifest(str(path), step, 2, sums)
    return path


def newest_step(top: Path):
    found = ck.newest_complete(str(top))
    return None if found is None else found[1]["step"]


def test_the_newest_complete_one_is_chosen(tmp_path: Path):
    for step in (10, 20, 30):
        write(tmp_path, step)
    path, manifest = ck.newest_complete(str(tmp_path))
    assert path == str(tmp_path / "step-00000030")
    assert manifest["step"] == 30 and manifest["world_size"] == 2
    assert manifest["format"] == "ddpfleet.checkpoint/1"
    assert set(manifest["files"]) == {"model.pt", "opt/state.pt"}


@pytest.mark.parametrize(
    "spoil",
    [
        "no manifest",
        "truncated file",
        "wrong hash",
        "missing file",
        "tmp dir",
        "manifest half written",
        "wrong step in the manifest",
        "file is a symlink",
        "dir is a symlink",
    ],
)
def test_a_partial_checkpoint_is_never_chosen(tmp_path: Path, spoil: str):
    write(tmp_path, 10)
    newer = write(tmp_path, 20, manifest=spoil != "no manifest")
    if spoil == "truncated file":
        data = (newer / "opt/state.pt").read_bytes()
        (newer / "opt/state.pt").write_bytes(data[:1000])
    elif spoil == "wrong hash":
        (newer / "model.pt").write_bytes(b"weights 21")  # same length, other bytes
    elif spoil == "missing file":
        (newer / "model.pt").unlink()
    elif spoil == "tmp dir":
        newer.rename(tmp_path / "step-00000020.tmp")
        write(tmp_path, 30).rename(tmp_path / ".step-00000030.tmp-99")
    elif spoil == "manifest half written":
        text = (newer / "MANIFEST.json").read_text()
        (newer / "MANIFEST.json").write_text(text[: len(text) // 2])
    elif spoil == "wrong step in the manifest":
        newer.rename(tmp_path / "step-00000040")
    elif spoil == "dir is a symlink":
        newer.rename(tmp_path / "elsewhere")
        newer.symlink_to(tmp_path / "elsewhere")
    elif spoil == "file is a symlink":
        (newer / "model.pt").rename(tmp_path / "elsewhere")
        (newer / "model.pt").symlink_to(tmp_path / "elsewhere")
    assert newest_step(tmp_path) == 10
    assert ck.complete(str(tmp_path / "step-00000010"))["step"] == 10


def test_nothing_complete_is_none(tmp_path: Path):
    assert ck.newest_complete(str(tmp_path / "absent")) is None
    write(tmp_path, 5, manifest=False)
    (tmp_path / "final.json").write_text("{}")
    assert ck.newest_complete(str(tmp_path)) is None


def test_a_manifest_naming_a_path_outside_is_not_ours(tmp_path: Path):
    path = write(tmp_path, 1)
    (tmp_path / "secret").write_bytes(b"x")
    sums = {"../secret": hashlib.sha256(b"x").hexdigest()}
    ck.write_manifest(str(path), 1, 1, sums)
    assert ck.complete(str(path)) is None


def names(top: Path) -> list[str]:
    return sorted(p.name for p in top.iterdir())


def test_prune_keeps_the_newest_complete_and_what_is_being_written(tmp_path: Path):
    for step in (1, 2, 3, 4, 5):
        write(tmp_path, step)
    write(tmp_path, 3, {"model.pt": b"x"}, manifest=False)  # an old partial: goes
    (tmp_path / "step-00000002" / "MANIFEST.json").unlink()  # an old partial now: goes
    write(tmp_path, 6, manifest=False)  # being written: stays
    (tmp_path / ".step-00000007.tmp-12").mkdir()  # a copy arriving: stays
    (tmp_path / ".step-00000001.tmp-12").mkdir()  # a dead copy's leftover: goes
    (tmp_path / "final.json").write_text("{}")  # not a checkpoint: untouched
    removed = ck.prune(str(tmp_path), keep=2)
    assert names(tmp_path) == [
        ".step-00000007.tmp-12", "final.json", "step-00000004", "step-00000005", "step-00000006",
    ]  # fmt: skip
    assert removed == [".step-00000001.tmp-12", "step-00000001", "step-00000002", "step-00000003"]


def test_prune_never_removes_the_newest_complete(tmp_path: Path):
    write(tmp_path, 1)
    write(tmp_path, 2)
    write(tmp_path, 3, manifest=False)
    assert ck.prune(str(tmp_path), keep=0) == ["step-00000001"]
    assert names(tmp_path) == ["step-00000002", "step-00000003"]


def test_prune_with_nothing_complete_removes_nothing(tmp_path: Path):
    write(tmp_path, 1, manifest=False)
    (tmp_path / ".step-00000001.tmp-3").mkdir()
    assert ck.prune(str(tmp_path)) == []
    assert names(tmp_path) == [".step-00000001.tmp-3", "step-00000001"]


def test_copy_into_verifies_and_lands_whole(tmp_path: Path):
    src = write(tmp_path / "a", 7)
    landed = ck.copy_into(str(src), str(tmp_path / "b" / "checkpoints"))
    assert landed == str(tmp_path / "b" / "checkpoints" / "step-00000007")
    assert ck.complete(landed)["files"] == ck.complete(str(src))["files"]
    assert names(tmp_path / "b" / "checkpoints") == ["step-00000007"]


def test_copy_into_refuses_a_partial_source_and_leaves_nothing(tmp_path: Path):
    src = write(tmp_path / "a", 7)
    (src / "model.pt").write_bytes(b"torn")
    dest = tmp_path / "b"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ck.copy_into(str(src), str(dest))
    assert not dest.exists() or names(dest) == []


@as_root
def test_copy_into_as_the_user_makes_the_users_files(tmp_path: Path):
    """As on a node: both runs' checkpoint dirs are the training user's, 0700."""
    user = pwd.getpwnam("nobody")
    for p in (tmp_path, *tmp_path.parents):  # pytest makes them 0700
        if p != Path("/"):
            p.chmod(p.stat().st_mode | 0o711)
    src = write(tmp_path / "a", 3)
    (tmp_path / "b").mkdir(mode=0o700)
    for p in [tmp_path / "a", *(tmp_path / "a").rglob("*"), tmp_path / "b"]:
        os.lchown(p, user.pw_uid, user.pw_gid)
    landed = Path(ck.copy_into(str(src), str(tmp_path / "b"), "nobody", proctree))
    assert {p.stat().st_uid for p in [landed, *landed.rglob("*")]} == {user.pw_uid}
    assert ck.complete(str(landed))["step"] == 3


def test_pack_unpack_round_trip(tmp_path: Path):
    src = write(tmp_path / "a", 12, {"model.pt": os.urandom(3 << 20), "x/y/z.bin": b""})
    stream = b"".join(ck.pack(str(src)))
    manifest = ck.unpack(io.BytesIO(stream), str(tmp_path / "b"))
    assert manifest == ck.complete(str(src))
    landed = tmp_path / "b" / "step-00000012"
    assert ck.complete(str(landed)) == manifest
    assert (landed / "model.pt").read_bytes() == (src / "model.pt").read_bytes()


@pytest.mark.parametrize("corrupt", ["cut short", "a flipped byte", "not a stream", "bad manifest"])
def test_a_corrupted_stream_leaves_nothing_in_place(tmp_path: Path, corrupt: str):
    src = write(tmp_path / "a", 12, {"model.pt": os.urandom(100_000), "b.pt": b"b" * 5000})
    stream = bytearray(b"".join(ck.pack(str(src))))
    if corrupt == "cut short":
        stream = stream[: len(stream) - 10]
    elif corrupt == "a flipped byte":
        stream[-100] ^= 0xFF
    elif corrupt == "not a stream":
        stream = bytearray(b"GET / HTTP/1.1\r\n\r\n" + bytes(64))
    else:
        head = stream.index(b"{")
        stream[head : head + 2] = b"[1"
    dest = tmp_path / "b"
    write(dest, 3)  # what was there stays as it was
    with pytest.raises(ValueError):
        ck.unpack(io.BytesIO(bytes(stream)), str(dest))
    assert names(dest) == ["step-00000003"]
    assert newest_step(dest) == 3


def test_unpack_replaces_a_partial_of_the_same_step(tmp_path: Path):
    src = write(tmp_path / "a", 4)
    write(tmp_path / "b", 4, {"model.pt": b"half"}, manifest=False)
    ck.unpack(io.BytesIO(b"".join(ck.pack(str(src)))), str(tmp_path / "b"))
    assert newest_step(tmp_path / "b") == 4
    assert names(tmp_path / "b") == ["step-00000004"]


def test_pack_refuses_a_partial_checkpoint(tmp_path: Path):
    src = write(tmp_path, 4)
    (src / "MANIFEST.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError):
        list(ck.pack(str(src)))


part = load("part.py")


@as_root
def test_part_makes_the_runs_checkpoint_dir_the_users_and_0700(tmp_path: Path):
    """Before torchrun: the run dir root's 0755, the checkpoint dir the training user's 0700."""
    path = tmp_path / "runs" / "r1" / "checkpoints"
    assert part.checkpoint_dir(proctree, str(path), "nobody") == str(path)
    assert path.stat().st_uid == pwd.getpwnam("nobody").pw_uid
    assert oct(path.stat().st_mode & 0o777) == "0o700"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o755" and path.parent.stat().st_uid == 0
    assert part.checkpoint_dir(proctree, str(path), "nobody") == str(path)  # twice: the same
    os.rmdir(path)
    path.symlink_to(tmp_path)  # never chowned through a symlink
    with pytest.raises(OSError, match="cannot make the checkpoint dir"):
        part.checkpoint_dir(proctree, str(path), "nobody")
    assert tmp_path.stat().st_uid == 0
