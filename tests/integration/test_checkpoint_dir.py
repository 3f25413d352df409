"""The checkpoint contract on real sandbox nodes: every run's DDPFLEET_CHECKPOINT_DIR, and
`train --resume` through it (issue 22 item 3, issue 24 item 2).

What a user would check: what the ranks themselves see (the variable, the directory's owner
and mode, their cwd), what the plan printed, and what `--resume` put in the new run's dir.
The runs train as the default training user `train` (uid 2000), as on a real cluster.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import Cluster
from tests.integration.test_detach import RUNS, wait_state
from tests.integration.test_train import (  # noqa: F401 (the `ready` fixture)
    NODES,
    new_run_id,
    ready,
)

# Every rank: what it sees of the contract, as one JSON line.
SEE = """
import json, os, stat
d = os.environ["DDPFLEET_CHECKPOINT_DIR"]
st = os.stat(d)
print("sees " + json.dumps({"rank": int(os.environ["RANK"]), "dir": d, "uid": st.st_uid,
      "mode": oct(stat.S_IMODE(st.st_mode)), "cwd": os.getcwd()}), flush=True)
"""
# A new user's own script: its flag is --ckpt-dir, it follows the contract (step-<n>/ files,
# MANIFEST.json last) and resumes from the newest complete checkpoint in the variable's dir.
OWN = """
import argparse, hashlib, json, os, time
p = argparse.ArgumentParser()
p.add_argument("--ckpt-dir")
p.add_argument("--steps", type=int, default=3)
a = p.parse_args()
d = os.environ.get("DDPFLEET_CHECKPOINT_DIR") or a.ckpt_dir

def complete(path):
    try:
        with open(os.path.join(path, "MANIFEST.json")) as f:
            m = json.load(f)
        for name, digest in m["files"].items():
            with open(os.path.join(path, name), "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != digest:
                    return None
    except (OSError, ValueError, KeyError):
        return None
    return m

start = 0
for name in sorted(os.listdir(d), reverse=True):
    m = complete(os.path.join(d, name)) if name.startswith("step-") else None
    if m:
        start = m["step"]
        break
rank = int(os.environ["RANK"])
if os.environ["LOCAL_RANK"] == "0":  # the node's writer; the others may read after it wrote
    print(f"rank {rank}: starts after step {start}", flush=True)
for step in range(start + 1, a.steps + 1):
    if os.environ["LOCAL_RANK"] == "0":
        path = os.path.join(d, "step-%08d" % step)
        os.makedirs(path, exist_ok=True)
        data = json.dumps({"step": step}).encode()
        with open(os.path.join(path, "state.json"), "wb") as f:
            f.write(data)
        manifest = {"format": "ddpfleet.checkpoint/1", "step": step, "time": time.time(),
                    "world_size": int(os.environ["WORLD_SIZE"]),
                    "files": {"state.json": hashlib.sha256(data).hexdigest()}}
        with open(os.path.join(path, "MANIFEST.json.tmp"), "w") as f:
            json.dump(manifest, f)
        os.replace(os.path.join(path, "MANIFEST.json.tmp"), os.path.join(path, "MANIFEST.json"))
print(f"rank {rank}: done at step {a.steps}", flush=True)
"""


@pytest.fixture(scope="module")
def trains(ready: Cluster, tmp_path_factory) -> tuple[Cluster, Path, Path]:
    """The cluster with an inventory that trains as `train` (bootstrapped), and a project."""
    top = tmp_path_factory.mktemp("ckptdir")
    data = yaml.safe_load(ready.inventory.read_text())
    del data["train_user"]
    inventory = top / "inventory.yaml"
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    r = ready.invoke("bootstrap", "--roles", "train_user", inventory=inventory, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    project = top / "proj"
    project.mkdir()
    (project / "see.py").write_text(textwrap.dedent(SEE))
    (project / "own.py").write_text(textwrap.dedent(OWN))
    return ready, inventory, project


def train(trains, run_id: str, script: str, *extra: str):
    cluster, inventory, project = trains
    return cluster.invoke(
        "train", "--project-dir", str(project), "--script", script, "--nproc-per-node", "2",
        "--run-id", run_id, *extra, inventory=inventory, timeout=300,
    )  # fmt: skip


def seen(out: str) -> list[dict]:
    return [json.loads(m) for m in re.findall(r"sees (\{.*\})$", out, re.MULTILINE)]


def logs(trains, run_id: str) -> str:
    cluster, inventory, _ = trains
    r = cluster.invoke("logs", run_id, inventory=inventory, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def ended(trains, run_id: str) -> dict:
    # wait_state asks with the cluster's own inventory: the same nodes, root's view
    return wait_state(trains[0], run_id, ("SUCCEEDED", "FAILED", "STOPPED", "LOST"))


@pytest.mark.parametrize("how", ["attached", "detached"])
def test_every_rank_sees_its_runs_checkpoint_dir_the_users_and_0700(trains, how):
    run_id = new_run_id(f"see{how[0]}")
    r = train(trains, run_id, "see.py", *(["--detach"] if how == "detached" else []))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    want = f"{RUNS}/{run_id}/checkpoints"
    assert f"checkpoints: {want} (DDPFLEET_CHECKPOINT_DIR)" in r.stdout, r.stdout[-3000:]
    if how == "detached":
        # issue 24 item 2: the plan's cwd is where the ranks really run
        assert f"cwd: {RUNS}/{run_id}/code" in r.stdout, r.stdout[-3000:]
        assert ended(trains, run_id)["state"] == "SUCCEEDED"
        out = logs(trains, run_id)
    else:
        out = r.stdout
    ranks = seen(out)
    assert sorted(s["rank"] for s in ranks) == [0, 1, 2, 3], out[-3000:]
    for s in ranks:
        assert s["dir"] == want and s["uid"] == 2000 and s["mode"] == "0o700", s
        assert not s["dir"].startswith(s["cwd"].rstrip("/") + "/"), s  # not in the code
        if how == "detached":
            assert s["cwd"] == f"{RUNS}/{run_id}/code", s
    cluster = trains[0]
    for n in NODES:  # as root on the node: the run dir root's, the checkpoints the user's
        said = cluster.ssh(n, f"stat -c '%U %a' {RUNS}/{run_id} {want}").stdout.split("\n")
        assert said[:2] == ["root 755", "train 700"], (n, said)


def test_resume_tells_a_ckpt_dir_script_through_the_variable(trains):
    """Issue 24 item 2: a script whose flag is --ckpt-dir resumed (seen: "that run had no
    --checkpoint-dir in its --args"); only a COMPLETE checkpoint is copied, verified."""
    cluster, inventory, project = trains
    first = new_run_id("own")
    r = train(trains, first, "own.py", "--args", "--ckpt-dir out --steps 3", "--detach")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert ended(trains, first)["state"] == "SUCCEEDED"
    for n in NODES:  # a node died while writing step 4 there: no manifest
        cluster.ssh(n, f"cp -a {RUNS}/{first}/checkpoints/step-00000003 "
                       f"{RUNS}/{first}/checkpoints/step-00000004 && "
                       f"rm {RUNS}/{first}/checkpoints/step-00000004/MANIFEST.json")  # fmt: skip
    second = new_run_id("ownres")
    r = cluster.invoke("train", "--resume", first, "--run-id", second, "--nproc-per-node", "2",
                       "--project-dir", str(project), "--args", "--ckpt-dir out --steps 5",
                       inventory=inventory, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert (
        f"resume: run {first}'s newest complete checkpoint (verified) copied: step 3 on "
        "node0, node1" in r.stdout
    ), r.stdout[-3000:]
    assert ended(trains, second)["state"] == "SUCCEEDED"
    out = logs(trains, second)
    assert sorted(re.findall(r"rank (\d): starts after step 3$", out, re.MULTILINE)) == [
        "0",
        "2",
    ], out
    for n in NODES:
        listing = cluster.ssh(n, f"stat -c '%n %U' {RUNS}/{second}/checkpoints/*").stdout
        names = [line.split()[0].rsplit("/", 1)[1] for line in listing.splitlines()]
        assert names == ["step-00000003", "step-00000004", "step-00000005"], (n, listing)
        assert {line.split()[1] for line in listing.splitlines()} == {"train"}, listing


def test_resume_of_a_run_without_a_complete_checkpoint_starts_from_step_0(trains):
    cluster, inventory, project = trains
    first = new_run_id("none")
    r = train(trains, first, "own.py", "--args", "--steps 0", "--detach")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert ended(trains, first)["state"] == "SUCCEEDED"
    second = new_run_id("noneres")
    r = cluster.invoke("train", "--resume", first, "--run-id", second, "--nproc-per-node", "2",
                       "--project-dir", str(project), "--args", "--steps 1",
                       inventory=inventory, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    line = f"resume: run {first} has no complete checkpoint; the script starts from step 0"
    assert r.stdout.count(line) == 1, r.stdout[-3000:]
    assert ended(trains, second)["state"] == "SUCCEEDED"
    out = logs(trains, second)
    assert sorted(re.findall(r"rank (\d): starts after step 0$", out, re.MULTILINE)) == [
        "0",
        "2",
    ], out


def test_prune_keeps_checkpoints_unless_with_outputs(trains):
    """Issue 24 item 2: `runs --prune` never deletes checkpoints unless told, and says so."""
    cluster, inventory, _ = trains
    run_id = new_run_id("prune")
    r = train(trains, run_id, "own.py", "--args", "--steps 2", "--detach")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert ended(trains, run_id)["state"] == "SUCCEEDED"
    r = cluster.invoke("runs", "--prune", "--keep", "0", inventory=inventory, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "runs --prune --with-outputs removes them too" in r.stdout, r.stdout
    for n in NODES:
        left = cluster.ssh(n, f"ls {RUNS}/{run_id} {RUNS}/{run_id}/checkpoints").stdout.split()
        assert "step-00000002" in left and "spec.json" not in left and "code" not in left, left
    r = cluster.invoke("runs", "--prune", "--keep", "0", "--with-outputs", inventory=inventory,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    for n in NODES:
        assert cluster.ssh(n, f"test -e {RUNS}/{run_id} || echo gone").stdout.strip() == "gone"
