"""train's health gate refusal: a line per refused node, shown as lines by the CLI (as launch's
Refusals are); they came squashed into one line before, and a node's text cannot add one."""

from __future__ import annotations

import pytest
from invoke import Exit

from ddpfleet.cli.common import cli
from ddpfleet.errors import Refusals
from ddpfleet.health import gate
from ddpfleet.health.check import FAIL, Check


def test_several_refused_nodes_read_as_a_line_each() -> None:
    bad = [
        Check("node0", "ecc", "GPU 3: 2 uncorrected", FAIL, "drain the node"),
        Check("node2", "xid", "79 (GPU has fallen off the bus)\n\x1b[2Jforged line", FAIL, "x"),
    ]

    @cli
    def train(c):
        raise gate.refusal(bad, 4)

    with pytest.raises(Exit) as got:
        train(None)
    assert isinstance(gate.refusal(bad, 4), Refusals)
    assert got.value.message.splitlines() == [
        "error: health gate refused 2 of 4 node(s); nothing was started:",
        "  node0: ecc: GPU 3: 2 uncorrected; fix: drain the node",
        "  node2: xid: 79 (GPU has fallen off the bus)forged line; fix: x",
        "  (invoke health shows every check; --no-health-gate skips this check)",
    ]
