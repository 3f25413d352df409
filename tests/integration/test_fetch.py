"""`invoke fetch RUN` on real sandbox nodes (issue 24 item 3): a run's checkpoints home with
their modes, only what changed, an interrupted fetch resumed, never a path or a symlink out of
the run's directory.

The files are planted the way a run leaves them (the checkpoint contract: the run dir root's,
0755; checkpoints/ the training user's, 0700), here with `www-data` as the training user so no
bootstrap is needed and reading as that user, not root, shows.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import INVOKE, Cluster

RUNS = "/var/lib/ddpfleet/runs"
USER = "www-data"


@pytest.fixture
def project(cluster: Cluster, tmp_path: Path) -> Path:
    """An inventory of the session's sandbox whose training user is www-data, in its own dir
    (so its runs index and runs/ are this test's)."""
    data = yaml.safe_load(cluster.inventory.read_text())
    data["train_user"] = {"name": USER, "uid": 33, "gid": 33}
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    return inventory


def fetch(cluster: Cluster, inventory: Path, *args: str) -> subprocess.CompletedProcess:
    return cluster.invoke("fetch", *args, inventory=inventory, timeout=300)


def plant(cluster: Cluster, node: str, run_id: str, script: str) -> None:
    """The run's dirs as a run leaves them, then `script` in checkpoints/ as the training user."""
    d = f"{RUNS}/{run_id}"
    setup = (
        f"set -e; mkdir -p -m 0755 {d}; mkdir -m 0700 {d}/checkpoints; "
        f"chown {USER}: {d}/checkpoints; cd {d}/checkpoints; "
        f"setpriv --reuid 33 --regid 33 --clear-groups sh -ec {shlex.quote(script)}"
    )
    r = cluster.ssh(node, setup, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def node_sha(cluster: Cluster, node: str, path: str) -> str:
    return cluster.ssh(node, f"sha256sum {shlex.quote(path)}").stdout.split()[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def new_run() -> str:
    return f"f-{uuid.uuid4().hex[:8]}"


CHECKPOINT = """
mkdir -m 0750 step-00000010
head -c 3145728 /dev/urandom > step-00000010/model.bin; chmod 0640 step-00000010/model.bin
echo '{"format": "ddpfleet.checkpoint/1", "step": 10}' > step-00000010/MANIFEST.json
chmod 0600 step-00000010/MANIFEST.json
printf '#!/bin/sh\\necho %s\\n' "$(hostname)" > run.sh; chmod 0750 run.sh
ln -s step-00000010 latest
"""


def test_fetch_brings_modes_then_only_what_changed(cluster: Cluster, project: Path):
    run_id = new_run()
    for n in ("node0", "node1"):
        plant(cluster, n, run_id, CHECKPOINT)
    # the index says the run's first node is node1: the default copy comes from there
    index = project.parent / ".ddpfleet" / "runs.jsonl"
    index.parent.mkdir()
    index.write_text(json.dumps({"run_id": run_id, "nodes": ["node1", "node0"]}) + "\n")
    r = fetch(cluster, project, run_id)
    assert r.returncode == 0, r.stdout + r.stderr
    home = project.parent / "runs" / run_id / "checkpoints"
    assert re.search(rf"node1\s.*4 files, 3\.0 MiB into runs/{run_id}/checkpoints", r.stdout), (
        r.stdout
    )
    remote = f"{RUNS}/{run_id}/checkpoints"
    for rel, mode in (("step-00000010/model.bin", 0o640), ("step-00000010/MANIFEST.json", 0o600),
                      ("run.sh", 0o750), ("step-00000010", 0o750), (".", 0o700)):  # fmt: skip
        local = home / rel
        assert stat.S_IMODE(local.stat().st_mode) == mode, (rel, oct(local.stat().st_mode))
        if local.is_file():
            assert sha(local) == node_sha(cluster, "node1", f"{remote}/{rel}"), rel
    assert (home / "latest").is_symlink() and os.readlink(home / "latest") == "step-00000010"
    node_mtime = cluster.ssh("node1", f"stat -c %Y {remote}/run.sh").stdout.strip()
    assert int((home / "run.sh").stat().st_mtime) == int(node_mtime)
    before = {p: p.stat().st_mtime_ns for p in home.rglob("*") if p.is_file()}
    # a second fetch moves nothing
    again = fetch(cluster, project, run_id)
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.search(r"0 files, 0 B into .* \(4 unchanged\)", again.stdout), again.stdout
    assert {p: p.stat().st_mtime_ns for p in home.rglob("*") if p.is_file()} == before
    assert not list(home.rglob("*.part"))
    # one file changed on the node: only that one comes
    cluster.ssh("node1", f"echo more >> {remote}/run.sh")
    third = fetch(cluster, project, run_id)
    assert re.search(r"1 file, \d+ B into .* \(3 unchanged\)", third.stdout), third.stdout
    assert sha(home / "run.sh") == node_sha(cluster, "node1", f"{remote}/run.sh")
    # every node's copy, each into its own dir
    each = fetch(cluster, project, run_id, "--node", "all")
    assert each.returncode == 0, each.stdout + each.stderr
    for n in ("node0", "node1"):
        script = project.parent / "runs" / run_id / n / "checkpoints" / "run.sh"
        assert sha(script) == node_sha(cluster, n, f"{remote}/run.sh"), n


def test_an_interrupted_fetch_resumes(cluster: Cluster, project: Path):
    run_id = new_run()
    plant(cluster, "node0", run_id, "head -c 268435456 /dev/urandom > big.bin")
    home = project.parent / "runs" / run_id / "checkpoints"
    part = home / "big.bin.part"
    env = cluster.env(DDPFLEET_INVENTORY=str(project))
    proc = subprocess.Popen([*INVOKE, "fetch", run_id], cwd=cluster.dir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (part.exists() and part.stat().st_size > 16 << 20):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no .part growing within 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err, (proc.returncode, out, err)
    assert not (home / "big.bin").exists()
    had = part.stat().st_size
    assert 16 << 20 < had < 256 << 20, had
    r = fetch(cluster, project, run_id)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"1 file, ([\d.]+) MiB into .*resumed big\.bin at ([\d.]+) MiB", r.stdout)
    assert m, r.stdout
    assert float(m.group(1)) + float(m.group(2)) == pytest.approx(256, abs=0.2)
    assert sha(home / "big.bin") == node_sha(
        cluster, "node0", f"{RUNS}/{run_id}/checkpoints/big.bin"
    )
    assert not part.exists()
    print(f"\nFIGURE fetch interrupted at {had / 2**20:.0f} MiB of 256, resumed from there")


def test_fetch_never_leaves_the_run_dir(cluster: Cluster, project: Path):
    run_id = new_run()
    plant(cluster, "node0", run_id, "echo w > weights.pt; ln -s /etc evil; ln -s ../.. up")
    secret = f"{RUNS}/{run_id}/checkpoints/root-only"
    cluster.ssh("node0", f"echo s > {secret}; chmod 0600 {secret}")  # root's: not the user's
    for path in ("../spec.json", "/etc", "checkpoints/../../other", "checkpoints/evil"):
        r = fetch(cluster, project, run_id, "--path", path)
        assert r.returncode == 1, (path, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (path, r.stderr)
        assert "outside" in lines[0] and "Traceback" not in r.stderr, (path, r.stderr)
    # inside PATH: the links out are refused and the root-only file is not read (the
    # training user reads), one line each; the rest comes
    r = fetch(cluster, project, run_id)
    assert r.returncode == 1, r.stdout + r.stderr
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 3, r.stderr
    assert any("evil -> /etc: a symlink out of" in e for e in errors), errors
    assert any("up -> ../..: a symlink out of" in e for e in errors), errors
    assert any("root-only: permission denied" in e for e in errors), errors
    home = project.parent / "runs" / run_id / "checkpoints"
    assert (home / "weights.pt").read_text() == "w\n"
    assert sorted(p.name for p in home.iterdir()) == ["weights.pt"]
    # an absolute PATH inside the run dir is the same PATH
    r = fetch(cluster, project, run_id, "--path", f"{RUNS}/{run_id}/checkpoints/weights.pt")
    assert r.returncode == 0 and "1 unchanged" in r.stdout, r.stdout + r.stderr
