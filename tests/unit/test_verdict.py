"""ddpfleet.launch.verdict: one run-state enum and one blame rule for every launcher (pure)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from ddpfleet.launch.outcome import Outcome, first_failure
from ddpfleet.launch.slurm import state as slurm_state
from ddpfleet.launch.ssh import runstate
from ddpfleet.launch.verdict import Evidence, RunState, blame, fold

S = RunState
OWN = ("Traceback (most recent call last):", "RuntimeError: injected failure at step 40")
PEER = (
    "Traceback (most recent call last):",
    "RuntimeError: [pair.cc:553] Connection closed by peer",
)


def ev(node, state, at=None, rank=None, said=(), **kw) -> Evidence:
    return Evidence(node, state, at=at, rank=rank, said=tuple(said), **kw)


# (case, the parts, the node blamed or None)
BLAME = [
    ("nothing failed", [ev("a", S.SUCCEEDED), ev("b", S.STOPPED)], None),
    ("still running", [ev("a", S.RUNNING), ev("b", S.STARTING)], None),
    ("first failure by time", [ev("a", S.FAILED, 1.2, 0), ev("b", S.FAILED, 1.0, 3)], "b"),
    ("time 0.0 is a time, not unknown", [ev("a", S.FAILED, 0.0), ev("b", S.FAILED, 1.0)], "a"),
    ("an unknown time comes last", [ev("a", S.FAILED), ev("b", S.FAILED, 9.0)], "b"),
    ("a rank that raised beats an earlier one that lost its peer",
     [ev("a", S.FAILED, 0.5, 0, PEER), ev("b", S.FAILED, 1.0, 3, OWN)], "b"),
    ("a rank that raised beats an earlier silent one (a traceback pushed out)",
     [ev("a", S.FAILED, 0.5, 0), ev("b", S.FAILED, 1.0, 3, OWN)], "b"),
    ("a silent rank (a segfault) beats one that lost its peer",
     [ev("a", S.FAILED, 0.5, 0, PEER), ev("b", S.FAILED, 1.0, 3)], "b"),
    ("only echoes: the earliest is still named",
     [ev("a", S.FAILED, 2.0, 0, PEER), ev("b", S.FAILED, 1.0, 3, PEER)], "b"),
    ("a lost node beats a failed one whose rank lost its peer",
     [ev("a", S.FAILED, 0.5, 0, PEER), ev("b", S.LOST, 3.0, why="b: its connection dropped")],
     "b"),
    ("a lost node vs a failed one that raised: the earlier",
     [ev("a", S.FAILED, 0.5, 0, OWN), ev("b", S.LOST, 3.0)], "a"),
    ("a node unreachable now is lost, whenever",
     [ev("a", S.SUCCEEDED), ev("b", S.LOST, why="b: unreachable (timeout)", reachable=False)],
     "b"),
    ("the gang's record wins over end times among causes",
     [ev("a", S.FAILED, 1.0, 0, named_first=False), ev("b", S.FAILED, 2.0, 2, named_first=True)],
     "b"),
    ("the gang's record loses to a surer cause",
     [ev("a", S.FAILED, 1.0, 0, PEER, named_first=True), ev("b", S.FAILED, 2.0, 2, OWN)], "b"),
    ("stopped by the gang after its own rank raised: a failure",
     [ev("a", S.FAILED, 1.0, 0, PEER), ev("b", S.STOPPED, 2.0, 3, OWN)], "b"),
    ("stopped with its rank only losing a peer: not a failure",
     [ev("a", S.FAILED, 1.0, 0, PEER), ev("b", S.STOPPED, 0.5, 3, PEER)], "a"),
    ("stopped without a known rank: not a failure, whatever its lines",
     [ev("a", S.FAILED, 1.0, 0, PEER), ev("b", S.STOPPED, 0.5, None, OWN)], "a"),
]  # fmt: skip


@pytest.mark.parametrize("case, parts, blamed", BLAME, ids=[c[0] for c in BLAME])
def test_blame(case, parts, blamed):
    first = blame(parts)
    assert (first.node if first else None) == blamed


# (the parts' states, the run's state)
FOLD = [
    ((S.RUNNING, S.RUNNING), S.RUNNING),
    ((S.STARTING, S.RUNNING), S.RUNNING),
    ((S.SUCCEEDED, S.SUCCEEDED), S.SUCCEEDED),
    ((S.SUCCEEDED, S.RUNNING), S.RUNNING),
    ((S.FAILED, S.RUNNING), S.FAILED),
    ((S.FAILED, S.STOPPED), S.FAILED),
    ((S.LOST, S.FAILED), S.LOST),  # a dead node makes its peers' ranks fail too
    ((S.LOST, S.SUCCEEDED), S.LOST),
    ((S.STOPPED, S.SUCCEEDED), S.STOPPED),
    ((S.STOPPED, S.STOPPED), S.STOPPED),
]


@pytest.mark.parametrize("states, run", FOLD, ids=["-".join(s) + f"={r}" for s, r in FOLD])
def test_fold(states, run):
    assert fold([ev(f"n{i}", s) for i, s in enumerate(states)]) is run


def test_a_stopped_part_whose_rank_raised_makes_the_run_failed():
    assert fold([ev("a", S.STOPPED, rank=1, said=OWN), ev("b", S.STOPPED)]) is S.FAILED
    assert fold([ev("a", S.STOPPED, rank=1, said=PEER), ev("b", S.STOPPED)]) is S.STOPPED


@pytest.mark.parametrize(
    "job_state, exit_code, run",
    [
        ("PENDING", "0:0", S.RUNNING),
        ("CONFIGURING", "0:0", S.RUNNING),
        ("RUNNING", "0:0", S.RUNNING),
        ("COMPLETING", "0:0", S.RUNNING),
        ("SUSPENDED", "0:0", S.RUNNING),
        ("COMPLETED", "0:0", S.SUCCEEDED),
        ("COMPLETED", "1:0", S.FAILED),
        ("FAILED", "1:0", S.FAILED),
        ("TIMEOUT", "0:15", S.FAILED),
        ("OUT_OF_MEMORY", "0:125", S.FAILED),
        ("CANCELLED", "0:15", S.STOPPED),
        ("PREEMPTED", "0:0", S.STOPPED),
        ("DEADLINE", "0:0", S.STOPPED),
        ("NODE_FAIL", "0:0", S.LOST),
        ("BOOT_FAIL", "0:0", S.LOST),
        ("SOMETHING_NEW", "0:0", S.FAILED),
    ],
)
def test_slurm_job_states_map_to_run_states(job_state, exit_code, run):
    assert slurm_state.job_state({"JobState": job_state, "ExitCode": exit_code}) is run


def test_every_launcher_blames_the_same_node_for_the_same_failure():
    """node1's rank 3 raised; node0's rank 0 only lost its peer, and was heard of first."""
    gone = "RuntimeError: [../gloo/transport/tcp/pair.cc:553] Connection closed by peer"
    raised = "RuntimeError: rank 3: injected failure at step 40"
    # attached: what member.py concluded for each node
    attached = [
        Outcome("node0", S.FAILED, 1, rank=0, evidence_at=1.0, last_lines=(gone,)),
        Outcome("node1", S.FAILED, 1, rank=3, evidence_at=1.5, last_lines=(raised,)),
    ]
    assert first_failure(attached).node == "node1"
    # detached: each node's record (run_ctl.py list), the master's record naming node0
    tb = "Traceback (most recent call last):"
    node0 = [f"[default0]:[rank0]: {tb}", f"[default0]:[rank0]: {gone}"]
    node1 = [f"[default1]:[rank3]: {tb}", f"[default1]:[rank3]: {raised}"]
    parts = {
        "node0": {"status": "FAILED", "exit_code": 1, "ended": 1.0, "rank": 0, "nproc": 2,
                  "tail": node0, "first_failure": {"node": "node0"}, "alive": False},
        "node1": {"status": "FAILED", "exit_code": 1, "ended": 1.5, "rank": 1, "nproc": 2,
                  "tail": node1, "alive": False},
    }  # fmt: skip
    view = runstate.fold("r", ("node0", "node1"), parts)
    assert (view.state, view.failed_node, view.failed_rank) == (S.FAILED, "node1", 3)
    # Slurm: the job's one output, node0's lines first
    lines = [f"0: {line}" for line in node0] + [f"1: {line}" for line in node1]
    assert slurm_state.blame(lines, ("node0", "node1"), 2) == ("node1", 3)


def test_srun_naming_a_killed_node_beats_a_rank_that_only_lost_its_peer():
    # node0's task was killed (no traceback, no agent line); node1's rank lost its peer.
    lines = (
        "1: [default0]:[rank2]: Traceback (most recent call last):",
        "1: [default0]:[rank2]: RuntimeError: Connection reset by peer",
        "srun: error: node0: task 0: Killed",
    )
    assert slurm_state.blame(lines, ("node0", "node1"), 2) == ("node0", None)


def test_run_states_are_their_strings():
    assert [s.value for s in S] == ["STARTING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED", "LOST"]
    assert S("FAILED") is S.FAILED and S.FAILED == "FAILED"
    assert f"{S.LOST}" == "LOST" and str(S.STOPPED) == "STOPPED" and f"{S.LOST:>6}" == "  LOST"
    assert json.dumps({"state": S.SUCCEEDED}) == '{"state": "SUCCEEDED"}'
    assert [s.word for s in S][2:] == ["ok", "failed", "stopped", "lost"]
    assert [s for s in S if s.live] == [S.STARTING, S.RUNNING]
    assert S.read("RUNNING", S.STOPPED) is S.RUNNING and S.read("PAUSED", S.STOPPED) is S.STOPPED


# --- The node programs write the same strings (they are stdlib only: read, not imported) ---

NODE_DIR = Path(__file__).resolve().parents[2] / "ddpfleet" / "node"


def _strings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _strings(e)]
    return []


def status_strings(source: str) -> set[str]:
    """Every string a node program writes as a part's status or compares one with: status=...
    keywords, {"status": ...} entries, `status = ...`, .get("status", default), comparisons
    whose left side names status, and the LIVE tuples those comparisons use."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.keyword) and node.arg == "status":
            found.update(_strings(node.value))
        elif isinstance(node, ast.Dict):
            pairs = zip(node.keys, node.values)
            found.update(s for k, v in pairs if _strings(k) == ["status"] for s in _strings(v))
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id in ("status", "LIVE") for t in node.targets
        ):
            found.update(_strings(node.value))
        elif isinstance(node, ast.Call) and _strings(node.args[0] if node.args else None) == [
            "status"
        ]:
            found.update(s for a in node.args[1:] for s in _strings(a))
        elif isinstance(node, ast.Compare) and "status" in ast.unparse(node.left):
            found.update(s for c in node.comparators for s in _strings(c))
    return found


def test_the_reader_of_node_sources_sees_a_misspelt_status():
    source = 'sup.save(status="SUCCEDED")\nif state.get("status") in ("RUNNING", "DONE"): pass\n'
    assert status_strings(source) == {"SUCCEDED", "RUNNING", "DONE"}


def test_the_node_programs_write_only_run_states():
    written = {
        path.name: status_strings(path.read_text()) for path in sorted(NODE_DIR.glob("*.py"))
    }
    every = set().union(*written.values())
    assert every - {s.value for s in S} == set(), written
    # the reader is not blind: the supervisor, guardian and run_ctl write all six between them
    assert every == {s.value for s in S}, written
