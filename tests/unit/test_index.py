"""ddpfleet.launch.index: the controller's runs.jsonl, and history that never lies (issue 24)."""

from __future__ import annotations

import json

from ddpfleet.launch.index import Attached, Index, holds, shape
from ddpfleet.launch.outcome import Outcome
from ddpfleet.launch.ssh.runstate import fold, held, rows
from ddpfleet.launch.verdict import RunState

ORDER = ("node0", "node1")
TAIL = ["[default1]:[rank3]: Traceback (most recent call last):",
        "[default1]:[rank3]: RuntimeError: rank 3: injected failure at step 40"]  # fmt: skip


def part(status: str, **kw) -> dict:
    return {"status": status, "alive": False, "started": 100.0, "ended": 110.0, "rank": 0,
            "nproc": 2, "exit_code": 0 if status == "SUCCEEDED" else 1, **kw}  # fmt: skip


def ended(status: str) -> dict:
    if status == "FAILED":
        return {"node0": part("STOPPED", reason="gang: node1 failed"),
                "node1": part("FAILED", rank=1, tail=TAIL)}  # fmt: skip
    return {n: part(status, reason="stopped by invoke stop") for n in ORDER}


def index_with(tmp_path, *run_ids) -> Index:
    index = Index(tmp_path)
    for run_id in run_ids:
        index.add(run_id, ORDER)
    return index


def test_a_final_verdict_stays_when_a_node_is_down_later(tmp_path):
    for status in ("SUCCEEDED", "FAILED", "STOPPED"):
        index = index_with(tmp_path / status, "r")
        seen = index.settle([fold("r", ORDER, ended(status))])[0]
        assert seen.state is RunState(status)
        down = dict(ended(status), node1="unreachable (timed out)")
        assert fold("r", ORDER, down).state is RunState.LOST  # what the nodes alone say now
        later = index.settle([fold("r", ORDER, down)])[0]
        assert later.state is RunState(status), later
        assert later.why.endswith("node1 unreachable (timed out) now"), later.why
        assert (later.failed_node, later.failed_rank) == (seen.failed_node, seen.failed_rank)
        assert later.started == 100.0 and later.ended == 110.0
        assert later.as_json()["unreachable_now"] == {"node1": "unreachable (timed out)"}
        assert rows([later], now=200.0)[0][1] == status
    # rebuilt: the node is back without its record; the verdict is still the recorded one
    rebuilt = index.settle([fold("r", ORDER, dict(ended("STOPPED"), node1=None))])[0]
    assert rebuilt.state is RunState.STOPPED and "now" not in rebuilt.why


def test_a_recorded_verdict_keeps_the_runs_generations(tmp_path):
    """A run with spares (node/generation.py): once SUCCEEDED is recorded, `runs` still shows
    which node replaced which, whatever the nodes say later (the spare gone, node1 rebuilt)."""
    gens = [{"generation": 1, "nodes": ["node0", "node1"]},
            {"generation": 2, "nodes": ["node0", "node2"], "recovery_s": 23.0,
             "replaced": [{"lost": "node1", "by": "node2", "why": "silent", "node_rank": 1}]}]  # fmt: skip
    index = index_with(tmp_path, "r")
    parts = dict(ended("SUCCEEDED"))
    parts["node0"] = dict(parts["node0"], generations=gens)
    seen = index.settle([fold("r", ORDER, parts)])[0]
    assert seen.state is RunState.SUCCEEDED and len(seen.generations) == 2
    later = index.settle([fold("r", ORDER, dict(parts, node0="unreachable (timed out)"))])[0]
    assert later.state is RunState.SUCCEEDED
    assert later.as_json()["generations"] == gens


def test_only_final_verdicts_are_recorded(tmp_path):
    index = index_with(tmp_path, "r")
    running = {n: part("RUNNING", alive=True, ended=None) for n in ORDER}
    assert index.settle([fold("r", ORDER, running)])[0].state is RunState.RUNNING
    lost = dict(running, node1="unreachable (timed out)")
    assert index.settle([fold("r", ORDER, lost)])[0].state is RunState.LOST
    assert "verdict" not in index.entry("r")  # LOST may still turn out otherwise
    assert index.settle([fold("r", ORDER, ended("SUCCEEDED"))])[0].state is RunState.SUCCEEDED
    assert index.entry("r")["verdict"]["state"] == "SUCCEEDED"


def test_settling_keeps_the_index_whole_and_prune_still_drops(tmp_path):
    index = index_with(tmp_path, "a", "b")
    index.add("s", ORDER, launcher="slurm", job_id="42")
    unknown = fold("x", ORDER, ended("SUCCEEDED"))  # known only from its nodes: shown as read
    index.settle([fold("a", ORDER, ended("FAILED")), unknown])
    lines = [json.loads(line) for line in index.path.read_text().splitlines()]
    assert [e["run_id"] for e in lines] == ["a", "b", "s"] and lines[2]["job_id"] == "42"
    assert lines[0]["verdict"]["failed_node"] == "node1" and "verdict" not in lines[1]
    index.drop(["a"])
    assert [e["run_id"] for e in index.entries()] == ["b", "s"]


def plan(run_id: str, nproc: int = 2, port: int = 29500):
    from ddpfleet.launch.plan import NodePlan, Plan

    nodes = tuple(NodePlan(n, i, f"10.0.0.{i}", (), {}, "/c", "/l") for i, n in enumerate(ORDER))
    return Plan(run_id, ORDER[0], "10.0.0.0", port, nproc, "t.py", nodes)


def test_the_index_keeps_each_runs_shape_and_where_its_outputs_are(tmp_path):
    index = Index(tmp_path)
    index.add("r", ORDER, launcher="ssh", **shape(plan("r", nproc=2, port=29511)))
    seen = index.settle([fold("r", ORDER, ended("SUCCEEDED"))])[0].as_json()
    assert {k: seen[k] for k in ("launcher", "nproc", "port", "attached", "outputs")} == {
        "launcher": "ssh", "nproc": 2, "port": 29511, "attached": False,
        "outputs": "/var/lib/ddpfleet/runs/r/checkpoints",
    }  # fmt: skip
    assert rows([index.settle([fold("r", ORDER, ended("SUCCEEDED"))])[0]], now=200.0)[0][3] == "2x2"


def test_an_attached_run_is_listed_from_its_start_and_its_verdict_kept(tmp_path):
    index = Index(tmp_path)
    attached = Attached(index, "ssh")
    attached.started(plan("a"))
    entry = index.entry("a")
    assert entry["attached"] and entry["nproc"] == 2 and holds(entry)  # this process holds it
    assert held(entry, holds(entry)).state is RunState.RUNNING
    failed = Outcome("node1", RunState.FAILED, exit_code=1, rank=3, last_lines=("boom",))
    restart = "ddpfleet: restart 1 of 2 after rank 3 exit 1 at 5.000"
    attached.ended(plan("a"), [Outcome("node0", RunState.STOPPED, exit_code=-15), failed],
                   "node1 failed", {"node0": [], "node1": [restart]})  # fmt: skip
    view = index.settle([held(index.entry("a"), False)])[0]
    assert view.state is RunState.FAILED and view.why == "node1 rank 3 failed first (exit 1)"
    assert view.restarts == ("node1 rank 3 exit 1",) and view.recorded["attached"]


def test_an_attached_slurm_run_keeps_its_job_and_slurms_word_on_its_end(tmp_path):
    """launch/slurm/run.py's `on`: the job's place from its start; a job Slurm ended on a time
    limit (no rank failed) is FAILED, a Ctrl-C'd one STOPPED whatever its ranks said."""
    from ddpfleet.launch.slurm.run import found

    index = Index(tmp_path)
    attached = Attached(index, "slurm")
    attached.started(plan("s"), **found(plan("s"), "7"))
    entry = index.entry("s")
    assert {k: entry[k] for k in ("launcher", "attached", "job_id", "output_dir", "nproc")} == {
        "launcher": "slurm", "attached": True, "job_id": "7", "output_dir": "/l", "nproc": 2,
    }  # fmt: skip
    stopped = [Outcome(n, RunState.STOPPED) for n in ORDER]
    attached.ended(plan("s"), stopped, "slurm job 7 timeout", {}, RunState.FAILED)
    assert index.entry("s")["verdict"]["state"] == "FAILED"
    assert index.entry("s")["verdict"]["why"] == "slurm job 7 timeout"
    failed = [Outcome("node0", RunState.STOPPED), Outcome("node1", RunState.FAILED, rank=3)]
    attached.ended(plan("s"), failed, "interrupted: slurm job 7 cancelled", {}, RunState.STOPPED)
    assert index.entry("s")["verdict"]["state"] == "STOPPED"
    assert index.entry("s")["verdict"]["why"] == "interrupted: slurm job 7 cancelled"
    assert index.entry("s")["verdict"]["failed_node"] is None


def test_an_attached_run_whose_controller_died_is_lost_and_does_not_grow_older(tmp_path):
    index = Index(tmp_path)
    index.add("a", ORDER, attached=True, controller={"pid": 2**22 + 7, "starttime": "1"})
    entry = index.entry("a")
    assert not holds(entry)
    view = index.settle([held(entry, holds(entry))])[0]
    assert view.state is RunState.LOST and "its controller ended" in view.why
    assert rows([view], now=entry["started"] + 9999)[0][5] == "-"


def test_a_lost_run_nobody_saw_end_shows_no_growing_duration():
    never = {"node0": part("STARTING", ended=None), "node1": None}  # supervisor gone, no torchrun
    view = fold("n", ORDER, never)
    assert view.state is RunState.LOST and "before its torchrun started" in view.why
    assert rows([view], now=1e9)[0][5] == "-"
    running = {n: part("RUNNING", alive=True, ended=None) for n in ORDER}
    assert rows([fold("r", ORDER, running)], now=160.0)[0][5] == "0:01:00"  # a live one does


def test_restarts_seen_on_the_nodes_are_kept_by_the_index(tmp_path):
    index = index_with(tmp_path, "r")
    lines = ["ddpfleet: restart 1 of 1 after rank 0 exit 1 at 7.5"]
    late = ["ddpfleet: restart 1 of 1 after rank 3 exit 1 at 7.1"]
    running = {"node0": part("RUNNING", alive=True, ended=None, restarts=lines),
               "node1": part("RUNNING", alive=True, ended=None, restarts=late)}  # fmt: skip
    view = index.settle([fold("r", ORDER, running)])[0]
    assert view.restarts == ("node1 rank 3 exit 1",)  # the node that failed first
    assert index.entry("r")["restarts"] == ["node1 rank 3 exit 1"]
    rebuilt = index.settle([fold("r", ORDER, dict(ended("SUCCEEDED"), node1=None))])[0]
    assert rebuilt.restarts == ("node1 rank 3 exit 1",)
    assert "restarts 1 (node1 rank 3 exit 1)" in rows([rebuilt], now=200.0)[0][-1]


def test_a_run_pruned_from_its_nodes_leaves_the_index_on_a_grown_inventory(tmp_path, monkeypatch):
    """The run ran on node0,node1; node2 joined later and never had it: its prune says nothing
    of the run, and the run still leaves the index (it stayed, as LOST, before)."""
    from types import SimpleNamespace

    from ddpfleet.launch.ssh import launcher as ssh_launcher

    index = index_with(tmp_path, "old", "new")
    for n, run_id in enumerate(("a1", "a2", "a3")):
        index.add(run_id, ORDER, attached=True, verdict={"state": "SUCCEEDED"}, started=n)
    said = {n: {"removed": r, "kept": []} for n, r in (("node0", ["old"]), ("node1", ["old"]))}
    said["node2"] = {"removed": [], "kept": []}
    monkeypatch.setattr(ssh_launcher.runctl, "prune", lambda fleet, py, keep, outputs: said)
    monkeypatch.setattr(ssh_launcher, "pythons", lambda inventory: {})
    runs = SimpleNamespace(fleet=None, inventory=None, index=index)
    pruned = ssh_launcher.LAUNCHER.prune(runs, 2)
    assert {n: p.removed for n, p in pruned.items()} == {
        "node0": ["old"],
        "node1": ["old"],
        "node2": [],
    }
    assert [e["run_id"] for e in index.entries()] == ["new", "a2", "a3"]  # the newest 2 attached


def _busy_controller(root, me: str, start, runs: int) -> None:
    """One controller's `train` and `runs`, over and over: a new run (appended), its verdict
    (a rewrite), and `runs` recording another's (a rewrite)."""
    index = Index(root)
    start.wait()
    for i in range(runs):
        index.add(f"{me}{i}", ORDER, launcher="ssh")
        index.update(f"{me}{i}", verdict={"state": "SUCCEEDED"})
        index.settle([fold(f"{me}{i}", ORDER, ended("SUCCEEDED"))])


def test_two_controllers_at_once_lose_no_run_and_no_verdict(tmp_path):
    """Two processes each add, update and settle their own runs in one index at once: every
    run and every verdict is there afterwards (each rewrite is under the index's lock)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_busy_controller, args=(tmp_path, me, start, 60)) for me in "ab"]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = Index(tmp_path).entries()
    assert sorted(e["run_id"] for e in entries) == sorted(
        f"{m}{i}" for m in "ab" for i in range(60)
    )
    assert all(e["verdict"]["state"] == "SUCCEEDED" for e in entries)


def test_a_project_that_cannot_be_written_still_shows_its_runs(tmp_path, monkeypatch):
    """A teammate's checkout or a read-only mount: the lock is refused, and `runs` shows what
    the nodes and the index say, recording nothing (it used to fail)."""
    import errno

    index = index_with(tmp_path, "r")
    before = index.path.read_text()

    def refused(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self.path))

    monkeypatch.setattr(Index, "_locked", refused)
    seen = index.settle([fold("r", ORDER, ended("SUCCEEDED"))])[0]
    assert seen.state is RunState.SUCCEEDED
    assert index.path.read_text() == before  # nothing recorded
    monkeypatch.undo()
    index.settle([fold("r", ORDER, ended("SUCCEEDED"))])
    assert index.entry("r")["verdict"]["state"] == "SUCCEEDED"  # writable again: recorded
