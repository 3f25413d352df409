"""run_ctl.py's sweep, run here as the controller ships it (runctl.CTL_FILES on stdin): the one
environ sweep a detached SSH run's stop and a Slurm run's stop both make. Linux only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from ddpfleet.launch import sync
from ddpfleet.launch.ssh import runctl

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
