"""ddpfleet.launch.slurm.status: sinfo and squeue output parsed (pure), and the --json document."""

from __future__ import annotations

from ddpfleet.launch.slurm import status

RECORDED = """---nodes
node0|idle|none|2|24105|(null)
node1|down*|Not responding|2|24105|gpu:8
node1|down*|Not responding|2|24105|gpu:8
node2|drained|bad disk|8|64000|(null)
---jobs
12|ddpfleet-run1|root|RUNNING|0:42|2|node[0-1]|node[0-1]
13|ddpfleet-run2|root|PENDING|0:00|2||(Resources)
"""


def test_nodes_once_each_with_state_and_reason():
    nodes, _ = status.parse(RECORDED)
    assert [(n.name, n.state, n.reason, n.gres) for n in nodes] == [
        ("node0", "idle", "", ""),
        ("node1", "down*", "Not responding", "gpu:8"),
        ("node2", "drained", "bad disk", ""),
    ]
    assert [n.healthy for n in nodes] == [True, False, False]
    assert status.unhealthy(nodes) == ["node1 down* (Not responding)", "node2 drained (bad disk)"]


def test_jobs_with_their_nodes_or_why_they_wait():
    _, jobs = status.parse(RECORDED)
    assert [(j.id, j.state, j.nodes, j.reason) for j in jobs] == [
        ("12", "RUNNING", "node[0-1]", "node[0-1]"),
        ("13", "PENDING", "", "(Resources)"),
    ]


def test_json_document_is_stable():
    nodes, jobs = status.parse(RECORDED)
    doc = status.document("node0", nodes, jobs)
    assert doc["schema"] == "ddpfleet.slurm-status/1" and doc["asked"] == "node0"
    assert set(doc["nodes"][0]) == {
        "name",
        "state",
        "reason",
        "cpus",
        "memory_mb",
        "gres",
        "healthy",
    }
    assert doc["jobs"][1]["reason"] == "(Resources)"
