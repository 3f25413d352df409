"""`invoke logs RUN` never drops a node silently (issue 24 item 5), on real sandbox nodes: a node
it cannot read is one line on stderr and exit 1, the other nodes' lines still shown; a --rank or
--node the run does not have is an error naming what it has (it printed nothing, exit 0)."""

from __future__ import annotations

import re

from tests.integration.conftest import Cluster
from tests.integration.test_detach import detach, wait_state
from tests.integration.test_train import (  # noqa: F401 (the `ready` fixture)
    SHORT,
    new_run_id,
    ready,
)

FINAL = ("SUCCEEDED", "FAILED", "STOPPED", "LOST")


def ended_run(cluster: Cluster, tag: str) -> str:
    """A detached 2 x 2 run that succeeded (ranks 0-1 on node0, 2-3 on node1)."""
    run_id = new_run_id(tag)
    detach(cluster, run_id, SHORT)
    assert wait_state(cluster, run_id, FINAL)["state"] == "SUCCEEDED"
    return run_id


def one_error(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, (r.returncode, r.stdout[-2000:], r.stderr)
    assert lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_a_rank_or_node_the_run_lacks_is_an_error(ready: Cluster):
    run_id = ended_run(ready, "lrank")
    line = one_error(ready.invoke("logs", run_id, "--rank", "99", timeout=120))
    assert line == f"error: --rank 99: run {run_id} has ranks 0-3; give one of those", line
    line = one_error(ready.invoke("logs", run_id, "--node", "node1", "--rank", "0", timeout=120))
    assert f"--rank 0: run {run_id} has ranks 2-3 on node1" in line, line
    line = one_error(ready.invoke("logs", run_id, "--node", "node7", timeout=120))
    assert f"--node node7: run {run_id} ran on node0, node1" in line, line
    r = ready.invoke("logs", run_id, "--rank", "3", timeout=120)
    assert r.returncode == 0 and "rank 3 checksum" in r.stdout, r.stdout[-2000:] + r.stderr
    assert set(re.findall(r"^\[(node\d r\d)\]", r.stdout, re.MULTILINE)) == {"node1 r3"}


def test_a_node_that_cannot_be_read_is_named_and_fails_the_command(ready: Cluster):
    run_id = ended_run(ready, "ldown")
    stopped = ready.invoke("sandbox.stop", "--nodes", "node1", timeout=120)
    try:
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        r = ready.invoke("logs", run_id, timeout=120)
        line = one_error(r)
        assert line.startswith(f"error: logs {run_id}: node1 unreachable"), line
        assert "its lines are not shown" in line, line
        shown = set(re.findall(r"^\[(node\d) r\d\]", r.stdout, re.MULTILINE))
        assert shown == {"node0"}, r.stdout[-2000:]  # node0's lines are all there
        assert "rank 0 checksum" in r.stdout and "rank 1 checksum" in r.stdout
    finally:  # node1 back up, as the other fault tests leave their nodes
        ready.invoke("sandbox.start", "--nodes", "node1", timeout=300)
