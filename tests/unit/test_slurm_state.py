"""ddpfleet.launch.slurm.state: what the nodes say about a detached Slurm run, folded (pure)."""

from __future__ import annotations

import subprocess

import pytest

from ddpfleet.launch.slurm import state as s

ENTRY = {"run_id": "r1", "nodes": ["node0", "node1"], "job_id": "42", "output_dir": "/l",
         "nproc": 2, "started": 100.0, "launcher": "slurm"}  # fmt: skip
RUNNING = {"JobId": "42", "JobState": "RUNNING", "Reason": "None", "NodeList": "node[0-1]",
           "ExitCode": "0:0"}  # fmt: skip
CRASH = (
    "0: [default0]:rank 0/4: first step",
    "1: [default1]:Traceback (most recent call last):",
    "1: [default1]:RuntimeError: injected failure at step 3",
    "0: [default1]:RuntimeError: Connection closed by peer",
    "1: torch.distributed.elastic.multiprocessing.api: failed (exitcode: 1) local_rank: 1",
    "srun: error: node1: task 1: Exited with exit code 1",
)


def says(job=None, record=None, tail=None) -> s.NodeSays:
    return s.NodeSays(job, record, tail)


def test_the_probe_asks_slurm_and_reads_the_record_and_the_outputs_tail(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho JobId=$4 JobState=RUNNING NodeList=node0\n")
    (fake / "scontrol").chmod(0o755)
    (tmp_path / "slurm-42.state").write_text("nodes node0 node1\n")
    (tmp_path / "slurm-42.out").write_text("0: hello\n" * 300 + "1: last\n")
    argv = s.probe_argv("42", str(tmp_path))
    got = subprocess.run(argv, env={"PATH": f"{fake}:/usr/bin:/bin"}, capture_output=True,
                         text=True).stdout  # fmt: skip
    node = s.parse_probe(got)
    assert node.job == {"JobId": "42", "JobState": "RUNNING", "NodeList": "node0"}
    assert node.record == "nodes node0 node1"
    assert node.tail is not None and len(node.tail) == s.TAIL_LINES and node.tail[-1] == "1: last"
    empty = s.parse_probe(subprocess.run(s.probe_argv("7", str(tmp_path / "none")),
                                         env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                                         text=True).stdout)  # fmt: skip
    assert empty == s.NodeSays(None, None, None)


@pytest.mark.parametrize(
    "job, record, tail, state, why",
    [
        (RUNNING, None, (), "RUNNING", "slurm job 42 running on node[0-1]"),
        ({**RUNNING, "JobState": "PENDING", "Reason": "Resources", "NodeList": "(null)"}, None,
         None, "RUNNING", "slurm job 42 pending waits: Resources"),
        ({**RUNNING, "JobState": "COMPLETED"}, "nodes node0 node1\nexit 0", (), "SUCCEEDED",
         "slurm job 42"),
        ({**RUNNING, "JobState": "CANCELLED"}, None, (), "STOPPED", "slurm job 42 cancelled"),
        ({**RUNNING, "JobState": "NODE_FAIL", "Reason": "NodeDown"}, None, (), "LOST",
         "slurm job 42 node_fail (NodeDown)"),
        ({**RUNNING, "JobState": "FAILED", "ExitCode": "1:0"}, "nodes node0 node1\nexit 1", CRASH,
         "FAILED", "node1 rank 3 failed first (slurm job 42 failed, exit 1)"),
        (None, "nodes node0 node1\nexit 0", (), "SUCCEEDED", "slurm job 42"),
        (None, "nodes node0 node1\nexit 1", CRASH, "FAILED",
         "node1 rank 3 failed first (slurm job 42 exit 1)"),
        (None, "nodes node0 node1", ("slurmstepd: error: *** JOB 42 ON node0 CANCELLED AT "
                                     "2026-11-30T08:00:00 ***",), "STOPPED",
         "slurm job 42 cancelled"),
        (None, "nodes node0 node1", ("0: step 1",), "LOST",
         "Slurm no longer knows slurm job 42 and no node has its exit"),
    ],
)  # fmt: skip
def test_fold_maps_slurm_and_the_nodes_files_to_one_state(job, record, tail, state, why):
    view = s.fold(ENTRY, {"node0": says(job, record, tail), "node1": says(job)})
    assert (view.state, view.why) == (state, why)
    assert view.nodes == ("node0", "node1") and view.started == 100.0
    if state == "FAILED":
        assert (view.failed_node, view.failed_rank) == ("node1", 3)


def test_an_unreachable_node_is_said_when_nothing_knows_the_job():
    view = s.fold(ENTRY, {"node0": "unreachable (timed out)", "node1": says()})
    assert view.state == "LOST" and "node0: unreachable (timed out)" in view.why


def test_blame_the_cause_not_the_echo_and_srun_without_a_traceback():
    assert s.blame(CRASH, ("node0", "node1"), 2) == ("node1", 3)
    killed = ("srun: error: node0: task 0: Killed", "0: agent stopping")
    assert s.blame(killed, ("node0", "node1"), 2) == ("node0", None)
    # the record's task order wins over the run's node order
    assert s.blame(CRASH, ("node1", "node0"), 2)[0] == "node0"


def test_the_index_keeps_slurm_runs_apart_from_the_supervisors_runs(tmp_path):
    from ddpfleet.launch.index import Index
    from ddpfleet.launch.ssh import runctl

    index = Index(tmp_path)
    index.add("ssh1", ["node0"])
    index.add("r1", ["node0", "node1"], launcher="slurm", job_id="42", output_dir="/l", nproc=2)
    assert [e["run_id"] for e in index.launched_by("slurm")] == ["r1"]
    assert index.entry("r1")["job_id"] == "42" and index.entry("nope") is None
    # the supervisors' fold never sees a Slurm run (it would call it LOST: no node records it)
    assert [v.run_id for v in runctl.views({"node0": {}}, index)] == ["ssh1"]
