"""What every fleet of connections shares: the run's nodes, one connection or one failure per
node, and fn(conn) on all of them in parallel. connection.Fleet (direct SSH) and
kept.KeptFleet (the connection keeper's) differ only in how they open; this module loads no
paramiko, so the warm path stays light."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from ddpfleet.errors import DdpfleetError, NodeError
from ddpfleet.inventory import Inventory, Node
from ddpfleet.parallel import parallel

T = TypeVar("T")


def guarded(fn: Callable[[Any], T], io_errors: tuple[type[BaseException], ...]):
    """fn(conn) with a node's failure returned as its own NodeError, never raised: ours, and
    the I/O errors of that node alone (conn.failure says which)."""

    def call(conn):
        try:
            return fn(conn)
        except NodeError as e:
            return e
        except DdpfleetError as e:
            return NodeError(conn.name, str(e))
        except io_errors as e:
            return conn.failure(e)

    return call


class FleetBase:
    """One connection per node, opened by the subclass's open(), bounded by ssh.forks."""

    io_errors: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError)

    def __init__(self, inventory: Inventory, nodes: Iterable[Node] | None = None):
        self.inventory = inventory
        self.nodes = tuple(nodes if nodes is not None else inventory.nodes)
        self.workers = min(inventory.forks, max(1, len(self.nodes)))
        self.conns: dict[str, Any] = {}
        self.errors: dict[str, NodeError] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> Mapping[str, Any]:
        raise NotImplementedError

    def map(self, fn: Callable[[Any], T], nodes: Iterable[str] | None = None) -> dict[str, Any]:
        """fn(conn) on every reachable node in parallel; a node's failure is its own entry."""
        self.open()
        names = list(nodes) if nodes is not None else [n.name for n in self.nodes]
        live = [self.conns[n] for n in names if n in self.conns]
        done = parallel(guarded(fn, self.io_errors), live, self.workers)
        outcomes = dict(zip((c.name for c in live), done))
        return {n: outcomes[n] if n in outcomes else self.errors[n] for n in names}

    def run(self, command: str | list[str], **kwargs) -> dict[str, Any]:
        return self.map(lambda c: c.run(command, **kwargs))

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()
