"""A detached run's verdict from its nodes' records (ddpfleet.launch.runstate.fold), pure."""

from __future__ import annotations

from ddpfleet.launch.ssh.runstate import COLUMNS, fold, rows

ORDER = ("node0", "node1")
# node1's rank 3 raising for a reason of its own (the cause in the verdict tests below)
RANK3_RAISED = [
    "[default1]:[rank3]: Traceback (most recent call last):",
    "[default1]:[rank3]: RuntimeError: rank 3: injected failure at step 40",
]


def part(status: str, **kw) -> dict:
    base = {"status": status, "alive": status == "RUNNING", "started": 100.0, "rank": 0, "nproc": 2}
    return {**base, **kw}


def test_every_part_running_is_running():
    v = fold("r", ORDER, {"node0": part("RUNNING"), "node1": part("RUNNING", rank=1)})
    assert v.state == "RUNNING" and v.why == ""


def test_every_part_exit_0_is_succeeded():
    parts = {n: part("SUCCEEDED", exit_code=0, ended=110.0) for n in ORDER}
    v = fold("r", ORDER, parts)
    assert v.state == "SUCCEEDED" and v.exits == {"node0": 0, "node1": 0} and v.ended == 110.0


def test_failed_names_the_node_and_the_rank_from_its_traceback():
    tail = ["[default1]:Traceback (most recent call last):", "[default1]:RuntimeError: boom"]
    parts = {
        "node0": part("STOPPED", exit_code=-15, ended=111.0, reason="gang: node1 failed",
                      first_failure={"node": "node1", "code": 1}),
        "node1": part("FAILED", exit_code=1, ended=110.0, rank=1, tail=tail),
    }  # fmt: skip
    v = fold("r", ORDER, parts)
    assert v.state == "FAILED" and v.failed_node == "node1" and v.failed_rank == 3
    assert v.why == "node1 rank 3 failed first (exit 1)"


def test_the_masters_record_of_the_first_failure_wins_over_end_times():
    parts = {
        "node0": part("FAILED", exit_code=1, ended=100.5, first_failure={"node": "node1"}),
        "node1": part("FAILED", exit_code=1, ended=101.0, rank=1),
    }
    assert fold("r", ORDER, parts).failed_node == "node1"


def test_unreachable_node_or_vanished_supervisor_is_lost():
    v = fold("r", ORDER, {"node0": part("STOPPED", reason="x"), "node1": "unreachable (timeout)"})
    assert v.state == "LOST" and "node1: unreachable" in v.why
    v = fold("r", ORDER, {"node0": part("RUNNING"), "node1": part("RUNNING", alive=False)})
    assert v.state == "LOST" and v.why == "node1: its supervisor vanished"
    v = fold("r", ORDER, {"node0": part("FAILED", exit_code=1), "node1": "unreachable (x)"})
    assert v.state == "LOST" and "node1" in v.why  # its peers' ranks failed because it died
    v = fold("r", ORDER, {"node0": part("RUNNING"), "node1": None})
    assert v.state == "LOST" and "no record" in v.why


def test_a_part_its_guardian_recorded_lost_is_lost_saying_why():
    why = "node0: its supervisor was killed (SIGKILL); its guardian stopped every process"
    parts = {
        "node0": part("LOST", alive=False, reason=why, ended=105.0),
        "node1": part("STOPPED", rank=1, reason="lost the lifeline to the master", ended=106.0),
    }
    v = fold("r", ORDER, parts)
    assert v.state == "LOST" and v.why == why


def test_stopped_says_why_and_the_table_is_newest_first():
    old = fold("old", ORDER, {n: part("STOPPED", reason="stopped by invoke stop") for n in ORDER})
    assert old.state == "STOPPED" and old.why == "node0: stopped by invoke stop"
    new = fold("new", ORDER, {n: part("RUNNING", started=200.0) for n in ORDER})
    table = rows([old, new], now=260.0)
    assert [r[0] for r in table] == ["new", "old"]
    assert table[0][COLUMNS.index("duration")] == "0:01:00" and len(table[0]) == len(COLUMNS)


def test_a_node_whose_rank_only_lost_its_peer_is_not_blamed():
    # node1's rank 3 raised; node0's rank 0 failed because rank 3's socket closed, and node0's
    # own failure reached the master first: a race between nodes, not the cause.
    gone = [
        "[default0]:[rank0]: Traceback (most recent call last):",
        "[default0]:[rank0]: RuntimeError: [../gloo/transport/tcp/pair.cc:553] "
        "Connection closed by peer [10.215.0.11]:41234",
    ]
    raised = [
        *RANK3_RAISED,
        "[default0]:[rank2]: Traceback (most recent call last):",
        "[default0]:[rank2]: RuntimeError: [../gloo/transport/tcp/pair.cc:553] Connection reset by peer",
    ]
    parts = {
        "node0": part("FAILED", exit_code=1, ended=100.5, tail=gone,
                      first_failure={"node": "node0", "code": 1}),
        "node1": part("FAILED", exit_code=1, ended=101.0, rank=1, tail=raised),
    }  # fmt: skip
    v = fold("r", ORDER, parts)
    assert (v.failed_node, v.failed_rank) == ("node1", 3), v
    alone = {"node0": parts["node0"], "node1": part("STOPPED", exit_code=-15, ended=101.0)}
    assert fold("r", ORDER, alone).failed_node == "node0"  # the only failure is still named


def test_a_node_whose_failed_rank_says_nothing_loses_to_one_whose_rank_raised():
    # node0's failure reached the master first, and its ranks' own lines were pushed out of its
    # last lines by torchrun's summary: only the agent's word is left. node1's rank 3 raised.
    summary = [
        "E1130 12:46:50.635000 1 api.py:1002] failed (exitcode: 1) local_rank: 0 (pid: 7) of x",
        "  exitcode  : 1 (pid: 7)",
    ]
    raised = RANK3_RAISED
    parts = {
        "node0": part("FAILED", exit_code=1, ended=100.5, tail=summary,
                      first_failure={"node": "node0", "code": 1}),
        "node1": part("FAILED", exit_code=1, ended=101.0, rank=1, tail=raised),
    }  # fmt: skip
    v = fold("r", ORDER, parts)
    assert (v.failed_node, v.failed_rank) == ("node1", 3), v
    alone = {"node0": parts["node0"], "node1": part("STOPPED", exit_code=-15, ended=101.0)}
    assert fold("r", ORDER, alone).failed_node == "node0"  # a segfault says nothing either


def test_a_part_the_gang_stopped_after_its_own_rank_raised_is_named():
    # node1's rank 3 raised, but node1's torchrun was still tearing down when node0's own
    # failure (a peer gone) reached the master, whose stop then ended node1's part: STOPPED.
    gone = [
        "[default0]:[rank0]: Traceback (most recent call last):",
        "[default0]:[rank0]: RuntimeError: [pair.cc:553] Connection closed by peer [10.0.0.2]:1",
        "[default0]:terminate called without an active exception",
    ]
    raised = RANK3_RAISED
    parts = {
        "node0": part("FAILED", exit_code=1, ended=100.5, tail=gone,
                      first_failure={"node": "node0", "code": 1}),
        "node1": part("STOPPED", exit_code=-15, ended=101.0, rank=1, tail=raised,
                      reason="gang: node0 failed (exit 1)"),
    }  # fmt: skip
    v = fold("r", ORDER, parts)
    assert (v.state, v.failed_node, v.failed_rank) == ("FAILED", "node1", 3), v
    quiet = dict(parts, node1=part("STOPPED", exit_code=-15, ended=101.0, rank=1, tail=[]))
    assert fold("r", ORDER, quiet).failed_node == "node0"  # nothing says otherwise
