"""run_ctl.py's sweep, run here as the controller ships it (runctl.CTL_FILES on stdin): the one
environ sweep a detached SSH run's stop and a Slurm run's stop both make; and each node
program's helper list against what the controller ships. Linux only."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import uuid

import pytest

from ddpfleet.launch import RUNNER_FILES, sync
from ddpfleet.launch.ssh import runctl
from ddpfleet.launch.ssh.detach import SUPERVISOR_FILES
from ddpfleet.node import NODE_DIR

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/*/environ")


def ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        sync.helper_command(sys.executable, runctl.CTL, *args),
        shell=True,
        input=sync.helper_sources(runctl.CTL_FILES),
        capture_output=True,
        timeout=30,
        check=False,
    )


def sleeper(**env: str) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items() if k not in ("DDPFLEET_RUN_ID", "SLURM_JOB_ID")}
    return subprocess.Popen(["sleep", "60"], env={**clean, **env})


def test_the_sweep_finds_whole_entries_only_and_kills_what_it_found():
    run, job = f"r{uuid.uuid4().hex[:8]}", str(os.getpid() + 1000000)
    marked = [sleeper(DDPFLEET_RUN_ID=run), sleeper(SLURM_JOB_ID=job)]
    others = [sleeper(DDPFLEET_RUN_ID=run + "x"), sleeper(SLURM_JOB_ID=job[:-1]), sleeper()]
    marks = (f"SLURM_JOB_ID={job}", f"DDPFLEET_RUN_ID={run}")
    try:
        r = ctl("sweep", "0", *marks)
        assert r.returncode == 0, r.stderr
        assert sorted(json.loads(r.stdout)) == sorted(p.pid for p in marked)
        assert all(p.poll() is None for p in marked)  # only listed: KILL was 0
        r = ctl("sweep", "1", *marks)
        assert sorted(json.loads(r.stdout)) == sorted(p.pid for p in marked)
        assert [p.wait(timeout=10) for p in marked] == [-9, -9]
        assert all(p.poll() is None for p in others)
        assert json.loads(ctl("sweep", "1", *marks).stdout) == []
    finally:
        for p in marked + others:
            p.kill()
            p.wait()


def test_list_with_no_run_of_that_id_is_an_empty_document():
    """run_ctl loads its helpers (records, proctree, part) before it does anything."""
    r = ctl("list", f"no-such-run-{uuid.uuid4().hex[:8]}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {}


@pytest.mark.parametrize(
    "files",
    [runctl.CTL_FILES, RUNNER_FILES, SUPERVISOR_FILES],
    ids=["run_ctl", "gang_runner", "run_supervisor"],
)
def test_each_program_loads_the_helpers_the_controller_ships_in_that_order(files):
    """The wire carries no names: a program reads its helpers in the order it expects them."""
    tree = ast.parse((NODE_DIR / files[0]).read_text())
    listed = next(
        (
            [e.value for e in node.value.elts]
            for node in tree.body
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "HELPERS"
        ),
        None,
    )
    if listed is None:  # loaded one call at a time
        calls = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "load_helper"
        ]
        listed = [c.args[0].value for c in sorted(calls, key=lambda c: (c.lineno, c.col_offset))]
    assert tuple(listed) == tuple(files[1:])


def load(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name[:-3], NODE_DIR / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def runs_root(tmp_path, monkeypatch):
    """run_ctl with its helpers loaded and RUNS in tmp_path (not the host's /var/lib)."""
    ctl_module = load("run_ctl.py")
    for name in ctl_module.HELPERS:
        setattr(ctl_module.m, name[:-3], load(name))
    monkeypatch.setattr(ctl_module.m.records, "RUNS", str(tmp_path))
    return ctl_module, tmp_path


def a_run(root, run_id, started, records=True, checkpoint=True):
    d = root / run_id
    d.mkdir()
    if records:
        (d / "code").mkdir()
        (d / "spec.json").write_text("{}")
        (d / "state.json").write_text(json.dumps({"status": "SUCCEEDED", "started": started}))
        (d / "node.log").write_text("log\n")
    (d / "checkpoints").mkdir()
    if checkpoint:
        (d / "checkpoints" / "step-00000004").mkdir()
        (d / "checkpoints" / "step-00000004" / "MANIFEST.json").write_text("{}")
    os.utime(d / "checkpoints", (started, started))


def test_prune_keeps_checkpoints_unless_told_and_says_which(runs_root):
    """Issue 24 item 2: `runs --prune` never deletes checkpoints unless --with-outputs."""
    ctl_module, root = runs_root
    a_run(root, "old", 100)
    a_run(root, "empty", 150, checkpoint=False)
    a_run(root, "attached", 200, records=False)  # an attached run: its checkpoints only
    a_run(root, "new", 300)
    said = ctl_module.prune(1)
    assert said == {"removed": ["empty", "old"], "kept": ["attached", "old"]}
    assert sorted(os.listdir(root)) == ["attached", "new", "old"]
    assert os.listdir(root / "old") == ["checkpoints"]
    assert os.listdir(root / "old" / "checkpoints") == ["step-00000004"]
    assert sorted(os.listdir(root / "new")) == ["checkpoints", "code", "node.log", "spec.json",
                                                 "state.json"]  # fmt: skip
    # the records went: it is no run for `invoke runs` any more, its checkpoints stay
    assert not ctl_module.recorded("old") and ctl_module.recorded("new")
    said = ctl_module.prune(1, with_outputs=True)
    assert said == {"removed": ["attached", "old"], "kept": []}
    assert os.listdir(root) == ["new"]


def test_prune_leaves_a_run_whose_processes_still_run(runs_root):
    ctl_module, root = runs_root
    run = f"live{uuid.uuid4().hex[:8]}"
    a_run(root, run, 100, records=False)
    a_run(root, "new", 300)
    live = sleeper(DDPFLEET_RUN_ID=run)  # an attached run's rank: no supervisor records it
    try:
        assert ctl_module.prune(0, with_outputs=True)["removed"] == ["new"]
        assert os.listdir(root) == [run]
    finally:
        live.kill()
        live.wait()


def test_resume_answers_the_spec_without_its_secret_and_the_record_in_one_call(
    runs_root, capsys, monkeypatch
):
    """train --resume asks each node once: the spec (the lifeline's secret stays on the node)
    and the run's record as `list` gives it; a node without the run answers nothing of it."""
    ctl_module, root = runs_root
    a_run(root, "r", 100)
    (root / "r" / "spec.json").write_text(json.dumps({"meta": {"nodes": ["node0"]},
                                                      "lifeline_secret": "s3"}))  # fmt: skip
    # main() loads its helpers through the loader it runs under: here, the ones loaded already
    loaded = lambda name: getattr(ctl_module.m, name[:-3])  # noqa: E731
    monkeypatch.setattr(ctl_module, "load_helper", loaded, raising=False)
    ctl_module.main(["resume", "r"])
    said = json.loads(capsys.readouterr().out)
    assert said["spec"] == {"meta": {"nodes": ["node0"]}}
    assert said["runs"]["r"]["status"] == "SUCCEEDED" and said["runs"]["r"]["meta"]["nodes"]
    ctl_module.main(["resume", "other"])
    assert json.loads(capsys.readouterr().out) == {"spec": None, "runs": {}}
