"""A pending Slurm job's code dir (issue 24 item 6): reserved from the run's preflight until its
tasks hold the lock; an SSH run's claim refuses it while Slurm has the job, and removes it once
Slurm has no such job (node_helper.reserved)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from ddpfleet.launch import sync
from ddpfleet.launch.slurm.run import RESERVE_SH
from ddpfleet.node import node_helper

SQUEUE = '#!/bin/sh\n[ "$*" = "-h -n ddpfleet-slurm1 -t all -o %i %T" ] || exit 9\n'


@pytest.fixture
def code(tmp_path, monkeypatch):
    """A code dir as claim makes it, reserved for run slurm1 as the controller reserves it, and
    a fake squeue first on PATH (`answer`: its script after the argv check)."""
    root = tmp_path / "code"
    assert node_helper.claim(str(root), "earlier")["problem"] is None
    node_helper.release()
    path = root / ".ddpfleet" / "slurm-run"
    subprocess.run(["sh", "-c", RESERVE_SH, "sh", str(path), "slurm1"], check=True)
    assert path.read_text() == "slurm1\n" and oct(path.stat().st_mode & 0o777) == "0o600"
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))  # a node with Slurm
    yield root
    node_helper.release()


def squeue(root, answer: str) -> None:
    fake = root.parent / "bin" / "squeue"
    fake.write_text(SQUEUE + answer + "\n")
    fake.chmod(0o755)


def claim(root) -> dict:
    got = node_helper.claim(str(root), "sshrun")
    node_helper.release()
    return got


def test_a_pending_job_refuses_an_ssh_run_one_line_naming_job_run_and_node(code):
    squeue(code, "echo '7 PENDING'")
    got = claim(code)
    assert got["problem"] == "reserved"
    assert got["job"] == {"run_id": "slurm1", "job_id": "7", "state": "PENDING"}
    (line,) = sync.code_dir_problems({"node1": got}, "~")
    assert line == (
        f"node1: slurm job 7 (ddpfleet run slurm1) is pending and will run in code dir {code}; "
        "wait for it to end, stop it (invoke stop slurm1) or leave node1 out (--exclude node1)"
    )
    assert (code / ".ddpfleet" / "slurm-run").exists()
    lock = code / ".ddpfleet" / "lock"
    assert subprocess.run(["flock", "-n", "-x", str(lock), "true"]).returncode == 0  # let go
    assert lock.read_text() == "earlier"  # the refused claim wrote nothing


def test_a_job_that_ended_or_slurm_forgot_leaves_no_reservation(code):
    for ended in ("COMPLETED", "CANCELLED", "FAILED"):  # at once: sbatch had answered
        squeue(code, f"echo '7 {ended}'")
        (code / ".ddpfleet" / "slurm-run").write_text("slurm1\n")
        assert claim(code)["problem"] is None, ended
        assert not (code / ".ddpfleet" / "slurm-run").exists()
    squeue(code, "exit 0")  # forgotten (MinJobAge), or sbatch failed long ago
    (code / ".ddpfleet" / "slurm-run").write_text("slurm1\n")
    old = time.time() - node_helper.SUBMIT_GRACE_S - 1
    os.utime(code / ".ddpfleet" / "slurm-run", (old, old))
    assert claim(code)["problem"] is None
    assert not (code / ".ddpfleet" / "slurm-run").exists()


def test_while_sbatch_has_not_answered_the_reservation_holds(code):
    squeue(code, "exit 0")
    got = claim(code)
    assert got["problem"] == "reserved" and got["job"]["state"] == "being submitted"
    (line,) = sync.code_dir_problems({"node0": got}, "~")
    assert line.startswith("node0: a slurm job (ddpfleet run slurm1) is being submitted and ")


def test_a_squeue_that_cannot_say_keeps_the_reservation(code):
    squeue(code, "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2; exit 1")
    old = time.time() - node_helper.SUBMIT_GRACE_S - 1
    os.utime(code / ".ddpfleet" / "slurm-run", (old, old))
    got = claim(code)
    assert got["problem"] == "reserved"
    assert got["job"]["state"] == (
        "unknown (squeue: slurm_load_jobs error: Unable to contact slurm controller)"
    )


def test_a_node_without_slurm_drops_a_stale_reservation(code, monkeypatch):
    monkeypatch.setenv("PATH", str(code.parent / "bin"))  # no squeue there
    old = time.time() - node_helper.SUBMIT_GRACE_S - 1
    os.utime(code / ".ddpfleet" / "slurm-run", (old, old))
    assert claim(code)["problem"] is None
    assert not (code / ".ddpfleet" / "slurm-run").exists()
