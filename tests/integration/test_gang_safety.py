"""The gang's safety on real sandbox nodes: a frozen controller, daemons left by ranks, a taken
master port. Each job is a small script in its own project dir (synced like any project); every
process of a run carries its DDPFLEET_RUN_ID, so /proc/*/environ says what is left of it.
"""

from __future__ import annotations

import signal
import textwrap
import time
from pathlib import Path

from tests.integration.conftest import Cluster
from tests.integration.test_train import (  # noqa: F401 (the `ready` fixture)
    NODES,
    Live,
    new_run_id,
    ready,
    run_pids,
    wait_gone,
)

WATCHDOG_S = 30  # launch.WATCHDOG_S: the runner's limit for a silent controller
SLACK_S = 30

CHATTY = """
import sys, time
print("first output", flush=True)
while True:
    sys.stdout.write("x" * 10000 + "\\n")
    time.sleep(0.001)
"""
# Rank 0 leaves a double-forked daemon (own session, SIGTERM ignored); rank 1 raises.
DAEMON_AND_FAILURE = """
import os, signal, time
rank = int(os.environ["RANK"])
if rank == 0 and os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(1)
    os._exit(0)
print(f"rank {rank} up", flush=True)
time.sleep(2)
if rank == 1:
    raise RuntimeError("injected failure")
time.sleep(600)
"""
SLOW_OK = """
import os, time
print(f"rank {os.environ['RANK']} up", flush=True)
time.sleep(8)
"""


def project(tmp_path: Path, source: str) -> Path:
    d = tmp_path / "proj"
    d.mkdir(exist_ok=True)
    (d / "job.py").write_text(textwrap.dedent(source))
    return d


def job_args(run_id: str, proj: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--project-dir",
        str(proj),
        "--script",
        "job.py",
        "--nproc-per-node",
        "1",
        "--run-id",
        run_id,
        *extra,
    ]


def run_cgroups(c: Cluster, node: str, run_id: str) -> dict[str, list[str]]:
    """The node's cgroup of the run (the runner's: <cgroup2>/ddpfleet/<run>.<node>), with the
    pids it holds (sandbox nodes share the host's cgroup tree, so each sees the others')."""
    out = c.ssh(
        node,
        f"for d in $(awk '$3 == \"cgroup2\" {{print $2}}' /proc/self/mounts); do "
        f"for g in $d/ddpfleet/{run_id}.{node}; do [ -d $g ] && echo $g $(cat $g/cgroup.procs); "
        "done; done; true",
    ).stdout
    return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}


def test_a_frozen_controller_with_a_chatty_job_still_stops_the_run(ready: Cluster, tmp_path):
    run_id = new_run_id("frozen")
    live = Live(ready, job_args(run_id, project(tmp_path, CHATTY)))
    live.wait_for(r"first output", count=2)
    frozen = time.monotonic()
    live.proc.send_signal(signal.SIGSTOP)  # Ctrl-Z, a laptop lid: alive, reading nothing
    try:
        wait_gone(ready, run_id, frozen, within=WATCHDOG_S + SLACK_S)
    finally:
        live.proc.kill()
        live.proc.send_signal(signal.SIGCONT)
        live.finish(timeout=30)


def test_a_rank_daemon_is_gone_after_another_rank_fails(ready: Cluster, tmp_path):
    run_id = new_run_id("daemon")
    r = ready.invoke(*job_args(run_id, project(tmp_path, DAEMON_AND_FAILURE)), timeout=300)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    assert "node1 rank 1 failed first" in r.stderr, r.stderr[-2000:]
    assert not any(run_pids(ready, n, run_id) for n in NODES)
    assert not any(run_cgroups(ready, n, run_id) for n in NODES)


def test_a_sigkilled_runner_still_takes_its_run_with_it(ready: Cluster, tmp_path):
    run_id = new_run_id("runner")
    live = Live(
        ready,
        job_args(
            run_id,
            project(
                tmp_path,
                DAEMON_AND_FAILURE.replace(
                    'raise RuntimeError("injected failure")', "time.sleep(600)"
                ),
            ),
        ),
    )
    live.wait_for(r"rank \d up", count=2)
    # The runner: the parent of torchrun (the process in its own session that leads it).
    runner = ready.ssh(
        "node0",
        f"for p in $(grep -l -a -s 'DDPFLEET_RUN_ID={run_id}' "
        "/proc/[0-9]*/environ | cut -d/ -f3); do "
        "ps -o ppid= -o args= -p $p; done | "
        "awk '/torch.distributed.run/ {print $1; exit}'",
    ).stdout.strip()
    assert runner.isdigit(), runner
    # Attached runs have their own cgroup, as detached ones: torchrun, the ranks and the
    # daemon are in it, the runner and its guardian (which kill it) are not.
    (path, held), *more = run_cgroups(ready, "node0", run_id).items()
    assert not more and path.endswith(f"/ddpfleet/{run_id}.node0"), (path, more)
    in_run = set(run_pids(ready, "node0", run_id)) - {runner}
    assert len(in_run) >= 4 and in_run - set(held) == {ready.ssh(
        "node0", f"ps -o ppid= -p {runner}").stdout.strip()}, (in_run, held)  # fmt: skip
    killed = time.monotonic()
    assert ready.ssh("node0", f"kill -KILL {runner}").returncode == 0
    code = live.finish(timeout=60)
    assert code != 0
    assert "the node's runner was killed (SIGKILL)" in live.text, live.text[-3000:]
    wait_gone(ready, run_id, killed, within=20)
    assert not any(run_cgroups(ready, n, run_id) for n in NODES)


def test_a_second_run_on_the_same_port_is_refused_while_the_first_completes(
    ready: Cluster, tmp_path
):
    port = "29741"
    first, second = new_run_id("porta"), new_run_id("portb")
    a = Live(ready, job_args(first, project(tmp_path, SLOW_OK), "--master-port", port))
    a.wait_for(r"^code: ")  # synced: the launch window (port held, torchrun not yet up)
    b = ready.invoke(*job_args(second, tmp_path / "proj", "--master-port", port), timeout=120)
    assert b.returncode == 1, b.stdout[-2000:] + b.stderr[-2000:]
    assert f"node0: master port {port} is not free" in b.stderr
    assert "nothing was started" in b.stderr
    assert a.finish(timeout=120) == 0, a.text[-3000:]
    assert "node0: ok (exit 0" in a.text and "node1: ok (exit 0" in a.text
    assert not any(run_pids(ready, n, second) for n in NODES)
