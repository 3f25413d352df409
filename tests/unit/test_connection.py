"""ddpfleet.ssh.connection's Fabric side, without a node: what the fleet's threads share."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from ddpfleet.inventory import Node
from ddpfleet.ssh import connection


def node(host: str) -> Node:
    return Node("node0", host, 22, "root", None, Path("/nonexistent/known_hosts"), 2.0)


def test_connections_made_in_parallel_never_see_each_others_config_half_merged():
    """fabric.Connection writes into its config while it is made (and every write re-merges
    the whole config): with one config shared by the fleet's threads, another node's thread
    read it empty ("No attribute or config key found for 'authentication'")."""
    failures: list[BaseException] = []

    def make(i: int) -> None:
        try:
            for _ in range(100):
                c = connection._fabric_connection(node(f"127.0.0.{i + 1}"))
                assert c.config.authentication.strategy_class is None
                assert c.config.timeouts.connect is None
        except BaseException as e:  # noqa: BLE001 - the test reports every thread's failure
            failures.append(e)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=make, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not failures, failures[:3]
