"""torchrun --max-restarts (issue 24 item 10): a restart does not meet the previous attempt's
leftovers, and each restart says why. The real restart runs on sandbox nodes
(tests/integration/test_runs_history.py); here, what the node program starts and how the
controller reads the restart lines."""

from __future__ import annotations

import importlib.util
import socket

from ddpfleet.launch.verdict import RESTART_LINE, restarts
from ddpfleet.node import NODE_DIR

spec = importlib.util.spec_from_file_location("part", NODE_DIR / "part.py")
part = importlib.util.module_from_spec(spec)
spec.loader.exec_module(part)

TORCHRUN = ["/py", "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", "1"]


def test_every_node_of_a_run_with_restarts_gets_a_fresh_store_per_attempt():
    argv, fds = part.adopting([*TORCHRUN, "--max-restarts", "2", "train.py"], None)
    assert argv[:2] == ["/py", "-c"] and argv[3:] == ["-", *TORCHRUN[3:], "--max-restarts", "2",
                                                      "train.py"]  # fmt: skip
    assert fds == () and "next_rendezvous=nxt" in argv[2]
    compile(argv[2], "torchrun", "exec")


def test_the_master_adopts_its_held_port_with_or_without_restarts():
    with socket.socket() as held:
        plain, fds = part.adopting([*TORCHRUN, "train.py"], held)
        assert fds == (held.fileno(),) and plain[3] == str(held.fileno())
        assert "next_rendezvous" not in plain[2]  # no restarts: torchrun as it is, but the port
        both, _ = part.adopting([*TORCHRUN, "--max-restarts", "1", "t.py"], held)
        assert "master_listen_fd" in both[2] and "next_rendezvous=nxt" in both[2]


def test_a_worker_without_restarts_runs_torchrun_unchanged():
    for argv in ([*TORCHRUN, "t.py"], [*TORCHRUN, "--max-restarts", "0", "t.py"]):
        assert part.adopting(argv, None) == (argv, ())


def test_the_restart_line_the_node_prints_is_the_one_the_controller_reads():
    said = part.FRESH.split("print('", 1)[1].split("'%", 1)[0]  # the node's format
    line = said % (1, 2, "rank 3 exit 1, rank 2 exit -15", 1796547007.373)
    assert RESTART_LINE.match(line)
    other = "ddpfleet: restart 1 of 2 after rank 0 exit 1 at 1796547008.5"
    assert restarts({"node1": [line], "node0": [other]}) == (
        "node1 rank 3 exit 1, rank 2 exit -15",
    )
    assert restarts({"node0": ["[default0]: ddpfleet: restart 1 of 2 after x at 1"]}) == ()
