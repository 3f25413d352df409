"""Runs a team can trust (issue 24 items 1, 4, 10), in the new user's shapes, on real nodes:
a 3 x 2 run resumed on a grown inventory, a node stopped and started again, a crash that
torchrun restarts. The session's 2-node sandbox grown to 4 nodes (conftest.py's grown_four:
node2 and node3 made by `sandbox.up` with a 4-node inventory beside the session's, as a user
adds machines); the session's own inventory still names node0 and node1 only.
"""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
import time
from collections.abc import Iterator

import pytest

from tests.integration.conftest import INVOKE, ROOT, Cluster, Four
from tests.integration.test_train import new_run_id

RUNS = "/var/lib/ddpfleet/runs"
ENDED = ("SUCCEEDED", "FAILED", "STOPPED", "LOST")
TINY = "--epochs 2 --steps-per-epoch 3 --batch-size 8"
# A fresh session bootstraps four nodes in the first test's setup: on a loaded 2-core box that
# alone can take longer than pyproject's 600 s per test.
pytestmark = pytest.mark.timeout(1500)

# The new user's own script, the shape of the trial's: gloo all_reduce steps; one rank crashes
# once (only in torchrun's first attempt), so --max-restarts 1 must bring the run home.
CRASH_ONCE = """
import os, sys, time
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
rank, attempt = dist.get_rank(), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
print(f"rank {rank} attempt {attempt} up", flush=True)
for step in range(6):
    t = torch.ones(4)
    dist.all_reduce(t)
    if step == 2 and rank == int(sys.argv[1]) and attempt == 0:
        raise SystemExit(f"rank {rank}: crash once at step {step}")
    time.sleep(0.05)
print(f"rank {rank} attempt {attempt} done {t[0].item():.0f}", flush=True)
dist.destroy_process_group()
"""


class Grown:
    """The session's sandbox with node2 and node3 added: `inventory` names all four."""

    def __init__(self, cluster: Cluster, inventory):
        self.cluster, self.inventory = cluster, inventory
        self.nodes = Cluster(cluster.dir, inventory)  # its ssh() reaches node2 and node3 too

    def invoke(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.cluster.invoke(*args, timeout=timeout, inventory=self.inventory)

    def ok(self, *args: str, timeout: float = 300) -> str:
        r = self.invoke(*args, timeout=timeout)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
        return r.stdout

    def views(self) -> dict[str, dict]:
        return {v["run_id"]: v for v in json.loads(self.ok("runs", "--json", timeout=120))}

    def wait(self, run_id: str, states=ENDED, within: float = 240) -> dict:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            view = self.views().get(run_id)
            if view and view["state"] in states:
                return view
            time.sleep(0.5)
        pytest.fail(f"{run_id} not {states} within {within}s: {self.views().get(run_id)}")

    def sandbox(self, what: str, node: str) -> None:
        r = subprocess.run(
            [*INVOKE, f"sandbox.{what}", "--nodes", node], cwd=self.cluster.dir,
            env=self.cluster.env(DDPFLEET_INVENTORY=str(self.inventory)), capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def grown(cluster: Cluster, grown_four: Four) -> Iterator[Grown]:
    """node2 and node3 up beside the session's node0 and node1, all four bootstrapped (in one
    bootstrap: the nodes converge in parallel): the session's grown sandbox (conftest.py), lent
    with a 4-node inventory of this module's own beside the session's."""
    with grown_four.lend(cluster.dir / "grown") as four:
        yield Grown(cluster, four.inventory)


def project(tmp_path, name: str, text: str):
    d = tmp_path / "proj"
    d.mkdir(exist_ok=True)
    (d / name).write_text(textwrap.dedent(text))
    return d


def test_a_restart_after_a_crash_starts_clean_and_runs_counts_it(grown: Grown, tmp_path):
    """Item 10, detached: rank 3 of a 2 x 2 run crashes once; torchrun's restart 1 must not
    meet the first attempt's leftovers (seen: Gloo connectFullMesh ... Connection refused: the
    restarted workers read the dead ones' addresses from the first attempt's store), and `runs`
    says one restart happened and why."""
    run_id = new_run_id("restart")
    d = project(tmp_path, "crash_once.py", CRASH_ONCE)
    grown.ok(
        "train", "--project-dir", str(d), "--script", "crash_once.py", "--args", "3",
        "--nodes", "node0,node1", "--nproc-per-node", "2", "--max-restarts", "1",
        "--run-id", run_id, "--detach",
    )  # fmt: skip
    view = grown.wait(run_id)
    out = grown.ok("logs", run_id, timeout=120)
    assert "connectFullMesh" not in out, out[-6000:]
    assert view["state"] == "SUCCEEDED", (view, out[-6000:])
    assert len(re.findall(r"rank \d attempt 1 done 4", out)) == 4, out[-4000:]
    assert view["restarts"] == 1, view
    assert view["restart_why"][0].startswith("node1 ") and "rank 3 exit" in view["restart_why"][0]
    table = grown.ok("runs")
    assert re.search(rf"{run_id}\s.*SUCCEEDED.*restarts 1 \(node1 ", table), table


def test_an_attached_run_with_restarts_is_listed_with_its_shape_and_restarts(
    grown: Grown, tmp_path
):
    """Items 4 and 10, attached: the gang lets torchrun restart (it used to stop every node at
    the first failed rank), and the run is in `runs`: its verdict, shape, restarts."""
    run_id = new_run_id("att")
    d = project(tmp_path, "crash_once.py", CRASH_ONCE)
    out = grown.ok(
        "train", "--project-dir", str(d), "--script", "crash_once.py", "--args", "1",
        "--nodes", "node0,node1", "--nproc-per-node", "2", "--max-restarts", "1",
        "--run-id", run_id,
    )  # fmt: skip
    assert "stopping every node" not in out, out[-4000:]
    assert len(re.findall(r"rank \d attempt 1 done 4", out)) == 4, out[-4000:]
    view = grown.views()[run_id]
    assert view["state"] == "SUCCEEDED" and view["attached"], view
    assert (view["nodes"], view["nproc"], view["port"]) == (["node0", "node1"], 2, 29500), view
    assert view["restarts"] == 1 and view["restart_why"][0].startswith("node0 "), view
    assert view["outputs"] == f"{RUNS}/{run_id}/checkpoints"


@pytest.fixture(scope="module")
def three_by_two(grown: Grown) -> str:
    """A 3 x 2 detached run on node0-node2 of the 4 (a checkpoint each epoch), ended."""
    run_id = new_run_id("3x2")
    grown.ok(
        "train", "--project-dir", str(ROOT), "--nodes", "node0,node1,node2",
        "--nproc-per-node", "2", "--args", f"{TINY} --checkpoint-dir ckpt", "--run-id", run_id,
        "--detach",
    )  # fmt: skip
    assert grown.wait(run_id)["state"] == "SUCCEEDED"
    return run_id


def test_a_3x2_run_resumed_on_a_grown_inventory_keeps_its_shape(grown: Grown, three_by_two):
    """Item 1: no --nodes, no --nproc-per-node: RUN's 3 nodes (not all 4: node3 has no copy of
    RUN) x 2 processes (not auto's 1), and the plan says they came from RUN."""
    run_id = new_run_id("again")
    out = grown.ok("train", "--project-dir", str(ROOT), "--resume", three_by_two,
                   "--run-id", run_id)  # fmt: skip
    assert f"nodes: node0,node1,node2 (from {three_by_two})" in out, out[-3000:]
    assert f"nproc-per-node: 2 (from {three_by_two})" in out
    assert f"master-port: 29500 (from {three_by_two})" in out
    assert f"launcher: ssh (from {three_by_two})" in out
    assert "3 node(s) x 2 process(es)" in out
    view = grown.wait(run_id)
    assert view["state"] == "SUCCEEDED" and view["nodes"] == ["node0", "node1", "node2"], view
    ranks = set(re.findall(r"^\[node\d r(\d)\]", grown.ok("logs", run_id), re.MULTILINE))
    assert ranks == {"0", "1", "2", "3", "4", "5"}


def test_a_node_stopped_and_started_keeps_its_runs_and_history(grown: Grown, three_by_two):
    """Item 4: while node2 is down the ended run is still SUCCEEDED, node2 'unreachable now'
    beside it; started again, node2 has the run's records (its /var/lib/ddpfleet is a disk,
    not a tmpfs), so nothing says 'no record of the run'."""
    grown.sandbox("stop", "node2")
    try:
        view = grown.views()[three_by_two]
        assert view["state"] == "SUCCEEDED" and list(view["unreachable_now"]) == ["node2"], view
        assert view["why"].endswith(" now"), view
    finally:
        grown.sandbox("start", "node2")
    view = grown.views()[three_by_two]
    assert view["state"] == "SUCCEEDED" and view["unreachable_now"] == {}, view
    assert view["exits"] == {"node0": 0, "node1": 0, "node2": 0}, view
    r = grown.nodes.ssh("node2", f"test -f {RUNS}/{three_by_two}/state.json")
    assert r.returncode == 0, "node2 lost the run's records across stop/start"
    stop = grown.ok("stop", three_by_two, timeout=120)
    assert "no record" not in stop, stop


def test_runs_pruned_from_their_nodes_leave_the_index(grown: Grown, three_by_two):
    """Item 4: a run `runs --prune` removed from its nodes is gone from `runs`, also when the
    inventory has a node that never ran it (node3; it used to stay, as LOST)."""
    assert three_by_two in grown.views()
    r = grown.ok("runs", "--prune", "--keep", "1", timeout=180)
    assert three_by_two in r, r
    assert three_by_two not in grown.views()
    index = grown.inventory.parent / ".ddpfleet" / "runs.jsonl"
    assert three_by_two not in index.read_text()
