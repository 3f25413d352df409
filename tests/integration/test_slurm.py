"""Slurm on real sandbox nodes: the slurm role bootstraps munge, slurmctld and slurmd (real
daemons, supervised: the nodes have no systemd), then `invoke train --launcher slurm` runs
through sbatch/srun/torchrun.

The module has a 2-node sandbox of its own (its prefix + 's', the next subnet), made once for
its tests; taking the sandbox down ends every daemon with its node (each lives in the node's
PID namespace). It logs in as root and trains as `train` (uid 2000): every job is that user's.
Waits are polled, never slept.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import shlex
import signal
import time
from pathlib import Path

import pytest
import yaml

from ddpfleet.launch.slurm import state as slurm_state
from tests.integration.conftest import (
    PREFIX,
    Cluster,
    sandbox,
    second_subnet,
    write_inventory,
)
from tests.integration.test_checkpoint_dir import SEE, seen
from tests.integration.test_gpu_status import select, standin
from tests.integration.test_train import Live, new_run_id, run_pids, train_args, wait_gone

NODES = ("node0", "node1")
SHORT = "--epochs 2 --steps-per-epoch 4 --batch-size 8"
TRAIN = {"name": "train", "uid": 2000, "gid": 2000}
# As root on a node: every process whose environment names run $1, as "pid uid local_rank job"
# (- where the variable is not set).
RUN_PROCESSES = r"""
for d in /proc/[0-9]*; do
  env=$(tr '\0' '\n' < "$d/environ" 2>/dev/null) || continue
  printf '%s\n' "$env" | grep -qx "DDPFLEET_RUN_ID=$1" || continue
  r=$(printf '%s\n' "$env" | sed -n 's/^LOCAL_RANK=//p')
  j=$(printf '%s\n' "$env" | sed -n 's/^SLURM_JOB_ID=//p')
  echo "${d#/proc/} $(awk '/^Uid:/ {print $2}' "$d/status") ${r:--} ${j:--}"
done
"""
# As root on a node: the cloud-shaped login sandbox.up makes for a non-root login
# (ddpfleet/sandbox/users.py): `ubuntu`, the sandbox's client key, passwordless sudo, a '*'
# password (sshd takes a key for it; a '!' locked account it refuses).
SUDO_LOGIN = """\
id ubuntu >/dev/null 2>&1 || useradd -m -s /bin/bash ubuntu
usermod -p '*' ubuntu
install -d -o ubuntu -g ubuntu -m 0700 /home/ubuntu/.ssh
install -o ubuntu -g ubuntu -m 0600 /root/.ssh/authorized_keys /home/ubuntu/.ssh/
echo 'ubuntu ALL=(ALL:ALL) NOPASSWD:ALL' >/etc/sudoers.d/90-ddpfleet-sudo-login
chmod 0440 /etc/sudoers.d/90-ddpfleet-sudo-login
"""


def _recap(out: str) -> dict[str, int]:
    """node -> changed, from the recap table."""
    return {m[0]: int(m[1]) for m in re.findall(r"│ (node\d) +│ \d+ +│ (\d+) +│", out)}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Cluster:
    directory = tmp_path_factory.mktemp("slurm")
    c = Cluster(
        directory,
        write_inventory(directory, prefix=PREFIX + "s", subnet=second_subnet(), train_user=TRAIN),
    )
    with sandbox(c):
        first = c.invoke("bootstrap", "--roles", "train_user,venv_env,slurm", timeout=1800)
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
        c.first_bootstrap = first.stdout  # type: ignore[attr-defined]
        yield c


@pytest.fixture(scope="module")
def sudo_login(slurm: Cluster) -> Cluster:
    """The same cluster logged in to as `ubuntu` with sudo: root work goes through sudo."""
    for node in NODES:
        made = slurm.ssh(node, SUDO_LOGIN)
        assert made.returncode == 0, made.stdout + made.stderr
    data = slurm.data
    data["ssh"]["user"] = "ubuntu"
    inventory = slurm.dir / "sudo-login.yaml"
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    return Cluster(slurm.dir, inventory)  # the same index: .ddpfleet/ beside both inventories


# As root on node0: every job cancelled, then until Slurm has none (KillWait + a margin).
CANCEL_ALL = """
scancel --user train
for i in $(seq 400); do [ -z "$(squeue -h)" ] && exit 0; sleep 0.3; done
squeue; exit 1
"""


@pytest.fixture(autouse=True)
def no_job_outlives_its_test(slurm: Cluster):
    """A test that failed with its job still running must not fail every test after it (each
    asserts its own job went, before this runs): the job is cancelled here."""
    yield
    if (left := slurm.ssh("node0", "squeue -h", timeout=30)).stdout.strip():
        gone = slurm.ssh("node0", CANCEL_ALL, timeout=150)
        assert gone.returncode == 0, f"jobs left behind: {left.stdout}{gone.stdout}"


def status(c: Cluster) -> dict:
    r = c.invoke("slurm.status", "--json", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_bootstrap_brings_both_nodes_up_idle_and_a_second_run_changes_nothing(slurm: Cluster):
    assert "slurmctld: changed (started" in slurm.first_bootstrap
    doc = status(slurm)
    assert {n["name"]: n["state"] for n in doc["nodes"]} == {"node0": "idle", "node1": "idle"}
    again = slurm.invoke("bootstrap", "--roles", "slurm", timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr
    assert _recap(again.stdout) == {"node0": 0, "node1": 0}, again.stdout[-3000:]
    table = slurm.invoke("slurm.status", timeout=60)
    assert re.search(r"node1 +│ idle", table.stdout), table.stdout


def test_check_mode_on_a_converged_cluster_reports_nothing_to_do(slurm: Cluster):
    r = slurm.invoke("bootstrap", "--roles", "slurm", "--check", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert _recap(r.stdout) == {"node0": 0, "node1": 0}, r.stdout[-3000:]


def test_the_munge_key_is_never_printed_and_is_the_same_everywhere(slurm: Cluster):
    key = (slurm.dir / ".ddpfleet" / "slurm" / "munge.key").read_bytes()
    digests = {n: slurm.ssh(n, "sha256sum /etc/munge/munge.key").stdout.split()[0] for n in NODES}
    assert len(set(digests.values())) == 1
    assert slurm.ssh("node0", "stat -c '%U %a' /etc/munge/munge.key").stdout.strip() == "munge 400"
    logs = "".join(p.read_text(errors="replace") for p in (slurm.dir / "logs").glob("*.log"))
    assert key.hex()[:32] not in logs


def test_a_bad_setting_is_one_line_and_the_running_cluster_is_untouched(slurm: Cluster):
    data = slurm.data
    data["slurm"] = {"slurmd_port": 6817}  # the same port as slurmctld's
    bad = slurm.dir / "bad-inventory.yaml"
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    conf = slurm.ssh("node0", "sha256sum /etc/slurm/slurm.conf").stdout
    pids = slurm.ssh("node0", "cat /var/lib/ddpfleet/slurm/slurmctld.pid").stdout
    r = slurm.invoke("bootstrap", "--roles", "slurm", inventory=bad, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "bad-inventory.yaml:" in lines[0] and "slurm.slurmd_port" in lines[0], lines[0]
    assert "recap" not in r.stdout  # refused before any node was touched
    assert slurm.ssh("node0", "sha256sum /etc/slurm/slurm.conf").stdout == conf
    assert slurm.ssh("node0", "cat /var/lib/ddpfleet/slurm/slurmctld.pid").stdout == pids


def test_train_through_slurm_four_ranks_one_checksum(slurm: Cluster):
    run_id = new_run_id("slurm")
    args = train_args(run_id, SHORT, "--launcher", "slurm", "--nodes", ",".join(NODES))
    r = slurm.invoke(*args, timeout=600)
    out = r.stdout
    assert r.returncode == 0, out[-4000:] + r.stderr[-2000:]
    assert re.search(r"\[slurm\] submitted job \d+ \(2 nodes\) from node0 as train$", out, re.M)
    checksums = dict(re.findall(r"^\[node\d r(\d)\] rank \1 checksum (\S+)$", out, re.MULTILINE))
    assert sorted(checksums) == ["0", "1", "2", "3"], out[-3000:]
    assert len(set(checksums.values())) == 1, checksums
    logs = slurm.dir / "logs" / run_id
    assert "rank 3 checksum" in (logs / "node1.log").read_text()
    assert list(logs.glob("node0-slurm-*.out")), sorted(p.name for p in logs.iterdir())
    assert (logs / "node1-rank3.stdout.log").is_file(), sorted(p.name for p in logs.iterdir())
    assert status(slurm)["jobs"] == []
    # Issue 24 item 4: an attached Slurm run is in the index, as an SSH attached run is.
    view = run_view(slurm, run_id)
    shown = {k: view[k] for k in ("state", "launcher", "attached", "nproc", "nodes", "outputs")}
    assert shown == {
        "state": "SUCCEEDED", "launcher": "slurm", "attached": True, "nproc": 2,
        "nodes": list(NODES), "outputs": f"/var/lib/ddpfleet/runs/{run_id}/checkpoints",
    }, view  # fmt: skip
    assert view["restarts"] == 0 and view["ended"] > view["started"], view


def test_every_task_sees_the_runs_checkpoint_dir_the_users_and_0700(slurm: Cluster, tmp_path):
    """The checkpoint contract through Slurm: the same DDPFLEET_CHECKPOINT_DIR as over SSH,
    made before torchrun, the job user's (train), 0700, outside the code dir."""
    project = tmp_path / "proj"
    project.mkdir()
    (project / "see.py").write_text(SEE)
    run_id = new_run_id("slurmckpt")
    r = slurm.invoke(
        "train", "--project-dir", str(project), "--script", "see.py", "--nproc-per-node", "2",
        "--run-id", run_id, "--launcher", "slurm", "--nodes", ",".join(NODES), timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    want = f"/var/lib/ddpfleet/runs/{run_id}/checkpoints"
    ranks = seen(r.stdout)
    assert sorted(s["rank"] for s in ranks) == [0, 1, 2, 3], r.stdout[-3000:]
    for s in ranks:
        assert s["dir"] == want and s["uid"] == 2000 and s["mode"] == "0o700", s
        assert not s["dir"].startswith(s["cwd"].rstrip("/") + "/"), s


def test_a_crashing_rank_is_named_and_nothing_of_the_job_is_left(slurm: Cluster):
    run_id = new_run_id("slurmcrash")
    script = "--epochs 50 --steps-per-epoch 20 --step-sleep 0.05 --fail-at-step 3 --fail-rank 3"
    r = slurm.invoke(*train_args(run_id, script, "--launcher", "slurm"), timeout=600)
    assert r.returncode == 1, r.stdout[-3000:]
    last = r.stderr.strip().splitlines()[0]
    assert "node1 rank 3 failed first (exit 1)" in last, r.stderr[-2000:]
    view = run_view(slurm, run_id)  # the attached run's verdict, as the controller saw it
    assert (view["state"], view["failed_node"], view["failed_rank"]) == ("FAILED", "node1", 3)
    assert view["why"] == "node1 rank 3 failed first (exit 1)" and view["attached"], view
    wait_gone(slurm, run_id, time.monotonic(), within=30, nodes=NODES)
    assert status(slurm)["jobs"] == []
    assert all(n["state"] == "idle" for n in status(slurm)["nodes"])


def test_ctrl_c_cancels_the_job(slurm: Cluster):
    run_id = new_run_id("slurmint")
    script = "--epochs 100 --steps-per-epoch 100 --step-sleep 0.1"
    live = Live(slurm, train_args(run_id, script, "--launcher", "slurm"))
    try:
        live.wait_for(r"^\[node1 r\d\] rank \d/4: first step", timeout=180)
        assert run_pids(slurm, "node1", run_id)
        live.proc.send_signal(signal.SIGINT)
        assert live.finish(timeout=120) == 130, live.text[-3000:]
    finally:
        if live.proc.poll() is None:
            live.proc.kill()
            live.finish()
    assert "cancelling job" in live.text
    wait_gone(slurm, run_id, time.monotonic(), within=30, nodes=NODES)
    assert status(slurm)["jobs"] == []
    view = run_view(slurm, run_id)
    assert (view["state"], view["attached"]) == ("STOPPED", True), view
    assert view["why"].startswith("interrupted: slurm job "), view


def test_training_as_root_through_slurm_is_refused_as_the_ssh_launcher_refuses_it(slurm: Cluster):
    data = slurm.data
    data["train_user"] = {"name": "root", "uid": 0, "gid": 0}
    inventory = slurm.dir / "root-trains.yaml"
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    said = {}
    for launcher in ("ssh", "slurm"):
        args = train_args(new_run_id("slurmroot"), SHORT, "--launcher", launcher, "--detach")
        r = slurm.invoke(*args, inventory=inventory, timeout=120)
        assert r.returncode == 1 and "submitted" not in r.stdout, r.stdout + r.stderr
        said[launcher] = r.stderr.strip().splitlines()
    assert said["slurm"] == said["ssh"] and len(said["slurm"]) == 1, said
    assert said["slurm"][0].startswith("error: node0: training as root is refused"), said
    assert status(slurm)["jobs"] == []


def test_the_inventory_can_make_slurm_the_launcher(slurm: Cluster, tmp_path: Path):
    data = slurm.data
    data["train"] = {"launcher": "slurm"}
    inventory = slurm.dir / "slurm-launcher.yaml"
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    run_id = new_run_id("slurminv")
    args = train_args(run_id, "--epochs 1 --steps-per-epoch 2 --batch-size 8")
    r = slurm.invoke(*args, inventory=inventory, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "[slurm] submitted job" in r.stdout


# --- detached: train --detach, runs, logs, stop, gpu-status --------------------------------------


def detach(c: Cluster, run_id: str, script: str) -> str:
    """`train --launcher slurm --detach`: returns once Slurm accepted the job; its id."""
    began = time.monotonic()
    r = c.invoke(*train_args(run_id, script, "--launcher", "slurm", "--detach"), timeout=600)
    took = time.monotonic() - began
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    m = re.search(rf"^run {run_id}: slurm job (\d+) (\w+) \(([\d.]+)s\)$", r.stdout, re.M)
    assert m, r.stdout[-3000:]
    for command in ("runs", f"logs {run_id} -f", f"stop {run_id}"):
        assert f"  invoke {command}" in r.stdout
    print(f"measured: detach {run_id}: sbatch {m[3]}s, whole command {took:.1f}s ({m[2]})")
    return m[1]


def run_view(c: Cluster, run_id: str) -> dict:
    r = c.invoke("runs", "--json", timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    (view,) = [v for v in json.loads(r.stdout) if v["run_id"] == run_id]
    return view


def forgotten(c: Cluster, run_id: str) -> dict:
    """The run's verdict from its nodes' files alone, as once Slurm forgets the job (300 s after
    it ended, without accounting): the real record and output, scontrol's answer left out."""
    index = [json.loads(line) for line in (c.dir / ".ddpfleet" / "runs.jsonl").open()]
    (entry,) = [e for e in index if e["run_id"] == run_id]
    argv = slurm_state.probe_argv(entry["job_id"], entry["output_dir"])
    said = {n: slurm_state.parse_probe(c.ssh(n, shlex.join(argv)).stdout) for n in NODES}
    assert said["node0"].job is not None  # Slurm still knows it now
    files = {n: dataclasses.replace(s, job=None) for n, s in said.items()}
    return slurm_state.fold(entry, files).as_json()


def until_ended(c: Cluster, run_id: str, within: float = 300) -> dict:
    deadline = time.monotonic() + within
    while (view := run_view(c, run_id))["state"] == "RUNNING":
        assert time.monotonic() < deadline, view
        time.sleep(1)
    return view


def test_detached_job_runs_logs_gpu_status_and_stop(slurm: Cluster, sudo_login: Cluster):
    """Through a sudo login (ubuntu): sbatch, the output's reads and scancel go through sudo."""
    ubuntu = sudo_login
    run_id = new_run_id("slurmdet")
    job = detach(ubuntu, run_id, "--epochs 100 --steps-per-epoch 100 --step-sleep 0.1")
    index = [json.loads(line) for line in (slurm.dir / ".ddpfleet" / "runs.jsonl").open()]
    want = {"run_id": run_id, "launcher": "slurm", "job_id": job, "user": "train"}
    assert want.items() <= index[-1].items()
    view = run_view(ubuntu, run_id)
    assert view["state"] == "RUNNING" and f"slurm job {job}" in view["why"], view
    follow = Live(ubuntu, ["logs", run_id, "-f"])
    try:
        follow.wait_for(r"^\[node1 r3\] rank 3/4: first step", timeout=240)
        for node in NODES:  # the job's every process is train's, its ranks too
            found = slurm.ssh(node, shlex.join(["sh", "-c", RUN_PROCESSES, "sh", run_id]))
            processes = [line.split() for line in found.stdout.splitlines()]
            ranks = [(uid, job_id) for _, uid, r, job_id in processes if r != "-"]
            assert ranks == [("2000", job)] * 2, (node, processes)
            assert {uid for _, uid, _, _ in processes} == {"2000"}, (node, processes)
        only = ubuntu.invoke("logs", run_id, "--node", "node1", "--rank", "3", timeout=120)
        assert only.returncode == 0, only.stderr
        assert only.stdout and all(
            line.startswith("[node1 r3] ") for line in only.stdout.splitlines()
        )
        pid = run_pids(slurm, "node0", run_id)[-1]
        with standin(slurm, ["node0"], "a100x8"):
            select(slurm, "node0", f"a100x8 pids={pid},{pid}")
            gpus = slurm.invoke("gpu-status", "--nodes", "node0", "--json", timeout=60)
            table = slurm.invoke("gpu-status", "--nodes", "node0", timeout=60)
        procs = json.loads(gpus.stdout)["nodes"][0]["gpus"][0]["processes"]
        assert [(p["pid"], p["slurm_job_id"], p["run_id"]) for p in procs] == [
            (int(pid), job, run_id)
        ], procs
        assert f"[slurm job {job}]" in table.stdout, table.stdout[-2000:]
        began = time.monotonic()
        stop = ubuntu.invoke("stop", run_id, timeout=300)
        latency = time.monotonic() - began
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert f"slurm job {job} cancelled (was RUNNING)" in stop.stdout, stop.stdout
        assert re.search(r"node1 +│ \d+ processes of the job ended, nothing left", stop.stdout)
        assert not any(run_pids(slurm, n, run_id) for n in NODES)  # gone when stop returns
        print(f"measured: stop {run_id}: {latency:.1f}s")
        assert follow.finish(timeout=120) == 0, follow.text[-3000:]  # -f ends with the job
    finally:
        if follow.proc.poll() is None:
            follow.proc.kill()
            follow.finish()
    assert run_view(ubuntu, run_id)["state"] == "STOPPED"
    assert forgotten(slurm, run_id)["state"] == "STOPPED"  # slurmstepd's CANCELLED line
    again = ubuntu.invoke("stop", run_id, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"slurm job {job} had ended (CANCELLED)" in again.stdout, again.stdout
    assert "none running, nothing left" in again.stdout


def test_detached_jobs_that_succeed_and_fail(slurm: Cluster):
    ok_id, bad_id = new_run_id("slurmok"), new_run_id("slurmbad")
    detach(slurm, ok_id, "--epochs 1 --steps-per-epoch 2 --batch-size 8")
    # Not queued behind it: a running job holds its project's code dir (issue 24 item 6), so a
    # second job of the same project waits for the first to end rather than re-sync under it.
    assert until_ended(slurm, ok_id)["state"] == "SUCCEEDED"
    bad = "--epochs 50 --steps-per-epoch 20 --step-sleep 0.05 --fail-at-step 3 --fail-rank 3"
    detach(slurm, bad_id, bad)
    out = slurm.invoke("logs", ok_id, timeout=120).stdout
    checksums = dict(re.findall(r"^\[node\d r(\d)\] rank \1 checksum (\S+)$", out, re.M))
    assert sorted(checksums) == ["0", "1", "2", "3"] and len(set(checksums.values())) == 1, out
    rank99 = slurm.invoke("logs", ok_id, "--rank", "99", timeout=120)  # issue 24 item 5
    assert rank99.returncode == 1, rank99.stdout + rank99.stderr
    assert f"--rank 99: run {ok_id} has ranks 0-3" in rank99.stderr, rank99.stderr
    for nodes, want in (("node0,node1", ["0", "1", "2", "3"]), ("node1", ["2", "3"])):
        r = slurm.invoke("logs", ok_id, "--node", nodes, timeout=120)  # as an SSH run's logs
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr
        got = re.findall(r"^\[node\d r(\d)\] rank \1 checksum", r.stdout, re.M)
        assert sorted(got) == want, r.stdout[-2000:]
        assert {line[1:6] for line in r.stdout.splitlines()} <= set(nodes.split(",")), r.stdout
    view = until_ended(slurm, bad_id)
    assert (view["state"], view["failed_node"], view["failed_rank"]) == ("FAILED", "node1", 3)
    assert view["why"].startswith("node1 rank 3 failed first"), view
    assert forgotten(slurm, ok_id)["state"] == "SUCCEEDED"
    late = forgotten(slurm, bad_id)
    assert (late["state"], late["failed_node"], late["failed_rank"]) == ("FAILED", "node1", 3)
    table = slurm.invoke("runs", timeout=120).stdout
    assert re.search(rf"{bad_id} +│ FAILED", table) and re.search(rf"{ok_id} +│ SUCCEEDED", table)
    wait_gone(slurm, bad_id, time.monotonic(), within=30, nodes=NODES)


def code_lock(c: Cluster, node: str, run_id: str) -> str:
    """The code dir lock on the node that the run's Slurm job holds, or '' (the preflight's
    claim names the run alone, until the job's task takes the lock)."""
    found = c.ssh(
        node, f"grep -l -s -F -e '{run_id} (slurm job' /home/train/ddpfleet/*/*/code/.ddpfleet/lock"
    )
    return found.stdout.strip()


def test_a_running_slurm_job_holds_its_nodes_and_its_code_dir(slurm: Cluster):
    """Issue 24 item 6: an SSH run re-synced train.py under a running Slurm job. The job's
    tasks hold the code dir's lock as an SSH run's runners do, and an SSH run refuses the nodes
    a running ddpfleet job holds, one line per node naming the job."""
    run_id = new_run_id("slurmhold")
    job = detach(slurm, run_id, "--epochs 100 --steps-per-epoch 100 --step-sleep 0.1")
    try:
        deadline = time.monotonic() + 240
        while not all(code_lock(slurm, n, run_id) for n in NODES):
            assert time.monotonic() < deadline, run_view(slurm, run_id)
            time.sleep(0.5)
        lock = code_lock(slurm, "node0", run_id)
        assert slurm.ssh("node0", f"cat {lock}").stdout == f"{run_id} (slurm job {job})"
        beside = new_run_id("sshbeside")
        # Another port: on the default one the master's refusal comes first (naming the job too).
        args = train_args(beside, SHORT, "--launcher", "ssh", "--master-port", "29611")
        r = slurm.invoke(*args, timeout=300)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout[-3000:] + r.stderr
        for node in NODES:
            assert (
                f"{node}: slurm job {job} (ddpfleet run {run_id}) is running there; wait for it "
                f"to end, stop it (invoke stop {run_id}) or leave {node} out (--exclude {node})"
            ) in r.stderr, r.stderr
        assert f"code dir {lock[: -len('/.ddpfleet/lock')]} is in use by run {run_id}" in r.stderr
        assert "code: " not in r.stdout  # nothing synced
        queued = new_run_id("slurmbeside")
        # Another port: the job's store holds the default one, which the preflight checks first.
        args = train_args(
            queued, SHORT, "--launcher", "slurm", "--detach", "--master-port", "29612"
        )
        r = slurm.invoke(*args)
        assert r.returncode == 1, r.stdout[-3000:] + r.stderr
        assert f"is in use by run {run_id} (slurm job {job})" in r.stderr, r.stderr
        assert run_view(slurm, run_id)["state"] == "RUNNING"
    finally:
        stop = slurm.invoke("stop", run_id, timeout=300)
        assert stop.returncode == 0, stop.stdout + stop.stderr
    free = slurm.ssh("node0", f"flock -n -x {lock} true")
    assert free.returncode == 0, "the lock outlived the job"


def reservations(c: Cluster, node: str) -> str:
    """The code dir reservations on the node (launch/slurm/run.py reserve): their run ids."""
    return c.ssh(node, "cat /home/train/ddpfleet/*/*/code/.ddpfleet/slurm-run 2>/dev/null").stdout


def test_a_pending_slurm_job_holds_its_code_dir_until_it_is_gone(slurm: Cluster):
    """Issue 24 item 6's last gap: a job pending behind another (Slurm's, not ddpfleet's) holds
    its code dir against SSH runs from its preflight on, though its tasks have not locked it
    yet; cancelled behind ddpfleet's back (scancel), it holds nothing any more."""
    submit = "sbatch --parsable -N2 -w node0,node1 --exclusive -o /dev/null --wrap 'sleep 600'"
    blocker = slurm.ssh("node0", submit).stdout.strip()
    assert blocker.isdigit(), blocker
    run_id, job = new_run_id("slurmpend"), ""
    try:
        deadline = time.monotonic() + 60
        while slurm.ssh("node0", f"squeue -h -j {blocker} -o %T").stdout.strip() != "RUNNING":
            assert time.monotonic() < deadline, status(slurm)
            time.sleep(0.5)
        job = detach(slurm, run_id, SHORT)
        view = run_view(slurm, run_id)
        assert view["state"] == "RUNNING" and f"slurm job {job} pending" in view["why"], view
        beside = new_run_id("sshpend")
        r = slurm.invoke(*train_args(beside, SHORT, "--launcher", "ssh"), timeout=300)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout[-3000:] + r.stderr
        for node in NODES:
            assert re.search(
                rf"^  {node}: slurm job {job} \(ddpfleet run {run_id}\) is pending and will run "
                rf"in code dir /home/train/ddpfleet/\S+/code; wait for it to end, stop it "
                rf"\(invoke stop {run_id}\) or leave {node} out \(--exclude {node}\)$",
                r.stderr,
                re.M,
            ), r.stderr
        assert "code: " not in r.stdout  # nothing synced
        assert all(run_id in reservations(slurm, n) for n in NODES)
        assert slurm.ssh("node0", f"scancel {job}").returncode == 0  # not through ddpfleet
        deadline = time.monotonic() + 60
        while slurm.ssh("node0", f"squeue -h -n ddpfleet-{run_id}").stdout.strip():
            assert time.monotonic() < deadline
            time.sleep(0.5)
        r = slurm.invoke(*train_args(new_run_id("sshafter"), SHORT, "--launcher", "ssh"))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        # the stale one went (other code dirs of the module's earlier runs may keep theirs)
        assert not any(run_id in reservations(slurm, n) for n in NODES)
    finally:
        slurm.ssh("node0", f"scancel {blocker} {job}")


def test_a_node_added_to_the_inventory_joins_on_the_next_bootstrap(slurm: Cluster, tmp_path):
    """Last in the module: node2 is added to the inventory, made by sandbox.up, and the next
    bootstrap makes it a Slurm node: every node's slurm.conf lists it and Slurm shows it idle.
    (The module's teardown takes node2 down with the rest.)"""
    data = slurm.data
    nodes = data["nodes"]
    last = ipaddress.ip_address(nodes["node1"]["host"])
    nodes["node2"] = dict(nodes["node1"], host=str(last + 1))
    grown = tmp_path / "inventory.yaml"
    grown.write_text(yaml.safe_dump(data, sort_keys=False))
    three = Cluster(slurm.dir, grown)
    up = three.invoke("sandbox.up", timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    boot = three.invoke("bootstrap", "--roles", "train_user,slurm", timeout=1200)
    assert boot.returncode == 0, boot.stdout[-4000:] + boot.stderr[-2000:]
    for node in ("node0", "node1", "node2"):
        conf = three.ssh(node, "cat /etc/slurm/slurm.conf").stdout
        assert re.search(r"^NodeName=node2\b", conf, re.M), (node, conf)
    deadline = time.monotonic() + 120
    while True:
        r = three.invoke("slurm.status", "--json", timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        states = {n["name"]: n["state"] for n in json.loads(r.stdout)["nodes"]}
        if states == {"node0": "idle", "node1": "idle", "node2": "idle"} or (
            time.monotonic() > deadline
        ):
            break
        time.sleep(0.5)
    assert states == {"node0": "idle", "node1": "idle", "node2": "idle"}, states
