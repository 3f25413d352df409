"""Code sync: what the project is, what changed, and the node side applying it (run locally)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ddpfleet import launch
from ddpfleet.errors import PlanError
from ddpfleet.launch import sync
from ddpfleet.node import NODE_DIR


def git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args],
        cwd=root,
        check=True,
        capture_output=True,
    )


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


RUN = "r-test"


def load_node_helper():
    """node_helper.py imported here: this process can hold a code dir's lock as a runner does."""
    path = NODE_DIR / "node_helper.py"
    spec = importlib.util.spec_from_file_location("node_helper", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


node_helper = load_node_helper()


def let_go() -> None:
    """The runner holding the locks exits."""
    while node_helper._HELD:
        os.close(node_helper._HELD.pop())


@pytest.fixture
def held():
    """claim(code_dir, run_id) as the run's runner does it; every lock let go afterwards."""
    yield lambda code, run_id=RUN: node_helper.claim(str(code), run_id)
    let_go()


def node_call(args: list[str], stdin: bytes) -> subprocess.CompletedProcess:
    """node_helper.py exactly as a node runs it: the loader command line, source on stdin."""
    cmd = sync.helper_command(sys.executable, "node_helper.py", *args)
    return subprocess.run(
        ["sh", "-c", cmd],
        input=sync.helper_source("node_helper.py") + stdin,
        capture_output=True,
        check=False,
    )


def node_run(args: list[str], stdin: bytes) -> dict:
    r = node_call(args, stdin)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout.decode().strip().splitlines()[-1])


def probe(code: Path) -> dict:
    return node_run(["probe", str(code), "127.0.0.1"], b"")


def remote_manifest(code: Path) -> dict:
    return probe(code)["manifest"]


def tar_of(root: Path, files, change) -> bytes:
    buf = io.BytesIO()
    sync.write_tar(buf, root, files, change.send)
    return sync.header(files, change) + buf.getvalue()


def apply(root: Path, code: Path, files, change, run_id: str = RUN) -> dict:
    return node_run(["apply", str(code), run_id], tar_of(root, files, change))


def sync_once(root: Path, code: Path, held) -> sync.Change:
    """One `invoke train`'s sync: claim and lock as the runner, diff, apply, run over."""
    claim = held(code)
    assert claim["problem"] is None, claim
    files = sync.project_files(root)
    change = sync.diff(files, node_helper.manifest(str(code)))
    apply(root, code, files, change)
    let_go()
    return change


def tree(top: Path) -> dict[str, tuple[int, bytes]]:
    return {
        p.relative_to(top).as_posix(): (p.stat().st_mode, p.read_bytes())
        for p in sorted(top.rglob("*"))
        if p.is_file()
    }


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


NESTED_STATE = {  # an inventory in cluster/: its .ddpfleet/ as bootstrap and sandbox.up leave it
    "cluster/inventory.yaml": "nodes: {node0: 10.0.0.10}\n",
    "cluster/.ddpfleet/cluster_ca": "-----BEGIN OPENSSH PRIVATE KEY-----\n",
    "cluster/.ddpfleet/slurm/munge.key": "munge\n",
    "cluster/.ddpfleet/wheelhouse/cp311-x/torch.whl": "wheel\n",
    "deep/er/.ddpfleet/known_hosts": "keys\n",
}


@pytest.mark.parametrize("in_git", [True, False])
def test_no_ddpfleet_dir_at_any_depth_is_listed(tmp_path, in_git):
    """The review's #4: a .ddpfleet/ below the top went to the nodes (git lists it too when the
    project's .gitignore lacks it, as users' projects do)."""
    root = make_project(tmp_path / "proj")
    for rel, text in NESTED_STATE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    if in_git:
        git(root, "init", "-q")
        git(root, "add", "-f", "cluster/.ddpfleet/cluster_ca")  # even one committed by mistake
        listed = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True
        ).stdout.decode()
        assert "cluster/.ddpfleet/slurm/munge.key" in listed  # what made it a repro
    files = sync.project_files(root)
    assert "cluster/inventory.yaml" in files
    assert not [p for p in files if ".ddpfleet" in p.split("/")]


def write_inventory(path: Path, **ssh) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "ssh": ssh,
                "jupyter": {"password_file": "secrets/jupyter.pw"},
                "openssh_server": {"cluster_ca": "ca/cluster_ca"},
                "nodes": {"node0": "10.0.0.10", "node1": {"host": "10.0.0.11", "key": "k1"}},
            }
        )
    )
    return path


@pytest.mark.parametrize("in_git", [True, False])
def test_secrets_the_inventory_names_inside_the_project_are_not_listed(tmp_path, in_git):
    """Key (and its .pub), known_hosts, password files and the CA, wherever the inventory puts
    them in the project, stay home whatever .gitignore says; so do the run logs beside it."""
    from ddpfleet import inventory, secretfiles

    root = make_project(tmp_path / "proj")
    secrets = [
        "keys/id_ed25519",
        "keys/id_ed25519.pub",
        "cluster/k1",
        "cluster/known_hosts",
        "cluster/sudo.pw",
        "cluster/secrets/jupyter.pw",
        "cluster/ca/cluster_ca",
        "cluster/logs/r1/node0.log",
    ]
    for rel in [*secrets, "keys/README.md"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("secret\n")
    path = write_inventory(
        root / "cluster" / "inventory.yaml",
        key="../keys/id_ed25519",
        known_hosts="known_hosts",
        become_password_file="sudo.pw",
    )
    if in_git:
        git(root, "init", "-q")
    loaded = inventory.load(path, nodes="node0")  # --nodes: node1's key stays home too
    keep_out = secretfiles.named(loaded) | {loaded.root / "logs"}
    files = sync.project_files(root, keep_out)
    assert not set(secrets) & set(files)
    assert {"keys/README.md", "cluster/inventory.yaml", "train.py"} <= set(files)
    # through a symlinked project path too: the paths are compared resolved as well
    (tmp_path / "link").symlink_to(root)
    assert not set(secrets) & set(sync.project_files(tmp_path / "link", keep_out))


def test_train_config_carries_the_secrets_to_the_sync(tmp_path):
    from ddpfleet import inventory

    root = tmp_path / "proj"
    path = write_inventory(root / "cluster" / "inventory.yaml", key="../id", known_hosts="kh")
    (root / "id").parent.mkdir(parents=True, exist_ok=True)
    (root / "id").write_text("key\n")
    (root / "cluster/k1").write_text("key\n")
    loaded = inventory.load(path)
    config = launch.resolve(
        loaded,
        launch.TrainFlags(project_dir=root, run_id="r1"),
        loaded.root / "logs",
    )
    assert {root / "id", root / "cluster/kh", root / "cluster/.ddpfleet"} <= config.keep_out
    assert loaded.root / "logs" in config.keep_out


def test_state_dir_writes_its_gitignore_and_keeps_one_there(tmp_path):
    from ddpfleet.hygiene import state_dir

    made = state_dir(tmp_path / "proj/cluster/.ddpfleet/slurm", mode=0o700)
    assert made.is_dir() and stat.S_IMODE(made.stat().st_mode) == 0o700
    assert (tmp_path / "proj/cluster/.ddpfleet/.gitignore").read_text() == "*\n"
    assert not (made / ".gitignore").exists() and not (tmp_path / "proj/.gitignore").exists()
    (tmp_path / "proj/cluster/.ddpfleet/.gitignore").write_text("*\n!keep\n")
    state_dir(tmp_path / "proj/cluster/.ddpfleet/wheelhouse")
    assert (tmp_path / "proj/cluster/.ddpfleet/.gitignore").read_text() == "*\n!keep\n"


def test_every_maker_of_a_ddpfleet_dir_leaves_it_ignored_by_git(tmp_path, monkeypatch):
    """The makers of a .ddpfleet/ on the controller (munge key, cluster CA, known_hosts, runs
    index, wheel cache; the sandbox's go through the same hygiene.state_dir): after each, git
    lists nothing in it."""
    from ddpfleet.engine import wheelhouse
    from ddpfleet.engine.roles import load_role
    from ddpfleet.launch.ssh import runctl
    from ddpfleet.ssh import knownhosts

    load_role("slurm"), load_role("openssh_server")
    monkeypatch.setattr(wheelhouse, "_pip", lambda argv, index: "Saved /x/torch-2-any.whl\n")
    survey = __import__("ddpfleet_role_slurm.survey", fromlist=["survey"])
    cluster = __import__("ddpfleet_role_openssh_server.cluster", fromlist=["cluster"])
    root = tmp_path / "proj"
    root.mkdir()
    git(root, "init", "-q")
    (root / "train.py").write_text("")
    tops = {
        "slurm": lambda d: survey.munge_key(d, create=True),
        "ca": lambda d: cluster._write_once(d / ".ddpfleet" / "cluster_ca", b"ca"),
        "kh": lambda d: knownhosts.append(d / ".ddpfleet" / "known_hosts", "x\n"),
        "runs": lambda d: runctl.Index(d).add("r1", ["node0"]),
        "wheels": lambda d: wheelhouse.fetch(
            d / ".ddpfleet" / "wheelhouse",
            wheelhouse.Spec("torch", "", ()),
            wheelhouse.Target("3.11", "cp", "cp311", "linux-x86_64", "2.36"),
        ),
    }
    for name, make in tops.items():
        make(root / name)
        assert (root / name / ".ddpfleet" / ".gitignore").read_text() == "*\n", name
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True
    ).stdout.decode()
    assert listed.split() == ["train.py"]


def test_deleted_tracked_file_is_not_listed(tmp_path):
    root = make_project(tmp_path / "proj")
    git(root, "init", "-q")
    git(root, "add", "-A")
    (root / "pkg/model.py").unlink()
    assert "pkg/model.py" not in sync.project_files(root)


def test_diff_sends_new_changed_and_re_moded_deletes_gone():
    e = sync.Entry("f", 0o644, "aa")
    local = {
        "same": e,
        "changed": sync.Entry("f", 0o644, "bb"),
        "new": e,
        "now_exec": sync.Entry("f", 0o755, "aa"),
        "now_private": sync.Entry("f", 0o600, "aa"),
    }
    remote = {
        "same": ["f", 0o644, "aa"],
        "changed": ["f", 0o644, "aa"],
        "now_exec": ["f", 0o644, "aa"],
        "now_private": ["f", 0o644, "aa"],
        "gone": ["f", 0o644, "cc"],
    }
    change = sync.diff(local, remote)
    assert change.send == ("changed", "new", "now_exec", "now_private")
    assert change.delete == ("gone",)
    assert sync.diff(local, {k: v.as_list() for k, v in local.items()}).empty


def test_mirror_round_trip_sends_only_what_changed(tmp_path, held):
    root = make_project(tmp_path / "proj")
    code = tmp_path / "node" / "code"
    assert held(code)["problem"] is None
    files = sync.project_files(root)
    first = sync.diff(files, node_helper.manifest(str(code)))
    assert apply(root, code, files, first) == {"written": len(files), "deleted": 0}
    assert node_helper.manifest(str(code)) == {k: v.as_list() for k, v in files.items()}
    assert os.access(code / "run.sh", os.X_OK)

    (root / "train.py").write_text("print('changed')\n")
    (root / "run.sh").unlink()
    (root / "pkg/model.py").unlink()
    (root / "pkg/model.py").mkdir()  # a file became a directory
    (root / "pkg/model.py/__init__.py").write_text("")
    (root / "link").symlink_to("train.py")
    files = sync.project_files(root)
    change = sync.diff(files, node_helper.manifest(str(code)))
    assert set(change.send) == {"train.py", "pkg/model.py/__init__.py", "link"}
    assert set(change.delete) == {"run.sh", "pkg/model.py"}
    assert apply(root, code, files, change) == {"written": 3, "deleted": 2}
    assert node_helper.manifest(str(code)) == {k: v.as_list() for k, v in files.items()}
    assert os.readlink(code / "link") == "train.py"
    assert sync.diff(files, node_helper.manifest(str(code))).empty

    (root / "pkg/model.py/__init__.py").unlink()  # and back: a directory became a file
    (root / "pkg/model.py").rmdir()
    (root / "pkg/model.py").write_text("W = 2\n")
    files = sync.project_files(root)
    change = sync.diff(files, node_helper.manifest(str(code)))
    assert apply(root, code, files, change) == {"written": 1, "deleted": 1}
    assert (code / "pkg/model.py").read_text() == "W = 2\n"


def test_what_the_run_wrote_survives_every_sync(tmp_path, held):
    root = make_project(tmp_path / "proj")
    git(root, "init", "-q")
    code = tmp_path / "node" / "code"
    sync_once(root, code, held)
    # What a job writes relative to its cwd (the code dir), including names the project's
    # .gitignore lists and a whole directory.
    made = {
        "ckpt/checkpoint.pt": b"weights",
        "wandb/run.log": b"log",
        "run.ckpt": b"x",
        "data/big.bin": b"dataset",
        "pkg/__pycache__/model.cpython-311.pyc": b"pyc",
        "notes.txt": b"mine",
    }
    for rel, data in made.items():
        (code / rel).parent.mkdir(parents=True, exist_ok=True)
        (code / rel).write_bytes(data)
    (code / "outputs").mkdir()  # empty, made for later
    (root / "pkg/model.py").unlink()  # the project drops a file: only that one goes
    (root / "train.py").write_text("print('changed')\n")
    change = sync_once(root, code, held)
    assert change.delete == ("pkg/model.py",)
    for rel, data in made.items():
        assert (code / rel).read_bytes() == data, rel
    assert (code / "outputs").is_dir() and not (code / "pkg/model.py").exists()
    assert (code / "train.py").read_text() == "print('changed')\n"
    # The preflight hashes only what the mirror sent: the checkpoint is not even looked at.
    assert set(remote_manifest(code)) == set(sync.project_files(root))


def test_a_sent_file_the_run_rewrote_is_not_deleted(tmp_path, held):
    root = make_project(tmp_path / "proj")
    code = tmp_path / "node" / "code"
    sync_once(root, code, held)
    (code / "run.sh").write_text("#!/bin/sh\n# the run's own results now\n")
    (root / "run.sh").unlink()
    (root / "train.py").unlink()
    change = sync_once(root, code, held)
    assert change.delete == ("run.sh", "train.py")
    assert (code / "run.sh").read_text().endswith("# the run's own results now\n")
    assert not (code / "train.py").exists()
    assert "run.sh" not in node_helper.listed(str(code))  # the run's now: never ours again


def test_foreign_code_dir_is_refused_untouched(tmp_path, held):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh/authorized_keys").write_text("ssh-ed25519 AAAA me\n")
    (home / "keepme").mkdir()
    (home / "keepme/sentinel").write_text("keep\n")
    os.chmod(home, 0o751)
    before = (tree(home), home.stat().st_mode)
    for code in (home, home / "keepme"):
        got = probe(code)
        assert got["code"]["problem"] == "foreign" and got["manifest"] == {}
        (line,) = sync.code_dir_problems({"node0": got["code"]}, "~")
        assert line.startswith(
            f"node0: code dir {code} (--code-dir ~) exists and was not made "
            "by ddpfleet; nothing in it was touched: pass a --code-dir"
        )
        # The sync itself refuses too, even when told to delete what is there.
        root = make_project(tmp_path / "proj")
        files = sync.project_files(root)
        change = sync.Change(tuple(files), (".ssh/authorized_keys", "keepme/sentinel"))
        r = node_call(["apply", str(code), RUN], tar_of(root, files, change))
        assert r.returncode == 1 and b"not made by ddpfleet; nothing was touched" in r.stderr
    assert (tree(home), home.stat().st_mode) == before


def test_an_unreadable_manifest_refuses_the_code_dir(tmp_path, held):
    root = make_project(tmp_path / "proj")
    code = tmp_path / "node" / "code"
    sync_once(root, code, held)
    (code / ".ddpfleet/manifest.json").write_text('{"paths": ["train.py"]}')
    found = probe(code)
    got = found["code"]
    assert got["problem"] == "error" and found["manifest"] == {}
    (line,) = sync.code_dir_problems({"node0": got}, "~/c")
    assert line == (
        f"node0: cannot use code dir {code} ({code}/.ddpfleet/manifest.json is not "
        "a ddpfleet manifest); fix that or pass another --code-dir"
    )
    assert (code / "train.py").exists()


def test_modes_are_kept_and_the_code_dir_is_private(tmp_path, held):
    root = make_project(tmp_path / "proj")
    (root / "secret.env").write_text("TOKEN=x\n")
    (root / "secret.env").chmod(0o600)
    (root / "shared.txt").write_text("x\n")
    (root / "shared.txt").chmod(0o664)
    code = tmp_path / "node" / "code"
    old_umask = os.umask(0o022)
    try:
        sync_once(root, code, held)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(code.stat().st_mode) == 0o700
    assert stat.S_IMODE((code / "secret.env").stat().st_mode) == 0o600
    assert stat.S_IMODE((code / "shared.txt").stat().st_mode) == 0o664
    assert stat.S_IMODE((code / "run.sh").stat().st_mode) == 0o755
    (root / "run.sh").chmod(0o700)  # a mode change alone is a change
    assert sync_once(root, code, held).send == ("run.sh",)
    assert stat.S_IMODE((code / "run.sh").stat().st_mode) == 0o700


def test_a_code_dir_in_use_is_refused_to_a_second_run(tmp_path, held):
    root = make_project(tmp_path / "proj")
    code = tmp_path / "node" / "code"
    assert held(code, "run-a")["problem"] is None
    second = probe(code)["code"]  # run B's runner, while run A's still holds the lock
    assert second["problem"] == "busy" and second["detail"] == "run-a"
    (line,) = sync.code_dir_problems({"node1": second}, "~/c")
    assert line == (
        f"node1: code dir {code} is in use by run run-a; wait for it to finish or "
        "pass another --code-dir"
    )
    files = sync.project_files(root)
    change = sync.diff(files, {})
    r = node_call(["apply", str(code), "run-b"], tar_of(root, files, change))
    assert r.returncode == 1 and b"is not locked by run run-b (holder: run-a)" in r.stderr
    assert sorted(p.name for p in code.iterdir()) == [".ddpfleet"]
    let_go()  # run A ends: nobody holds it, so nobody may sync into it
    r = node_call(["apply", str(code), "run-a"], tar_of(root, files, change))
    assert r.returncode == 1 and b"(holder: none)" in r.stderr
    assert probe(code)["code"]["problem"] is None  # free again for the next run


def test_the_sync_never_deletes_or_overwrites_what_it_did_not_put_there(tmp_path, held):
    root = make_project(tmp_path / "proj")
    code = tmp_path / "node" / "code"
    sync_once(root, code, held)
    (code / "results").mkdir()
    (code / "results/epoch1.pt").write_text("weights")
    (code / "notes").write_text("mine")
    before = tree(code)
    held(code)
    files = sync.project_files(root)
    # A controller asking to delete a path the mirror never sent is refused.
    r = node_call(["apply", str(code), RUN], tar_of(root, files, sync.Change((), ("notes",))))
    assert r.returncode == 1 and b"refusing to delete 'notes'" in r.stderr
    # The project now has a file where the run made a directory, or below a file it made.
    (root / "results").write_text("now a file\n")
    (root / "notes.d").mkdir()
    for rel, why in (
        ("results", "'results' is a directory holding files made on the node"),
        ("notes/x.py", "'notes' is a file or symlink made on the node"),
    ):
        if rel == "notes/x.py":
            (root / "results").unlink()
            shutil.move(root / "notes.d", root / "notes")
            (root / "notes/x.py").write_text("")
        files = sync.project_files(root)
        change = sync.diff(files, node_helper.manifest(str(code)))
        r = node_call(["apply", str(code), RUN], tar_of(root, files, change))
        assert r.returncode == 1, r.stderr
        assert f"cannot sync {rel!r}: {why}; nothing was touched".encode() in r.stderr
        assert tree(code) == before


def test_a_delete_never_goes_through_a_symlink_made_on_the_node(tmp_path, held):
    root = make_project(tmp_path / "proj")
    code = tmp_path / "node" / "code"
    sync_once(root, code, held)
    outside = tmp_path / "datasets"
    (outside).mkdir()
    (outside / "model.py").write_text("not code: a dataset file of the same name\n")
    shutil.rmtree(code / "pkg")
    (code / "pkg").symlink_to(outside)  # the run swapped a synced directory for a link
    (root / "pkg/model.py").unlink()
    sync_once(root, code, held)
    assert (outside / "model.py").read_text() == "not code: a dataset file of the same name\n"


def test_unsafe_tar_member_is_refused(tmp_path, held):
    import tarfile

    code = tmp_path / "code"
    held(code)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    for send in (["../escape.txt"], []):  # announced, or slipped into the tar unannounced
        listed = {rel: ["f", 0o644, "00"] for rel in send}
        head = json.dumps({"delete": [], "send": send, "manifest": listed}).encode() + b"\n"
        r = node_call(["apply", str(code), RUN], head + buf.getvalue())
        assert r.returncode != 0 and (b"unsafe path" in r.stderr or b"announced" in r.stderr)
        assert not (tmp_path / "escape.txt").exists()


def test_reused_run_id_is_refused_before_anything(tmp_path):
    run_dir = tmp_path / "logs" / "r1"
    launch.fresh_run_dir(run_dir)  # not there: fine
    launch.fresh_run_dir(run_dir, make=True)
    (run_dir / "node0.log").write_text("old run\n")
    for make in (False, True):
        with pytest.raises(
            PlanError,
            match=r"^--run-id r1 was used before \(.*logs/r1 exists\); "
            "pick a new --run-id",
        ):
            launch.fresh_run_dir(run_dir, make=make)
    assert (run_dir / "node0.log").read_text() == "old run\n"


@pytest.mark.parametrize("bad", ["", "  ", "~/a{b}", "~/{0}", "~/{"])
def test_code_dir_flag_is_checked(bad):
    with pytest.raises(PlanError, match=r"^--code-dir: give a path on the nodes"):
        launch.check_code_dir(bad)
    assert launch.check_code_dir("~/x/{cluster}/{{y}}") == "~/x/{cluster}/{{y}}"


def test_script_must_be_in_the_mirror(tmp_path):
    root = make_project(tmp_path / "proj")
    git(root, "init", "-q")
    files = sync.project_files(root)
    sync.require(files, "train.py", root)
    with pytest.raises(PlanError, match="not found in the synced project"):
        sync.require(files, "scripts/nope.py", root)
    with pytest.raises(PlanError, match="left out"):
        sync.require(files, "data/big.bin", root)
