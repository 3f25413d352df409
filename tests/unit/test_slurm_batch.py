"""ddpfleet.launch.slurm.batch: the plan as a batch script, the job's output read back (pure)."""

from __future__ import annotations

import os
import pwd
import shlex
import subprocess
import time
from dataclasses import replace
from types import MappingProxyType

import pytest

from ddpfleet.errors import PlanError
from ddpfleet.launch.plan import NodePlan, Plan
from ddpfleet.launch.slurm import batch as b
from ddpfleet.ssh import become


def argv(rank: int) -> tuple[str, ...]:
    return (
        "/opt/v/bin/python", "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
        str(rank), "--master-addr", "10.0.0.10", "--master-port", "29500", "--nproc-per-node",
        "2", "--rdzv-id", "run1", "--log-dir", "/root/l/run1", "--tee", "3",
        "scripts/train_ddp.py", "--name", "it's",
    )  # fmt: skip


def node(name: str, rank: int, ifname: str) -> NodePlan:
    env = {"DDPFLEET_RUN_ID": "run1", "TOKEN": "s3cret value", "GLOO_SOCKET_IFNAME": ifname}
    return NodePlan(name, rank, f"10.0.0.1{rank}", argv(rank), MappingProxyType(env), "/c", "/l")


PLAN = Plan("run1", "node0", "10.0.0.10", 29500, 2, "scripts/train_ddp.py",
            (node("node0", 0, "eth0"), node("node1", 1, "eth1")))  # fmt: skip


def test_torchrun_swaps_the_static_rendezvous_for_c10d():
    line = b.torchrun_argv(PLAN.nodes[1], "10.0.0.10:29500")
    assert "--node-rank" not in line and "--master-addr" not in line
    assert "--rdzv-id run1" not in line
    assert '--nnodes "$SLURM_NNODES" --rdzv-backend c10d --rdzv-id "$SLURM_JOB_ID"' in line
    assert line.endswith(
        "--rdzv-endpoint 10.0.0.10:29500 --nproc-per-node 2 --log-dir /root/l/run1 --tee 3 "
        "scripts/train_ddp.py --name 'it'\"'\"'s'"
    )


def test_shared_env_goes_into_the_script_and_only_per_node_values_onto_the_task_line():
    common, own = b.split_env(PLAN)
    assert common == {"DDPFLEET_RUN_ID": "run1", "TOKEN": "s3cret value"}
    assert own == {"node0": {"GLOO_SOCKET_IFNAME": "eth0"}, "node1": {"GLOO_SOCKET_IFNAME": "eth1"}}
    script = b.batch_script(PLAN)
    assert script.startswith(
        "#!/bin/sh\nexport DDPFLEET_RUN_ID=run1\nexport 'TOKEN=s3cret value'\n"
    )
    srun = shlex.split(script[script.index("\nsrun ") :].split("\nrc=$?")[0])
    assert srun[:5] == [
        "srun",
        "--kill-on-bad-exit=1",
        "--label",
        "--ntasks-per-node=1",
        "--wait=30",
    ]
    assert "s3cret" not in srun[-1]  # the task's command line (ps) has no --env value


def code_dir(tmp_path):
    """A code dir as node_helper.claim leaves it: .ddpfleet/lock beside the mirror."""
    code = tmp_path / "code"
    (code / ".ddpfleet").mkdir(parents=True)
    (code / ".ddpfleet" / "lock").write_text("")
    return code


def test_each_task_runs_its_own_nodes_line(tmp_path):
    task = b.task_script(PLAN, b.split_env(PLAN)[1])
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text('#!/bin/sh\necho "$GLOO_SOCKET_IFNAME $*"\n')
    (fake / "python").chmod(0o755)
    code = code_dir(tmp_path)
    task = task.replace("/opt/v/bin/python", str(fake / "python")).replace("cd /c", f"cd {code}")
    env = {"PATH": "/usr/bin:/bin", "SLURMD_NODENAME": "node1", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "42"}  # fmt: skip
    out = subprocess.run(["sh", "-c", task], env=env, capture_output=True, text=True).stdout
    assert out.startswith("eth1 -m torch.distributed.run --nnodes 2 --rdzv-backend c10d ")
    assert "--rdzv-id 42 " in out and out.strip().endswith("--name it's")
    env["SLURMD_NODENAME"] = "node9"
    r = subprocess.run(["sh", "-c", task], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "no plan for node node9" in r.stderr


def test_a_task_holds_the_code_dirs_lock_while_torchrun_runs_and_a_held_one_refuses(tmp_path):
    """Issue 24 item 6: a Slurm run holds the code dir's lock like an SSH run's runner."""
    code = code_dir(tmp_path)
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nsleep 2\n")
    fake.chmod(0o755)
    task = b.task_script(PLAN, b.split_env(PLAN)[1])
    task = task.replace("/opt/v/bin/python", str(fake)).replace("cd /c", f"cd {code}")
    env = {"PATH": "/usr/bin:/bin", "SLURMD_NODENAME": "node0", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "42"}  # fmt: skip
    job = subprocess.Popen(["sh", "-c", task], env=env, stderr=subprocess.PIPE, text=True)
    try:
        lock = code / ".ddpfleet" / "lock"
        deadline = time.monotonic() + 5
        while lock.read_text() == "" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lock.read_text() == "run1 (slurm job 42)"
        held = subprocess.run(["flock", "-n", "-x", str(lock), "true"])
        assert held.returncode == 1  # an SSH run's claim finds it busy, naming the job
        second = subprocess.run(["sh", "-c", task], env=env, capture_output=True, text=True)
        assert second.returncode == 2
        assert second.stderr.strip() == (
            f"ddpfleet: code dir {code} is in use by run run1 (slurm job 42)"
        )
    finally:
        job.wait(10)
    assert subprocess.run(["flock", "-n", "-x", str(lock), "true"]).returncode == 0


def test_sbatch_asks_for_exactly_the_planned_nodes():
    got = b.sbatch_argv(PLAN, "/l/slurm-%j.out")
    assert got[:2] == ["sbatch", "--parsable"]
    assert "--nodelist=node0,node1" in got and "--nodes=2" in got
    assert "--output=/l/slurm-%j.out" in got and "--job-name=ddpfleet-run1" in got


def test_job_output_lines_get_node_and_rank_and_srun_failures_are_kept():
    out = b.JobOutput(nodes=("node0", "node1"), nproc=2)
    assert out.line("1: [default1]:rank 3 checksum ab") == ("node1", 3, "rank 3 checksum ab")
    assert out.line("0: torchrun says hi") == ("node0", None, "torchrun says hi")
    assert out.line("srun: error: node1: task 1: Exited with exit code 1")[0] == "slurm"
    assert out.line("srun: error: node0: task 0: Terminated")[0] == "slurm"
    assert out.failed_tasks == [("node1", 1), ("node0", None)]


def test_scontrol_job_line_and_exit_codes():
    job = b.parse_job("JobId=7 JobName=ddpfleet-x JobState=FAILED Reason=NonZeroExitCode "
                      "ExitCode=1:0 BatchHost=node0 NodeList=node[0-1]")  # fmt: skip
    assert job["JobState"] in b.TERMINAL and job["BatchHost"] == "node0"
    assert b.exit_code(job) == 1
    assert b.exit_code({"ExitCode": "0:15"}) == -15
    assert b.exit_code({"ExitCode": "0:0"}) == 0


def test_the_batch_script_records_the_nodes_and_sruns_exit(tmp_path):
    """The script under sh with stand-ins for scontrol and srun (a failing task): the record
    beside the output says the job's nodes in task order, then srun's exit, which is the
    script's own."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(
        '#!/bin/sh\n[ "$3" = "node[0-1]" ] && printf "node0\\nnode1\\n"\n'
    )
    (fake / "srun").write_text("#!/bin/sh\nexit 3\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    logs = tmp_path / "l"
    logs.mkdir()
    plan = replace(PLAN, nodes=tuple(replace(n, log_dir=str(logs)) for n in PLAN.nodes))
    env = {"PATH": f"{fake}:/usr/bin:/bin", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node[0-1]"}
    r = subprocess.run(["sh", "-c", b.batch_script(plan)], env=env, capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    record = (logs / "slurm-42.state").read_text()
    assert record == "nodes node0 node1 \nexit 3\n"
    assert b.parse_record(record) == (("node0", "node1"), 3)
    assert b.parse_record("nodes node1 node0\n") == (("node1", "node0"), None)
    assert b.record_path("/l", "42") == "/l/slurm-42.state"


def test_the_job_runs_as_the_one_training_user_of_every_node():
    assert b.job_user([("node0", "train"), ("node1", "train")]) == "train"
    assert b.job_user([("node0", None), ("node1", None)]) is None  # the login user's job
    with pytest.raises(PlanError) as e:
        b.job_user([("node0", "train"), ("node1", "bob")])
    assert "node0: a slurm job runs as one user" in str(e.value)
    assert "(node0: train, node1: bob)" in str(e.value) and "same train_user" in str(e.value)


def test_job_commands_go_through_runuser_as_root_unless_the_login_is_the_job_user():
    sbatch = ["sbatch", "--parsable"]
    assert b.as_job_user("train", "train", sbatch) == (sbatch, False)
    assert b.as_job_user(None, "ubuntu", sbatch) == (sbatch, False)
    argv, root = b.as_job_user("train", "root", sbatch)
    assert (argv, root) == (["runuser", "-u", "train", "--", "sbatch", "--parsable"], True)
    # a sudo login: the one root script (ddpfleet.become) runs runuser, never sudo -u
    wire = become.Escalation("sudo", "ubuntu").wrap(shlex.join(argv))
    assert wire.startswith("sudo -n -H -- /bin/sh -c ")
    assert shlex.split(wire)[-1].endswith("runuser -u train -- sbatch --parsable")


def test_each_task_makes_the_checkpoint_dir_before_torchrun(tmp_path):
    """The contract's DDPFLEET_CHECKPOINT_DIR, 0700, there before torchrun starts; where the
    task cannot make it (no root made it before sbatch), the user's own under $HOME."""
    task = b.task_script(PLAN, b.split_env(PLAN)[1])
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text('#!/bin/sh\necho "$DDPFLEET_CHECKPOINT_DIR"\n')
    (fake / "python").chmod(0o755)
    code = code_dir(tmp_path)  # the task holds its lock (issue 24 item 6)
    task = task.replace("/opt/v/bin/python", str(fake / "python")).replace("cd /c", f"cd {code}")
    ckpt = tmp_path / "runs" / "run1" / "checkpoints"
    env = {"PATH": "/usr/bin:/bin", "SLURMD_NODENAME": "node0", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "42", "DDPFLEET_RUN_ID": "run1", "HOME": str(tmp_path / "home"),
           "DDPFLEET_CHECKPOINT_DIR": str(ckpt)}  # fmt: skip
    out = subprocess.run(["sh", "-c", task], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == str(ckpt) and oct(ckpt.stat().st_mode & 0o777) == "0o700"
    (tmp_path / "file").write_text("")  # a parent that cannot hold a dir: the fallback
    env["DDPFLEET_CHECKPOINT_DIR"] = str(tmp_path / "file" / "run1" / "checkpoints")
    out = subprocess.run(["sh", "-c", task], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == str(tmp_path / "home/.ddpfleet/runs/run1/checkpoints")


@pytest.mark.skipif(os.getuid() != 0, reason="chown needs root")
def test_root_makes_the_run_dir_and_the_users_checkpoint_dir(tmp_path):
    path = tmp_path / "runs" / "run1" / "checkpoints"
    subprocess.run(b.checkpoint_dir_argv(str(path), "nobody"), check=True)
    assert path.stat().st_uid == pwd.getpwnam("nobody").pw_uid
    assert oct(path.stat().st_mode & 0o777) == "0o700"
    assert path.parent.stat().st_uid == 0 and oct(path.parent.stat().st_mode & 0o777) == "0o755"
    os.rmdir(path)
    path.symlink_to(tmp_path)  # never chowned through a symlink
    r = subprocess.run(b.checkpoint_dir_argv(str(path), "nobody"), capture_output=True)
    assert r.returncode != 0 and tmp_path.stat().st_uid == 0
