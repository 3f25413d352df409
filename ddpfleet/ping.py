"""`invoke ping`: every node's reachability and basic facts, one round trip each."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ddpfleet.errors import NodeError
from ddpfleet.facts import FACTS_SCRIPT, human_kb, parse_facts

if TYPE_CHECKING:  # the warm path (kept.py) must not load the SSH library
    from rich.table import Table

    from ddpfleet.ssh.connection import Conn, Fleet

COLUMNS = (
    "node",
    "address",
    "reachable",
    "os",
    "arch",
    "python3",
    "free disk",
    "nvidia-smi",
    "rtt ms",
)


@dataclass(frozen=True)
class Pong:
    facts: dict[str, str]
    rtt_ms: float


def _probe(conn: Conn) -> Pong:
    start = time.monotonic()
    result = conn.run(FACTS_SCRIPT, timeout=conn.node.command_timeout)
    return Pong(parse_facts(result.stdout), (time.monotonic() - start) * 1000)


def ping(fleet: Fleet) -> dict[str, Pong | NodeError]:
    return fleet.map(_probe)


def render(fleet: Fleet, results: dict[str, Pong | NodeError]) -> Table:
    # rich loads here, not with the module: the installed command's lean path draws without it
    # off a terminal, or imports it while the nodes answer (ddpfleet/__main__.py)
    from ddpfleet.report import table

    # a narrow terminal leaves these out first, so an unbroken address and OS fit
    return table(None, COLUMNS, rows(fleet, results), optional=("rtt ms", "arch"))


def rows(fleet: Fleet, results: dict[str, Pong | NodeError]) -> list[tuple[str, ...]]:
    """The table's rows, a node each, in the fleet's order."""
    out = []
    for node in fleet.nodes:
        r = results[node.name]
        if isinstance(r, NodeError):
            out.append(
                (node.name, node.address, f"no ({r.kind}): {r.message}", "", "", "", "", "", "")
            )
            continue
        f = r.facts
        out.append(
            (
                node.name,
                node.address,
                "yes",
                f.get("os", "?"),
                f.get("arch", "?"),
                f.get("python3") or "missing",
                human_kb(f.get("disk_free_kb", "")),
                "yes" if f.get("nvidia_smi") else "no",
                f"{r.rtt_ms:.1f}",
            )
        )
    return out
