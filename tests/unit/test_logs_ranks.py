"""`invoke logs`' checks, both launchers: --rank/--node the run does not have are errors naming
what it has; every node of the run is shown or named (tests/integration/test_logs.py runs them
on real nodes)."""

from __future__ import annotations

import pytest

from ddpfleet.errors import DdpfleetError, Unreachable
from ddpfleet.launch.launcher import check_ranks, spans
from ddpfleet.launch.ssh.runlogs import nodes_of, ranks_of

RANKS = {"node0": range(0, 2), "node1": range(2, 4)}


def test_spans():
    assert spans([0, 1, 2, 3]) == "0-3"
    assert spans([7, 0, 1, 3]) == "0-1, 3, 7"
    assert spans([]) == ""


@pytest.mark.parametrize(
    ("rank", "nodes", "said"),
    [
        (99, (), "--rank 99: run r1 has ranks 0-3; give one of those"),
        (0, ("node1",), "--rank 0: run r1 has ranks 2-3 on node1; give one of those"),
        (None, ("node7",), "--node node7: run r1 ran on node0, node1; give one of those"),
    ],
)
def test_what_the_run_lacks_is_named(rank, nodes, said):
    with pytest.raises(DdpfleetError) as e:
        check_ranks("r1", RANKS, rank, nodes)
    assert str(e.value) == said


def test_what_the_run_has_passes():
    check_ranks("r1", RANKS, 3)
    check_ranks("r1", RANKS, 2, ["node1"])
    check_ranks("r1", dict.fromkeys(RANKS, ()), 99)  # ranks unknown: nothing to judge by


def part(rank: int) -> dict:
    return {"rank": rank, "nproc": 2, "meta": {"nodes": ["node0", "node1", "node2"]}}


def test_every_node_of_the_run_is_read_or_named():
    said = {
        "node0": {"r1": part(0)},
        "node1": Unreachable("node1", "connect timed out"),
        "node2": {},  # rebuilt: no record
    }
    parts, problems = nodes_of(said, "r1", ["node0", "node1", "node2", "node3"])
    assert list(parts) == ["node0"]
    assert problems == [
        "node1 unreachable (connect timed out); its lines are not shown",
        "node2 has no record of the run (rebuilt or pruned?); no lines",
        "node3 is not in this inventory; its lines are not shown",
    ]
    # the ranks of every node, from the one spec still readable
    assert ranks_of(said, "r1", ["node0"]) == {
        "node0": range(0, 2), "node1": range(2, 4), "node2": range(4, 6),
    }  # fmt: skip
