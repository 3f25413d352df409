"""ddpfleet.launch.index: the controller's runs.jsonl, and history that never lies (issue 24)."""

from __future__ import annotations

import json

from ddpfleet.launch.index import Index
from ddpfleet.launch.ssh.runstate import fold, rows
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
