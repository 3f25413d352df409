"""`invoke train --detach`, `runs`, `logs`, `stop`, `--resume` on real sandbox nodes.

A detached run lives in a supervisor per node (/var/lib/ddpfleet/runs/<run-id>/); the
controller only starts it and later asks. What a user would check: `runs --json`, `logs`, and
/proc/*/environ on every node for the run's DDPFLEET_RUN_ID (never a process name). The figures
(launch, stop, gang stop) are printed for the note (pytest -s), not asserted to the tenth.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import textwrap
import time

import pytest
import yaml

from tests.integration.conftest import INVOKE, ROOT, Cluster
from tests.integration.test_train import (  # noqa: F401 (the `ready` fixture)
    NODES,
    SHORT,
    Live,
    _ssh_argv,
    new_run_id,
    ready,
    run_pids,
    train_args,
)

RUNS = "/var/lib/ddpfleet/runs"
SLOW = "--epochs 200 --steps-per-epoch 4 --batch-size 8 --step-sleep 0.05"
# Rank 0 leaves a double-forked daemon (own session, SIGTERM ignored, a clean environment: no
# DDPFLEET_RUN_ID to find it by); every rank then idles. Only the subreaper/cgroup can end it.
ESCAPING = """
import os, signal, sys, time
rank, run = int(os.environ["RANK"]), os.environ["DDPFLEET_RUN_ID"]
if rank == 0 and os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open(f"/tmp/{run}.daemon", "w") as f:
            f.write(str(os.getpid()))
        code = "import signal,time;signal.signal(signal.SIGTERM,signal.SIG_IGN);time.sleep(9999)"
        os.execve(sys.executable, [sys.executable, "-c", code], {})
    os._exit(0)
print(f"rank {rank} up", flush=True)
while True:
    time.sleep(0.1)
"""


def detach(cluster: Cluster, run_id: str, script_args: str, *extra: str):
    start = time.monotonic()
    r = cluster.invoke(*train_args(run_id, script_args, "--detach", *extra), timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert f"run {run_id}: started detached" in r.stdout, r.stdout[-2000:]
    return time.monotonic() - start


def runs(cluster: Cluster) -> dict[str, dict]:
    r = cluster.invoke("runs", "--json", timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return {v["run_id"]: v for v in json.loads(r.stdout)}


def wait_state(cluster: Cluster, run_id: str, states: tuple[str, ...], within: float = 180):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        view = runs(cluster).get(run_id)
        if view and view["state"] in states:
            return view
        time.sleep(0.5)
    pytest.fail(f"{run_id} not {states} within {within}s: {runs(cluster).get(run_id)}")


def ranks_up(cluster: Cluster, run_id: str, pattern: str, count: int, within: float = 120):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        out = cluster.invoke("logs", run_id, timeout=60).stdout
        if len(re.findall(pattern, out, re.MULTILINE)) >= count:
            return out
        time.sleep(0.5)
    pytest.fail(f"{run_id}: not {count} x {pattern!r} within {within}s")


def gone_after(cluster: Cluster, run_id: str, since: float, nodes=NODES, within=60) -> float:
    while time.monotonic() - since < within:
        if not any(run_pids(cluster, n, run_id) for n in nodes):
            return time.monotonic() - since
        time.sleep(0.1)
    pytest.fail(f"{run_id}: processes left on {nodes} after {within}s")


def start_escaping(cluster: Cluster, tmp_path, tag: str) -> tuple[str, str]:
    """A detached run (2 ranks a node) whose rank 0 leaves a double-forked, setsid,
    SIGTERM-ignoring daemon on node0: (run id, the daemon's pid) once every rank is up."""
    project = tmp_path / "proj"
    project.mkdir()
    (project / "job.py").write_text(textwrap.dedent(ESCAPING))
    run_id = new_run_id(tag)
    r = cluster.invoke(
        "train", "--project-dir", str(project), "--script", "job.py", "--nproc-per-node", "2",
        "--run-id", run_id, "--detach", timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    ranks_up(cluster, run_id, r"rank \d up", 4)
    daemon = cluster.ssh("node0", f"cat /tmp/{run_id}.daemon").stdout.strip()
    assert daemon.isdigit(), daemon
    return run_id, daemon


def test_detached_run_outlives_its_controllers(ready: Cluster):
    run_id = new_run_id("det")
    took = detach(ready, run_id, SLOW.replace("200", "6"))
    # a controller following the logs, SIGKILLed: the run goes on
    follower = Live(ready, ["logs", run_id, "-f"])
    follower.wait_for(r"first step", timeout=120)
    follower.proc.send_signal(signal.SIGKILL)
    follower.finish()
    # logs -f sees a line written on the node at once
    live = Live(ready, ["logs", run_id, "-f", "--node", "node1"])
    live.wait_for(r"first step", timeout=60)
    marker = f"marker-{run_id}"
    wrote = time.monotonic()
    ready.ssh("node1", f"echo {marker} >> {RUNS}/{run_id}/node.log")
    seen = live.wait_for(marker, timeout=10) - wrote
    view = wait_state(ready, run_id, ("SUCCEEDED", "FAILED", "STOPPED", "LOST"))
    assert view["state"] == "SUCCEEDED", view
    assert live.finish(timeout=30) == 0  # -f ends with the run
    out = ready.invoke("logs", run_id).stdout
    checksums = dict(re.findall(r"^\[node\d r(\d)\] rank \1 checksum (\S+)$", out, re.MULTILINE))
    assert sorted(checksums) == ["0", "1", "2", "3"], out[-3000:]
    assert len(set(checksums.values())) == 1, checksums
    only = ready.invoke("logs", run_id, "--rank", "3").stdout
    assert "rank 3 checksum" in only and "rank 0 checksum" not in only
    assert not any(run_pids(ready, n, run_id) for n in NODES)
    # the run worked in its own snapshot of the code, beside its state on every node
    for n in NODES:
        assert ready.ssh(n, f"test -f {RUNS}/{run_id}/code/scripts/train_ddp.py").returncode == 0
    print(f"\nFIGURE detached launch {took:.2f}s (invoke wall); logs -f saw a write in {seen:.2f}s")


def test_failed_rank_stops_every_node_without_the_controller(ready: Cluster):
    run_id = new_run_id("fail")
    detach(ready, run_id, SLOW + " --fail-at-step 40 --fail-rank 3")
    # the moment node1 loses its first process of the run (the failing rank) ...
    peak, deadline = 0, time.monotonic() + 120
    while time.monotonic() < deadline:
        count = len(run_pids(ready, "node1", run_id))
        if count < peak:
            break
        peak = max(peak, count)
    took = gone_after(ready, run_id, time.monotonic(), within=30)  # ... to none on any node
    view = wait_state(ready, run_id, ("FAILED", "STOPPED", "SUCCEEDED", "LOST"))
    assert view["state"] == "FAILED", view
    assert view["failed_node"] == "node1" and view["failed_rank"] == 3, view
    assert "node1 rank 3" in view["why"]
    table = ready.invoke("runs").stdout
    assert re.search(rf"{run_id}\s.*FAILED", table), table
    print(f"\nFIGURE gang stop without controller (failed rank) {took:.2f}s")


def test_stop_leaves_nothing_even_an_escaping_daemon(ready: Cluster, tmp_path):
    run_id, daemon = start_escaping(ready, tmp_path, "stop")
    start = time.monotonic()
    s = ready.invoke("stop", run_id, timeout=120)
    took = time.monotonic() - start
    assert s.returncode == 0, s.stdout + s.stderr
    assert "nothing left" in s.stdout
    assert not any(run_pids(ready, n, run_id) for n in NODES)
    assert ready.ssh("node0", f"test -d /proc/{daemon}").returncode != 0, "the daemon survived"
    assert (
        ready.ssh("node0", f"ls -d /sys/fs/cgroup/*/ddpfleet/{run_id}.* 2>/dev/null").stdout == ""
    )
    assert wait_state(ready, run_id, ("STOPPED",), within=30)["state"] == "STOPPED"
    again = ready.invoke("stop", run_id, timeout=120)  # idempotent
    assert again.returncode == 0 and "was STOPPED" in again.stdout, again.stdout
    print(f"\nFIGURE stop (SIGTERM-ignoring daemon, grace 3 s) {took:.2f}s invoke wall")


def test_a_killed_supervisor_takes_its_whole_part_and_the_gang(ready: Cluster, tmp_path):
    """SIGKILL to node0's supervisor: its guardian ends the tree there, the escaped daemon too,
    and node1's part stops through the lifeline; `runs` names node0."""
    run_id, daemon = start_escaping(ready, tmp_path, "sigkill")
    read = f"import json;print(json.load(open('{RUNS}/{run_id}/state.json'))['supervisor_pid'])"
    supervisor = ready.ssh("node0", shlex.join(["python3", "-c", read])).stdout.strip()
    assert daemon.isdigit() and supervisor.isdigit(), (daemon, supervisor)
    killed = ready.ssh("node0", f"kill -KILL {supervisor}")
    since = time.monotonic()
    assert killed.returncode == 0, killed.stderr
    took = gone_after(ready, run_id, since, within=30)
    while ready.ssh("node0", f"test -d /proc/{daemon}").returncode == 0:
        assert time.monotonic() - since < 30, "the escaped daemon outlived the supervisor"
        time.sleep(0.2)
    deadline = time.monotonic() + 30
    while "was killed" not in (view := runs(ready)[run_id])["why"]:
        assert time.monotonic() < deadline, view
        time.sleep(0.5)
    assert view["state"] == "LOST" and "node0: its supervisor was killed (SIGKILL)" in view["why"]
    for n in NODES:
        assert ready.ssh(n, f"ls -d /sys/fs/cgroup/*/ddpfleet/{run_id}.* 2>/dev/null").stdout == ""
    print(f"\nFIGURE SIGKILLed supervisor: the run gone from both nodes in {took:.2f}s")


def test_resume_from_the_first_runs_checkpoint_and_stop_latency(ready: Cluster):
    first = new_run_id("ck")
    ckpt = "ckpt"  # ignored under ddpfleet: DDPFLEET_CHECKPOINT_DIR wins, and --resume fills it
    detach(ready, first, f"{SLOW} --checkpoint-dir {ckpt}", "--max-restarts", "1")
    ranks_up(ready, first, r"epoch 2 loss", 1)
    start = time.monotonic()
    s = ready.invoke("stop", first, timeout=120)
    took = time.monotonic() - start
    assert s.returncode == 0 and "nothing left" in s.stdout, s.stdout + s.stderr
    second = new_run_id("resumed")
    r = ready.invoke(*train_args(second, "", "--resume", first), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    out = ranks_up(ready, second, r"resumed from epoch \d+", 4)
    epochs = {int(e) for e in re.findall(r"resumed from epoch (\d+)", out)}
    assert len(epochs) == 1 and epochs.pop() >= 2, out[-2000:]
    assert ready.invoke("stop", second, timeout=120).returncode == 0
    print(f"\nFIGURE stop of a training run {took:.2f}s invoke wall")


def test_prune_keeps_the_newest(ready: Cluster):
    r = ready.invoke("runs", "--prune", "--keep", "1", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # the run dirs with records; the pruned runs' checkpoints stay (runs --prune --with-outputs)
    left = ready.ssh("node0", f"ls {RUNS}/*/spec.json").stdout.split()
    assert len(left) == 1, left
    assert ROOT.exists()


def test_detached_ranks_run_as_the_training_user(ready: Cluster, tmp_path):
    """The cluster's inventory trains as root (said explicitly); here the default user train."""
    data = yaml.safe_load(ready.inventory.read_text())
    del data["train_user"]
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    r = ready.invoke("bootstrap", "--roles", "train_user", inventory=inventory, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    project = tmp_path / "proj"
    project.mkdir()
    (project / "job.py").write_text(textwrap.dedent(ESCAPING))
    run_id = new_run_id("user")
    r = ready.invoke(
        "train", "--project-dir", str(project), "--script", "job.py", "--nproc-per-node", "2",
        "--run-id", run_id, "--detach", inventory=inventory, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    ranks_up(ready, run_id, r"rank \d up", 4)
    for n in NODES:
        pids = run_pids(ready, n, run_id)
        uids = ready.ssh(n, "; ".join(f"stat -c %u /proc/{p}" for p in pids)).stdout.split()
        assert pids and set(uids) == {"2000"}, (n, pids, uids)  # torchrun and every rank
    s = ready.invoke("stop", run_id, inventory=inventory, timeout=120)
    assert s.returncode == 0 and "nothing left" in s.stdout, s.stdout + s.stderr
    assert not any(run_pids(ready, n, run_id) for n in NODES)


def test_a_dead_worker_node_stops_the_others(ready: Cluster):
    run_id = new_run_id("dead")
    detach(ready, run_id, SLOW)
    ranks_up(ready, run_id, r"first step", 4)
    stopped = subprocess.run(
        [*INVOKE, "sandbox.stop", "--nodes", "node1"], cwd=ready.dir, env=ready.env(), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    since = time.monotonic()
    try:
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        took = gone_after(ready, run_id, since, nodes=("node0",), within=30)
        view = runs(ready)[run_id]
        assert view["state"] in ("LOST", "FAILED") and "node1" in view["why"], view
        print(f"\nFIGURE gang stop without controller (dead node) {took:.2f}s")
    finally:  # node1 back up, as the other fault tests leave their nodes
        ready.invoke("sandbox.start", "--nodes", "node1", timeout=300)


def test_an_ended_run_stays_succeeded_while_a_node_is_down(ready: Cluster):
    """History never lies (issue 24): once `runs` saw a run end, a node down later is shown
    beside the recorded verdict, never as LOST."""
    run_id = new_run_id("hist")
    detach(ready, run_id, SHORT)
    assert wait_state(ready, run_id, ("SUCCEEDED", "FAILED", "STOPPED", "LOST"))["state"] == (
        "SUCCEEDED"
    )
    stopped = subprocess.run(
        [*INVOKE, "sandbox.stop", "--nodes", "node1"], cwd=ready.dir, env=ready.env(), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    try:
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        view = runs(ready)[run_id]
        assert view["state"] == "SUCCEEDED", view
        assert "node1 unreachable" in view["why"] and view["why"].endswith(" now"), view
        assert list(view["unreachable_now"]) == ["node1"], view
        table = ready.invoke("runs", timeout=120).stdout
        assert re.search(rf"{run_id}\s.*SUCCEEDED", table), table
    finally:  # node1 back up, as the other fault tests leave their nodes
        ready.invoke("sandbox.start", "--nodes", "node1", timeout=300)


# On node0, as `nobody` (its effective uid: the sockets are nobody's): wait until something
# listens on the port (the master's preflight holds it), then retry bind+listen every
# millisecond, as a local user taking the port would. Once it has the port it says whether the
# ranks there (the children of state.json's torchrun, read as root again) had all ended by then
# (torchrun's store closes the port before torchrun exits), and keeps it; "never" once stdin
# closes.
SQUATTER = """
import json, os, select, socket, sys
port, run = int(sys.argv[1]), sys.argv[2]
os.setegid(65534)
os.seteuid(65534)
def listening():
    with open("/proc/net/tcp") as f:
        return any(l.split()[1].endswith(":%04X" % port) and l.split()[3] == "0A" for l in f)
def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[:2]
    except OSError:
        return "X", 0
def ranks_ended():
    os.seteuid(0)
    try:
        with open(f"/var/lib/ddpfleet/runs/{run}/state.json") as f:
            agent = json.load(f)["pid"]
    except (OSError, ValueError, KeyError):
        return False  # torchrun not started yet
    kids = [stat(p) for p in os.listdir("/proc") if p.isdigit()]
    return not any(s not in "ZX" and int(ppid) == agent for s, ppid in kids)
while not listening():
    select.select([], [], [], 0.001)
print("armed", flush=True)
while not select.select([sys.stdin], [], [], 0.001)[0]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("0.0.0.0", port))
        s.listen()
    except OSError:
        s.close()
        continue
    print("bound", "after the ranks" if ranks_ended() else "while the run lived", flush=True)
    sys.stdin.read()
    sys.exit()
print("never", flush=True)
"""


def squatted(cluster: Cluster, port: int) -> tuple[str, dict]:
    """A short detached run while SQUATTER on node0 tries to take its master port: what the
    squatter said (it saw the preflight's listener) and the run's final view."""
    run_id = new_run_id("held")
    loop = subprocess.Popen(
        _ssh_argv(cluster, "node0", shlex.join(["python3", "-c", SQUATTER, str(port), run_id])),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        detach(cluster, run_id, SHORT, "--master-port", str(port))
        view = wait_state(cluster, run_id, ("SUCCEEDED", "FAILED", "STOPPED", "LOST"))
    finally:
        said, _ = loop.communicate("", timeout=30)
    assert said.startswith("armed"), said
    return said, view


def test_the_master_port_is_never_free_for_a_local_user_during_a_detached_start(ready: Cluster):
    """Review 2026-12-06 #5: the held port goes from the master's preflight to its supervisor's
    torchrun (its store adopts the socket); a local user retrying the port never gets it."""
    said, view = squatted(ready, 29743)
    assert "while the run lived" not in said, (said, view)
    assert view["state"] == "SUCCEEDED", (view, said)
