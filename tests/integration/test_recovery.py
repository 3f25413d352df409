"""Self-healing detached runs on real sandbox nodes: 3 nodes + 1 spare, 2 ranks each, the
deterministic scripts/train_ddp.py (its data per step depends on (seed, step) only).

What a user would check: `runs --json` (state, generations), `logs` (the recovery lines, the
final model's sha256), and /proc/*/environ on every node for the run's DDPFLEET_RUN_ID. The
figures (kill -> the new generation's first step, the checkpoint's transfer) are printed for
the note (pytest -s), not asserted to the tenth.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.integration.conftest import Cluster, Four
from tests.integration.test_detach import RUNS, runs, wait_state
from tests.integration.test_train import new_run_id, run_pids, train_args

GANG = ("node0", "node1", "node2")
NODES = (*GANG, "node3")
# 6 epochs of 4 steps, a checkpoint every 2 steps: long enough to lose a node mid-run, short
# enough for the suite. The sleep changes nothing in the weights, only the timing.
SCRIPT = "--epochs 6 --steps-per-epoch 4 --batch-size 8 --checkpoint-every 2"
SLOW = SCRIPT + " --step-sleep 0.5"
SHA = re.compile(r"final model sha256 ([0-9a-f]{64})")
TRAIN = {"name": "train", "uid": 2000, "gid": 2000}


@pytest.fixture(scope="module")
def four(grown_four: Four, tmp_path_factory) -> Iterator[Cluster]:
    """The session's sandbox grown to 4 nodes with the training env (conftest.py), lent to this
    module with an inventory of its own; given back as found (nodes started, links up).
    Training as `train` (uid 2000), as a new project does: the recovery's checkpoint work is
    then done by a child dropped to that user beside the supervisor's reaper (trained as root
    it is done in place, and a lost exit there went unseen: bench/recovery.py found it)."""
    with grown_four.lend(tmp_path_factory.mktemp("recover"), train_user=TRAIN) as c:
        made = c.invoke("bootstrap", "--roles", "train_user", timeout=300)
        assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-2000:]
        yield c


def start(c: Cluster, run_id: str, script_args: str, *extra: str, gang=GANG) -> None:
    args = train_args(run_id, script_args, "--nodes", ",".join(gang), "--detach", *extra)
    r = c.invoke(*args, "--no-health-gate", timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def step_on(c: Cluster, node: str, run_id: str) -> int:
    out = c.ssh(node, f"cat {RUNS}/{run_id}/progress/progress.json 2>/dev/null").stdout
    try:
        return json.loads(out)["step"]
    except (ValueError, KeyError):
        return -1


def wait_step(c: Cluster, run_id: str, step: int, within: float = 120) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if step_on(c, "node0", run_id) >= step:
            return
        time.sleep(0.2)
    pytest.fail(f"{run_id}: step {step} not reached within {within}s")


def final_sha(c: Cluster, run_id: str) -> str:
    out = c.invoke("logs", run_id, timeout=60).stdout
    found = SHA.findall(out)
    assert len(found) == 1, out[-4000:]
    return found[0]


def ended(c: Cluster, run_id: str, within: float = 300) -> dict:
    """The run's view once it ended; its logs and the master's record in the failure."""
    try:
        return wait_state(c, run_id, ("SUCCEEDED", "FAILED", "STOPPED", "LOST"), within=within)
    except BaseException:
        print(c.invoke("logs", run_id, timeout=60).stdout[-6000:])
        print(
            c.ssh("node0", f"cat {RUNS}/{run_id}/state.json {RUNS}/{run_id}/supervisor.log").stdout
        )
        raise


def cgroup_pids(c: Cluster, node: str, run_id: str) -> list[str]:
    """The node's processes grouped with the run: whose /proc/PID/cgroup names it (the run's
    own cgroup v2, ddpfleet/<run>.<node>, or its systemd unit), and what that cgroup's
    cgroup.procs holds. Sandbox nodes share the host's cgroup2 tree (bind-mounted), their
    runs' cgroups named by node, so each node reads its own."""
    out = c.ssh(
        node,
        f"grep -l -s -e '{run_id}' /proc/[0-9]*/cgroup | cut -d/ -f3; "
        "for m in $(awk '$3 == \"cgroup2\" {print $2}' /proc/self/mounts); do "
        f"cat $m/ddpfleet/{run_id}.{node}/cgroup.procs 2>/dev/null; done; true",
    ).stdout
    return sorted(set(out.split()))


def nothing_left(c: Cluster, run_id: str, nodes=NODES) -> None:
    """Nothing of the run on these nodes: by the run's id in /proc/*/environ, and by cgroup.
    Each node must answer first: on a stopped one both would find nothing and pass unseen."""
    silent = [n for n in nodes if c.ssh(n, "true").returncode != 0]
    assert not silent, f"{run_id}: cannot look on {silent} (stopped or cut off)"
    left = {n: run_pids(c, n, run_id) + cgroup_pids(c, n, run_id) for n in nodes}
    assert not any(left.values()), left


def stop_node(c: Cluster, node: str) -> None:
    """`sandbox.stop` of one node: its init killed, so every process in it (a dead machine)."""
    stop = c.invoke("sandbox.stop", "--nodes", node, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr


def start_nodes(c: Cluster, nodes: str) -> None:
    """`sandbox.start` of stopped nodes (comma-separated): a machine booted again."""
    up = c.invoke("sandbox.start", "--nodes", nodes, timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr


def healed(c: Cluster, run_id: str, reference: str, nodes: list[str]) -> list[dict]:
    """The run's generations once it ended SUCCEEDED with the uninterrupted run's weights, its
    second generation on `nodes`."""
    view = ended(c, run_id)
    assert view["state"] == "SUCCEEDED", view
    assert final_sha(c, run_id) == reference
    gens = view["generations"]
    assert [g["nodes"] for g in gens] == [list(GANG), nodes], gens
    return gens


@pytest.fixture(scope="module")
def reference(four: Cluster) -> str:
    """An uninterrupted run's final model sha256 (3 nodes, no spare, no sleep)."""
    run_id = new_run_id("ref")
    start(four, run_id, SCRIPT)
    view = ended(four, run_id, 240)
    assert view["state"] == "SUCCEEDED", view
    return final_sha(four, run_id)


@pytest.mark.timeout(1200)  # first in a session, its fixtures bootstrap 4 nodes (6-7 min)
def test_a_lost_worker_is_replaced_and_the_run_ends_as_if_uninterrupted(
    four: Cluster, reference: str
):
    """A 2 s blip on node2 first (shorter than the lifelines' silence window: nothing), then
    node1 stopped mid-run: node3 takes its node_rank, the run resumes and ends as the
    uninterrupted run did, with one recovery only."""
    run_id = new_run_id("heal")
    start(four, run_id, SLOW, "--spares", "node3")
    wait_step(four, run_id, 3)
    link(four, "node2", "down")
    time.sleep(2)
    link(four, "node2", "up")
    wait_step(four, run_id, 9)
    killed = time.time()
    stop_node(four, "node1")
    try:
        gens = healed(four, run_id, reference, ["node0", "node3", "node2"])
        (replaced,) = gens[1]["replaced"]
        assert (replaced["lost"], replaced["by"], replaced["node_rank"]) == ("node1", "node3", 1)
        assert gens[1]["resumed_step"] >= 8 and gens[1]["first_step"], gens
        logs = four.invoke("logs", run_id, timeout=60).stdout
        assert "node3 takes node_rank 1 of node1" in logs, logs[-4000:]
        print(  # the note's figures
            f"\nrecovery: kill -> first step {gens[1]['first_step'] - killed:.1f}s "
            f"(loss seen -> first step {gens[1]['recovery_s']:.1f}s); the checkpoint of step "
            f"{gens[1]['resumed_step']} on every node in {gens[1]['checkpoint_s'] * 1000:.0f} ms "
            f"({gens[1]['checkpoint_nodes']})"
        )
    finally:
        start_nodes(four, "node1")
    nothing_left(four, run_id)
    # --resume starts where the newest checkpoints are: the last generation's nodes, node3 in
    # node1's place (node1, back, holds only older ones); its spare was used, so none now
    again = new_run_id("healed")
    r = four.invoke(*train_args(again, "", "--resume", run_id), "--no-health-gate", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert f"nodes: node0,node3,node2 (from {run_id}'s generation 2)" in r.stdout, r.stdout
    assert "spares:" not in r.stdout, r.stdout
    view = ended(four, again, 180)
    assert (view["state"], view["nodes"]) == ("SUCCEEDED", ["node0", "node3", "node2"]), view
    assert final_sha(four, again) == reference


def test_a_rank_raising_uses_no_spare_and_names_node_and_rank(four: Cluster):
    run_id = new_run_id("raise")
    start(four, run_id, SCRIPT + " --fail-at-step 3 --fail-rank 3", "--spares", "node3")
    view = ended(four, run_id, 180)
    assert view["state"] == "FAILED", view
    assert (view["failed_node"], view["failed_rank"]) == ("node1", 3), view
    assert len(view["generations"]) == 1, view
    nothing_left(four, run_id)


def link(c: Cluster, node: str, state: str) -> None:
    """The host end of the node's veth, down or up: the node cut off, its processes alive."""
    veth = f"{c.data['sandbox']['prefix']}-{node.removeprefix('node')}h"
    subprocess.run(["ip", "link", "set", veth, state], check=True)


def wait_generation(c: Cluster, run_id: str, count: int, within: float = 180) -> dict:
    """The run's view once its generation `count` made its first step."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        view = runs(c).get(run_id) or {}
        gens = view.get("generations") or []
        if len(gens) >= count and gens[count - 1].get("first_step"):
            return view
        if view.get("state") in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(0.5)
    pytest.fail(f"{run_id}: no generation {count} stepping within {within}s: {view}")


def test_a_partitioned_node_stops_itself_and_out_of_spares_is_failed(four: Cluster):
    run_id = new_run_id("zombie")
    start(four, run_id, SLOW, "--spares", "node3")
    wait_step(four, run_id, 4)
    link(four, "node1", "down")  # node1 lives on, cut off: the master replaces it
    try:
        view = wait_generation(four, run_id, 2)
    finally:
        link(four, "node1", "up")
    assert view["generations"][1]["replaced"][0]["lost"] == "node1", view
    # node1 stopped its own part when the master went silent; seen again, it runs nothing
    deadline = time.monotonic() + 30
    while run_pids(four, "node1", run_id) and time.monotonic() < deadline:
        time.sleep(0.5)
    nothing_left(four, run_id, ("node1",))
    stop_node(four, "node3")
    try:
        view = ended(four, run_id, 180)
        assert view["state"] == "FAILED", view
        assert view["why"].startswith("node3 lost, no spare left"), view
        nothing_left(four, run_id, GANG)
    finally:
        start_nodes(four, "node3")
    nothing_left(four, run_id)


def partial(c: Cluster, node: str, run_id: str, step: int) -> list[str]:
    """The files of the node's step-<step> checkpoint while it has no MANIFEST.json (being
    written), else []."""
    path = f"{RUNS}/{run_id}/checkpoints/step-{step:08d}"
    out = c.ssh(node, f"test -d {path} && ! test -e {path}/MANIFEST.json && ls {path}").stdout
    return out.split()


@pytest.mark.timeout(1200)  # alone, its fixtures bootstrap 4 nodes
def test_a_node_lost_while_a_checkpoint_is_written_resumes_from_the_complete_one(
    four: Cluster, reference: str
):
    """node1 stopped while node0's rank 0 is inside the checkpoint of step 10 (its files
    written, its manifest held back 20 s): the gang is fenced with that checkpoint partial, the
    new generation resumes from step 8, the newest complete one, never from the partial 10,
    and the run ends as the uninterrupted one did. Also: the run's processes were in its
    cgroup while it ran, so nothing_left's cgroup check sees what it must."""
    run_id = new_run_id("torn")
    start(four, run_id, SLOW + " --write-sleep 20 --write-sleep-at 10", "--spares", "node3")
    deadline = time.monotonic() + 120
    while not {"model.pt", "optimizer.pt"} <= set(partial(four, "node0", run_id, 10)):
        assert time.monotonic() < deadline, f"{run_id}: no partial step 10 on node0 in 120s"
        time.sleep(0.2)
    assert cgroup_pids(four, "node0", run_id), "the run's ranks are not in its cgroup"
    stop_node(four, "node1")
    try:
        gens = healed(four, run_id, reference, ["node0", "node3", "node2"])
        assert gens[1]["resumed_step"] == 8, gens
        logs = four.invoke("logs", run_id, timeout=60).stdout
        resumed = re.findall(r"rank \d+: resumed from epoch \d+ step (\d+)", logs)
        assert sorted(set(resumed)) == ["8"] and len(resumed) >= 6, logs[-4000:]
        assert "resuming from step 8" in logs, logs[-4000:]
    finally:
        start_nodes(four, "node1")
    nothing_left(four, run_id)


def test_the_plan_lists_a_spare_as_a_spare(four: Cluster):
    """train --dry-run --detach --spares node3: node3 checked like the nodes, but no table row,
    no node_rank 3, and --nnodes counts the gang."""
    run_id = new_run_id("plan")
    args = train_args(run_id, SCRIPT, "--nodes", ",".join(GANG), "--detach", "--spares", "node3")
    r = four.invoke(*args, "--dry-run", "--no-health-gate", timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    rows = [[w for w in line.split() if w.strip("│┃|")][:1] for line in r.stdout.splitlines()]
    assert f"spares: node3 at {four.address('node3')} (standing by" in r.stdout, r.stdout
    assert ["node2"] in rows and ["node3"] not in rows, r.stdout
    assert "--nnodes 3 " in r.stdout and f"run {run_id}: 3 node(s) x 2" in r.stdout, r.stdout
    assert "node3 " in r.stdout.split("code (not sent):")[1], r.stdout  # checked and compared


@pytest.mark.timeout(1200)  # alone, its fixtures bootstrap 4 nodes (6-7 min on a loaded box)
def test_the_masters_loss_elects_a_survivor_and_the_run_ends_as_if_uninterrupted(
    four: Cluster, reference: str
):
    """node0 (the master) stopped mid-run: node1 (the lowest surviving node_rank) leads at
    node_rank 0 on its own address, node3 takes node1's node_rank 1, every node resumes from
    node1's newest complete checkpoint; the run never reads LOST on the way, ends SUCCEEDED
    with the uninterrupted run's weights, and `runs`/`logs` read it from its new master."""
    run_id = new_run_id("heir")
    start(four, run_id, SLOW, "--spares", "node3")
    wait_step(four, run_id, 9)
    killed = time.time()
    stop_node(four, "node0")
    try:
        seen = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            view = runs(four).get(run_id) or {}
            seen.append((view.get("state"), view.get("why")))
            if view.get("state") not in ("RUNNING", "STARTING", None):
                break
            time.sleep(1)
        assert view["state"] == "SUCCEEDED", (view, seen[-5:])
        assert all(state == "RUNNING" for state, _ in seen[:-1]), seen
        assert final_sha(four, run_id) == reference
        gens = view["generations"]
        assert [g["nodes"] for g in gens] == [list(GANG), ["node1", "node3", "node2"]], gens
        (replaced,) = gens[1]["replaced"]
        assert (replaced["lost"], replaced["by"], replaced["node_rank"]) == ("node0", "node3", 1)
        assert (gens[1]["master"], gens[1]["master_lost"]) == ("node1", "node0"), gens
        assert gens[1]["resumed_step"] >= 8 and gens[1]["first_step"], gens
        assert "gen 2: node1 the master for node0, node3 for node0" in view["why"], view
        logs = four.invoke("logs", run_id, timeout=60)
        assert "node1 leads (node_rank 1" in logs.stdout, logs.stdout[-4000:]
        assert "node3 takes node_rank 1 of node0" in logs.stdout, logs.stdout[-4000:]
        assert "node0" in logs.stderr  # the one node it could not read, named
        print(  # the note's figures
            f"\nmaster's loss: kill -> first step {gens[1]['first_step'] - killed:.1f}s "
            f"(loss seen -> first step {gens[1]['recovery_s']:.1f}s); the checkpoint of step "
            f"{gens[1]['resumed_step']} on every node in {gens[1]['checkpoint_s'] * 1000:.0f} ms "
            f"({gens[1]['checkpoint_nodes']})"
        )
    finally:
        start_nodes(four, "node0")
    # back, node0 runs nothing of the run and its stale record does not speak for it
    assert runs(four)[run_id]["state"] == "SUCCEEDED"
    nothing_left(four, run_id)


@pytest.mark.timeout(1200)  # alone, its fixtures bootstrap 4 nodes
def test_two_spares_three_kills_two_recoveries_then_no_spare_left(four: Cluster):
    """A 2-node gang (node0, node1) with spares node2 and node3; node1 stopped -> node2 takes
    node_rank 1 (generation 2), node2 stopped -> node3 takes it (generation 3), node3 stopped
    -> FAILED "node3 lost, no spare left", nothing of the run left on any node.

    The majority rule holds for this shape: generation 1's voters are the four nodes, node0
    reaches node2 and node3 (3 of 4); generation 2's are node0, node2 and the spare node3,
    node0 reaches node3 (2 of 3); with no spare left no majority is asked. A run long enough
    (80 steps) that the third kill always lands mid-run; it ends FAILED well before."""
    run_id = new_run_id("kills")
    long = "--epochs 20 --steps-per-epoch 4 --batch-size 8 --checkpoint-every 2 --step-sleep 0.5"
    start(four, run_id, long, "--spares", "node2,node3", gang=("node0", "node1"))
    try:
        wait_step(four, run_id, 3)
        stop_node(four, "node1")
        wait_generation(four, run_id, 2)
        stop_node(four, "node2")
        wait_generation(four, run_id, 3)
        stop_node(four, "node3")
        view = ended(four, run_id, 180)
        assert view["state"] == "FAILED", view
        assert view["why"].startswith("node3 lost, no spare left"), view
        gens = view["generations"]
        assert [g["nodes"] for g in gens] == [
            ["node0", "node1"],
            ["node0", "node2"],
            ["node0", "node3"],
        ], gens
        assert [(r["lost"], r["by"], r["node_rank"]) for g in gens[1:] for r in g["replaced"]] == [
            ("node1", "node2", 1),
            ("node2", "node3", 1),
        ], gens
        nothing_left(four, run_id, ("node0",))  # the one node still up: the master
    finally:
        start_nodes(four, "node1,node2,node3")
    nothing_left(four, run_id)  # and nothing came back with the stopped nodes


@pytest.mark.timeout(1200)  # alone, its fixtures bootstrap 4 nodes
def test_the_replaced_node_started_again_mid_run_runs_nothing_of_it(four: Cluster, reference: str):
    """node1 stopped, node3 takes its place; node1 started again while generation 2 trains:
    from then on nothing of the run runs on node1 (by run id and by cgroup, watched while the
    run goes on), and the run ends SUCCEEDED with the uninterrupted run's weights, node1 never
    back in its roster. Steps of 1.5 s: generation 2 is still training when node1 is back."""
    run_id = new_run_id("back")
    start(four, run_id, SCRIPT + " --step-sleep 1.5", "--spares", "node3")
    wait_step(four, run_id, 3)
    stop_node(four, "node1")
    try:
        wait_generation(four, run_id, 2)
    finally:
        start_nodes(four, "node1")
    back, step = time.monotonic(), step_on(four, "node0", run_id)
    seen = []  # (seconds since node1 is back, its processes of the run)
    while time.monotonic() < back + 12:
        pids = run_pids(four, "node1", run_id) + cgroup_pids(four, "node1", run_id)
        seen.append((round(time.monotonic() - back, 1), pids))
        time.sleep(0.5)
    view, now = runs(four)[run_id], step_on(four, "node0", run_id)
    print(f"\nnode1 back at step {step}, watched for 12 s until step {now}: {seen[-1]}")
    assert view["state"] == "RUNNING" and now > step, (view, step)
    assert not any(pids for _, pids in seen), seen
    healed(four, run_id, reference, ["node0", "node3", "node2"])
    nothing_left(four, run_id)
