"""train --resume RUN keeps the job's shape (issue 24 item 1): RUN's nodes, --nproc-per-node,
launcher and master port unless a flag given now says otherwise, each said in the plan."""

from __future__ import annotations

import pytest

from ddpfleet.cli.runs import shape
from ddpfleet.errors import DdpfleetError

META = {"script": "train.py", "nodes": ["node0", "node1", "node2"], "nproc": 2, "port": 29511}
GROWN = ["node0", "node1", "node2", "node3"]  # the inventory gained node3 since RUN
NONE = {"launcher": None, "nodes": None, "nproc-per-node": None, "master-port": None}


def test_a_3x2_run_resumed_on_a_grown_inventory_is_3x2_on_its_own_nodes():
    r = shape("det2", META, "ssh", GROWN, "inventory.yaml", NONE)
    assert (r.launcher, r.nodes, r.nproc_per_node, r.master_port) == (
        "ssh", "node0,node1,node2", "2", 29511,
    )  # fmt: skip
    assert r.said == (
        "launcher: ssh (from det2)",
        "nodes: node0,node1,node2 (from det2)",
        "nproc-per-node: 2 (from det2)",
        "master-port: 29511 (from det2)",
    )


def test_a_flag_given_now_wins_and_the_plan_says_so():
    given = {**NONE, "nproc-per-node": "1", "nodes": "node1,node0", "master-port": "29600"}
    r = shape("det2", META, "ssh", GROWN, "inventory.yaml", given)
    assert (r.nodes, r.nproc_per_node, r.master_port) == ("node1,node0", "1", "29600")
    assert "nproc-per-node: 1 (--nproc-per-node)" in r.said
    assert "nodes: node1,node0 (--nodes)" in r.said
    assert "launcher: ssh (from det2)" in r.said


def test_a_run_from_before_its_port_was_kept_takes_the_inventorys():
    r = shape("old", {"nodes": ["node0"], "nproc": 1}, "ssh", GROWN, "inventory.yaml", NONE)
    assert r.master_port is None and not any(s.startswith("master-port") for s in r.said)


def test_a_node_of_the_run_gone_from_the_inventory_is_one_line_naming_it():
    with pytest.raises(DdpfleetError) as e:
        shape("det2", META, "ssh", ["node0", "node1"], "inventory.yaml", NONE)
    message = str(e.value)
    assert "\n" not in message
    assert "its node node2 is not in inventory.yaml any more" in message
    assert "put it back" in message and "--nodes" in message
    # --nodes with the nodes that are left: resumed there
    r = shape("det2", META, "ssh", ["node0", "node1"], "inv.yaml", {**NONE, "nodes": "node0,node1"})
    assert r.nodes == "node0,node1"


def test_nodes_that_never_ran_it_are_refused_naming_them():
    with pytest.raises(
        DdpfleetError, match=r"--nodes node0,node3: node3 never ran det2, so it has"
    ):
        shape("det2", META, "ssh", GROWN, "inventory.yaml", {**NONE, "nodes": "node0,node3"})


def test_a_run_with_spares_is_resumed_with_them_unless_spares_is_given_now():
    meta = {**META, "spares": ["node3"]}
    r = shape("heal", meta, "ssh", GROWN, "inventory.yaml", NONE)
    assert r.spares == "node3" and "spares: node3 (from heal)" in r.said
    r = shape("heal", meta, "ssh", GROWN + ["node4"], "inv.yaml", {**NONE, "spares": "node4"})
    assert r.spares == "node4" and "spares: node4 (--spares)" in r.said
    assert shape("det2", META, "ssh", GROWN, "inventory.yaml", NONE).spares is None


def test_a_recovered_run_resumes_on_its_last_generation_and_the_spares_it_did_not_use():
    """node1 lost, node3 took its node_rank (generation 2); node4 still a spare: the resume
    names node0,node3,node2 (where the newest checkpoints are), spare node4, and --nodes may
    still name node1 (it trained generation 1 and has RUN's code)."""
    meta = {**META, "nodes": ["node0", "node3", "node2"], "generation": 2,
            "trained": ["node0", "node1", "node2", "node3"], "spares": ["node4"]}  # fmt: skip
    known = GROWN + ["node4"]
    r = shape("heal", meta, "ssh", known, "inventory.yaml", NONE)
    assert (r.nodes, r.spares) == ("node0,node3,node2", "node4")
    assert "nodes: node0,node3,node2 (from heal's generation 2)" in r.said, r.said
    assert "spares: node4 (from heal's generation 2)" in r.said, r.said
    again = shape("heal", meta, "ssh", known, "inventory.yaml", {**NONE, "nodes": "node0,node1"})
    assert again.nodes == "node0,node1"
    with pytest.raises(DdpfleetError, match=r"node5 never ran heal.*\(node0,node1,node2,node3\)"):
        shape("heal", meta, "ssh", known + ["node5"], "inv.yaml", {**NONE, "nodes": "node5"})
