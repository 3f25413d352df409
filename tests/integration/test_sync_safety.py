"""The code sync of `invoke train` never destroys data, on real sandbox nodes.

What a run writes in its working directory (the code dir) survives every later sync, a
directory ddpfleet did not make is refused untouched, modes are kept, a run id is used once,
and a second run on a code dir in use is refused while the first finishes undisturbed. Each
test trains from its own small project (scripts/train_ddp.py and a few files, no git) with
2 nodes x 1 process and few steps.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import INVOKE, ROOT, Cluster
from tests.integration.test_train import ready  # noqa: F401 (the fixture)

NODES = ("node0", "node1")
TINY = "--epochs 1 --steps-per-epoch 2 --batch-size 4"
CODE = "/root/ddpfleet/sandbox/code"  # the code dir these tests name (the default is per project)


def new_run_id(what: str) -> str:
    return f"t-{what}-{uuid.uuid4().hex[:8]}"


def project(top: Path, **files: str) -> Path:
    """A project to sync: the example training script plus `files` (relative path: text)."""
    (top / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "train_ddp.py", top / "scripts" / "train_ddp.py")
    for rel, text in files.items():
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_text(text)
    return top


def train(
    cluster: Cluster, proj: Path, run_id: str, script_args: str, *extra: str, timeout: float = 600
) -> subprocess.CompletedProcess:
    return cluster.invoke(
        "train",
        "--project-dir",
        str(proj),
        "--nproc-per-node",
        "1",
        "--run-id",
        run_id,
        "--args",
        script_args,
        *extra,
        timeout=timeout,
    )


def on_all(cluster: Cluster, command: str) -> None:
    for node in NODES:
        r = cluster.ssh(node, command)
        assert r.returncode == 0, f"{node}: {command}: {r.stderr}"


def node_text(cluster: Cluster, node: str, command: str) -> str:
    r = cluster.ssh(node, command)
    assert r.returncode == 0, f"{node}: {command}: {r.stderr}"
    return r.stdout.strip()


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    return r.stdout


def refused(r: subprocess.CompletedProcess) -> str:
    """A refusal as the user sees it: exit 1, our error lines, no traceback, nothing started."""
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert "first step" not in r.stdout
    return r.stderr


def test_checkpoint_and_run_output_survive_the_next_sync(ready: Cluster, tmp_path: Path):
    on_all(ready, f"rm -rf {CODE}")
    proj = project(tmp_path / "proj", **{"extra.py": "X = 1\n", "pkg/util.py": "Y = 1\n"})
    ckpt = "--checkpoint-dir ckpt"  # under ddpfleet the run's DDPFLEET_CHECKPOINT_DIR wins
    first = new_run_id("ckpt1")
    ok(train(ready, proj, first, f"{TINY} {ckpt}", "--code-dir", CODE))
    saved = f"/var/lib/ddpfleet/runs/{first}/checkpoints/step-00000002/MANIFEST.json"
    assert node_text(ready, "node0", f"test -s {saved} && echo yes") == "yes"
    assert node_text(ready, "node0", f"test -e {CODE}/ckpt || echo none") == "none"
    # What a job writes relative to its cwd, on both nodes: outside the project, never synced.
    on_all(
        ready,
        f"mkdir -p {CODE}/outputs && echo mine > {CODE}/outputs/note.txt "
        f"&& echo mine > {CODE}/pkg/made-on-node.txt",
    )
    (proj / "extra.py").unlink()  # the project drops a file: the sync deletes that one only
    out = ok(
        train(
            ready,
            proj,
            new_run_id("ckpt2"),
            f"--epochs 2 --steps-per-epoch 2 --batch-size 4 {ckpt}",
            "--code-dir",
            CODE,
        )
    )
    assert re.search(r"^\[node0 r0\] epoch 2 loss ", out, re.MULTILINE), out
    assert re.search(r"code: node0 0 sent \([\d.]+ KiB\), 1 deleted;", out), out  # extra.py
    assert node_text(ready, "node0", f"test -s {saved} && echo yes") == "yes"  # untouched
    for node in NODES:
        assert (
            node_text(ready, node, f"cat {CODE}/outputs/note.txt {CODE}/pkg/made-on-node.txt")
            == "mine\nmine"
        )
        assert node_text(ready, node, f"test -e {CODE}/extra.py || echo gone") == "gone"


# Home's entries, its mode, and every file of ~/keepme and ~/.ssh with its mode and time.
LISTING = "ls -1A ~ && stat -c %a ~ && ls -lAn --time-style=+%s ~/keepme ~/.ssh"


@pytest.mark.parametrize("code_dir", ["~/keepme", "~"])
def test_existing_directory_as_code_dir_is_refused_untouched(
    ready: Cluster, tmp_path: Path, code_dir: str
):
    on_all(ready, "mkdir -p ~/keepme && echo keep > ~/keepme/sentinel")
    before = {n: node_text(ready, n, LISTING) for n in NODES}
    proj = project(tmp_path / "proj")
    run_id = new_run_id("foreign")
    err = refused(train(ready, proj, run_id, TINY, "--code-dir", code_dir))
    where = code_dir.replace("~", "/root")
    for node in NODES:
        line = (
            f"{node}: code dir {where} (--code-dir {code_dir}) exists and was not made by "
            "ddpfleet; nothing in it was touched: pass a --code-dir that does not exist yet"
        )
        assert line in err, err
        assert node_text(ready, node, "cat ~/keepme/sentinel") == "keep"
        # Still the same files, modes and times: authorized_keys too (this login proves it).
        assert node_text(ready, node, LISTING) == before[node]
    assert not (ready.dir / "logs" / run_id).exists()


def test_private_file_stays_private_on_the_nodes(ready: Cluster, tmp_path: Path):
    code = "/root/ddpfleet/sync-modes"
    on_all(ready, f"rm -rf {code}")
    proj = project(tmp_path / "proj", **{"secret.txt": "TOKEN=abc\n", "run.sh": "#!/bin/sh\n"})
    (proj / "secret.txt").chmod(0o600)
    (proj / "run.sh").chmod(0o750)
    ok(train(ready, proj, new_run_id("modes"), TINY, "--code-dir", code))
    for node in NODES:
        modes = node_text(ready, node, f"stat -c '%a %n' {code} {code}/secret.txt {code}/run.sh")
        assert modes.splitlines() == [f"700 {code}", f"600 {code}/secret.txt", f"750 {code}/run.sh"]
        other = ready.ssh(node, f"su -s /bin/sh nobody -c 'cat {code}/secret.txt'")
        assert other.returncode != 0 and "TOKEN" not in other.stdout


def test_reused_run_id_is_refused_and_old_logs_stay(ready: Cluster, tmp_path: Path):
    proj = project(tmp_path / "proj")
    run_id = new_run_id("again")
    ok(train(ready, proj, run_id, TINY))
    logs = ready.dir / "logs" / run_id
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in logs.iterdir()}
    assert "node0-rank0.stdout.log" in before
    err = refused(train(ready, proj, run_id, TINY))
    assert f"--run-id {run_id} was used before ({logs} exists); pick a new --run-id" in err
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in logs.iterdir()} == before
    # Another controller (here: its logs moved away) reusing it is refused by the nodes.
    moved = logs.with_name(run_id + ".moved")
    logs.rename(moved)
    try:
        err = refused(train(ready, proj, run_id, TINY))
    finally:
        if logs.exists():
            shutil.rmtree(logs)
        moved.rename(logs)
    for node in NODES:
        assert (
            f"{node}: --run-id {run_id} was used before (/root/ddpfleet/sandbox/runs/"
            f"{run_id} exists); pick a new --run-id"
        ) in err, err
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in logs.iterdir()} == before


def wait_for(path: Path, pattern: str, proc: subprocess.Popen, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(re.findall(pattern, path.read_text(), re.MULTILINE)) >= count:
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    pytest.fail(f"no {count} x {pattern!r}; output:\n{path.read_text()[-4000:]}")


def test_second_run_on_a_code_dir_in_use_is_refused(ready: Cluster, tmp_path: Path):
    code = "/root/ddpfleet/sync-busy"
    on_all(ready, f"rm -rf {code}")
    first = project(tmp_path / "a", **{"which.txt": "a\n"})
    second = project(tmp_path / "b", **{"which.txt": "b\n", "b_only.txt": "b\n"})
    run_a, run_b = new_run_id("busy-a"), new_run_id("busy-b")
    out_a = tmp_path / "a.out"
    with out_a.open("w") as sink:
        proc = subprocess.Popen(
            [
                *INVOKE,
                "train",
                "--project-dir",
                str(first),
                "--nproc-per-node",
                "1",
                "--run-id",
                run_a,
                "--code-dir",
                code,
                "--args",
                "--epochs 1 --steps-per-epoch 300 --batch-size 4 --step-sleep 0.1",
            ],
            cwd=ready.dir,
            env=ready.env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        wait_for(out_a, r"\] rank \d/2: first step", proc, count=2, timeout=300)
        err = refused(
            train(
                ready,
                second,
                run_b,
                TINY,
                "--code-dir",
                code,
                "--master-port",
                "29741",
                timeout=300,
            )
        )
        assert proc.poll() is None, "run A ended before run B was refused: make A longer"
        for node in NODES:
            assert f"{node}: code dir {code} is in use by run {run_a}; wait for it" in err, err
            assert (
                node_text(
                    ready, node, f"cat {code}/which.txt; test -e {code}/b_only.txt || echo absent"
                )
                == "a\nabsent"
            )
        assert proc.wait(timeout=300) == 0, out_a.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert (
        len(re.findall(r"^\[node\d r\d\] rank \d checksum ", out_a.read_text(), re.MULTILINE)) == 2
    )
    assert not (ready.dir / "logs" / run_b).exists()
    # Run A is over: its lock went with it, and the next run may use the code dir.
    ok(train(ready, second, new_run_id("busy-c"), TINY, "--code-dir", code))


def test_no_secret_of_an_inventory_in_the_project_reaches_a_node(ready: Cluster, tmp_path: Path):
    """The review's #4 repro: the inventory in <proj>/cluster/ (examples/gpu-cluster.yaml's
    shape) with its .ddpfleet/ (cluster CA, munge key), and the SSH key, known_hosts and a sudo
    password file it names inside the project: none of it is under the nodes' code dir, while
    the rest of cluster/ is."""
    proj = project(tmp_path / "proj", **{"cluster/notes.md": "synced\n"})
    data = ready.data
    (proj / "keys").mkdir()
    shutil.copy2(data["ssh"]["key"], proj / "keys" / "id_ed25519")
    shutil.copy2(data["ssh"]["known_hosts"], proj / "cluster" / "known_hosts")
    state = proj / "cluster" / ".ddpfleet"  # as an older ddpfleet left it: no .gitignore
    (state / "slurm").mkdir(parents=True)
    (state / "cluster_ca").write_text("-----BEGIN OPENSSH PRIVATE KEY----- (CA)\n")
    (state / "slurm" / "munge.key").write_bytes(b"M" * 1024)
    (proj / "cluster" / "sudo.pw").write_text("hunter2\n")
    for secret in (state / "cluster_ca", state / "slurm" / "munge.key", proj / "cluster/sudo.pw"):
        secret.chmod(0o600)
    data["ssh"].update(
        key="../keys/id_ed25519", known_hosts="known_hosts", become_password_file="sudo.pw"
    )
    inventory = proj / "cluster" / "inventory.yaml"
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    code = "/root/ddpfleet/sync-secrets"
    on_all(ready, f"rm -rf {code}")
    run_id = new_run_id("secrets")
    ok(train(ready, proj, run_id, TINY, "--code-dir", code, "--inventory", str(inventory)))
    for node in NODES:
        # everything the mirror holds, but its own manifest dir at the top
        listing = node_text(ready, node, f"cd {code} && find . -path ./.ddpfleet -prune -o -print")
        paths = {p.removeprefix("./") for p in listing.split()}
        assert {"cluster/notes.md", "cluster/inventory.yaml", "scripts/train_ddp.py"} <= paths
        leaked = [
            p
            for p in paths
            if ".ddpfleet" in p.split("/")
            or p.startswith(("keys/id_ed25519", "cluster/logs"))
            or p in ("cluster/known_hosts", "cluster/sudo.pw")
        ]
        assert not leaked, f"{node}: {leaked}"
        grep = ready.ssh(node, f"grep -rl -e 'BEGIN OPENSSH' -e hunter2 -e MMMMMMMM {code}")
        assert grep.stdout.strip() == "", f"{node}: {grep.stdout}"
    assert (proj / "cluster" / "logs" / run_id).is_dir()  # the run's logs, beside the inventory


def test_two_projects_on_one_cluster_keep_a_code_dir_each(ready: Cluster, tmp_path: Path):
    """Issue 24 item 6: switching projects resent everything and deleted the other project's
    files ("1 sent, 239 deleted"). Each project dir has its own code dir (its name and a hash
    of its path), so the first project's files are still there and its next sync sends none."""
    files = {f"pkg/m{i}.py": f"M = {i}\n" for i in range(5)}
    mine = project(tmp_path / "one" / "mytrain", **files)
    other = project(tmp_path / "two" / "mytrain", **{"other.py": "O = 1\n"})  # the same name
    ok(train(ready, mine, new_run_id("proj-a1"), TINY))
    out_b = ok(train(ready, other, new_run_id("proj-b"), TINY))
    assert re.search(r"code: node0 \d+ sent \([\d.]+ KiB\), 0 deleted;", out_b), out_b
    out_a = ok(train(ready, mine, new_run_id("proj-a2"), TINY))
    assert "code: node0 unchanged; node1 unchanged" in out_a, out_a
    code_a, code_b = (re.search(r"^cwd: (\S+)$", o, re.M).group(1) for o in (out_a, out_b))
    assert code_a != code_b and re.fullmatch(
        r"/root/ddpfleet/sandbox/mytrain-[0-9a-f]{8}/code", code_a
    )
    for node in NODES:
        assert node_text(ready, node, f"cat {code_a}/pkg/m4.py {code_b}/other.py") == "M = 4\nO = 1"
        assert node_text(ready, node, f"test -e {code_a}/other.py || echo apart") == "apart"
