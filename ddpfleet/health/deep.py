"""`invoke health --deep`: all_reduce bus bandwidth between nodes, in a constant number of rounds.

The nodes form a ring (0-1, 1-2, ..., N-1 - 0): every node meets two partners. The ring's
edges go into rounds of disjoint pairs (two rounds for an even N, three for an odd one), each
round's pairs measured at once; so 32 nodes take the time of 2 pairs, not 32*31/2 of them.
A pair is two processes of the env's python, gloo over TCP (the CPU path; NCCL between a node's
own GPUs is deepgpu.py's), the best of ITERS all_reduces of SIZE bytes:

    algbw = SIZE / seconds        busbw = algbw * 2(n-1)/n   (n = 2 ranks: busbw = algbw)

A node's figure is its best pair: a slow link slows every pair of its node, a healthy node
still has a fast partner. A node is named below the inventory's `health.busbw_gbps`, else below
`busbw_ratio` (0.8) of the median node's figure. With two nodes there is one pair: only the
floor can fail it, and then it names both (nothing tells which end is slow).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ddpfleet.errors import NodeError
from ddpfleet.health.check import FAIL, PASS, Check

if TYPE_CHECKING:
    from ddpfleet.ssh.fleetbase import FleetBase

SIZE = 4 * 1024 * 1024  # bytes per all_reduce: large enough that bandwidth, not latency, counts
ITERS = 5
PORT_OFFSET = 71  # pair i of a round listens on cluster.master_port + PORT_OFFSET + i
PAIR_TIMEOUT_S = 120.0
DEFAULT_RATIO = 0.8

# Node side, for the env's python (torch): one rank of a 2-rank gloo group. GLOO_SOCKET_IFNAME
# is the device the kernel routes to the peer by (a docker or veth decoy is never picked).
ALLREDUCE_PY = """
import json, os, subprocess, sys, time
from datetime import timedelta
rank, world, master, port, peer, size, iters = sys.argv[1:8]
rank, world, port, size, iters = int(rank), int(world), int(port), int(size), int(iters)
try:
    route = subprocess.run(["ip", "route", "get", peer], capture_output=True, text=True,
                           timeout=5).stdout.split()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", route[route.index("dev") + 1])
except (OSError, ValueError, IndexError, subprocess.SubprocessError):
    pass
import torch
import torch.distributed as dist
dist.init_process_group("gloo", init_method="tcp://%s:%d" % (master, port), rank=rank,
                        world_size=world, timeout=timedelta(seconds=60))
t = torch.ones(size // 4, dtype=torch.float32)
dist.all_reduce(t)
best = None
for _ in range(iters):
    dist.barrier()
    start = time.perf_counter()
    dist.all_reduce(t)
    took = time.perf_counter() - start
    best = took if best is None else min(best, took)
dist.destroy_process_group()
algbw = size / best / 1e9
print(json.dumps({"rank": rank, "seconds": best, "algbw": algbw,
                  "busbw": algbw * 2 * (world - 1) / world}))
"""


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    busbw: float | None  # GB/s; None: the pair did not finish
    error: str = ""


def ring_rounds(names: Sequence[str]) -> list[list[tuple[str, str]]]:
    """The ring's edges in rounds of disjoint pairs: [[(n0, n1), (n2, n3)], [(n1, n2), ...]]."""
    n = len(names)
    if n < 2:
        return []
    if n == 2:
        return [[(names[0], names[1])]]
    edges = [(names[i], names[(i + 1) % n]) for i in range(n)]
    rounds: list[list[tuple[str, str]]] = []
    for edge in edges:
        for r in rounds:
            if not {x for pair in r for x in pair} & set(edge):
                r.append(edge)
                break
        else:
            rounds.append([edge])
    return rounds


def _measure(fleet: FleetBase, pairs: list[tuple[str, str]], pythons: Mapping[str, str]):
    hosts = {n.name: n.host for n in fleet.inventory.nodes}
    base = fleet.inventory.cluster.master_port + PORT_OFFSET
    role = {}
    for i, (a, b) in enumerate(pairs):
        role[a] = (0, hosts[a], base + i, hosts[b])
        role[b] = (1, hosts[a], base + i, hosts[a])

    def one(conn) -> dict:
        rank, master, port, peer = role[conn.name]
        argv = [pythons[conn.name], "-c", ALLREDUCE_PY, str(rank), "2", master, str(port), peer]
        r = conn.run([*argv, str(SIZE), str(ITERS)], timeout=PAIR_TIMEOUT_S, check=False)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.exit_code != 0 or not lines:
            why = (r.stderr.strip().splitlines() or [f"exit {r.exit_code}"])[-1]
            raise NodeError(conn.name, f"all_reduce failed: {why[:300]}")
        return json.loads(lines[-1])

    results = fleet.map(one, list(role))
    out = []
    for a, b in pairs:
        ra = results[a]
        errors = [str(r) for r in (ra, results[b]) if isinstance(r, NodeError)]
        out.append(Pair(a, b, None if errors else float(ra["busbw"]), "; ".join(errors)))
    return out


def measure(fleet: FleetBase, names: Sequence[str], pythons: Mapping[str, str]) -> list[Pair]:
    return [p for r in ring_rounds(names) for p in _measure(fleet, r, pythons)]


def judge(pairs: list[Pair], limits: Mapping[str, float]) -> list[Check]:
    """One `allreduce` row per node. A node's figure is its best pair (a slow link caps every
    pair of its node; a healthy node has at least one fast partner); slow is below the
    inventory's floor, else below busbw_ratio of the median node's figure."""
    by_node: dict[str, list[Pair]] = {}
    for p in pairs:
        by_node.setdefault(p.a, []).append(p)
        by_node.setdefault(p.b, []).append(p)
    best = {n: max((p.busbw or 0.0) for p in mine) for n, mine in by_node.items()}
    median = statistics.median(best.values()) if best else 0.0
    floor = limits.get("busbw_gbps")
    if floor is None:
        floor = limits.get("busbw_ratio", DEFAULT_RATIO) * median
    rows = []
    for node, mine in by_node.items():
        parts = [
            f"{p.b if p.a == node else p.a} "
            + (f"{p.busbw:.3g} GB/s" if p.busbw is not None else "failed")
            for p in mine
        ]
        value = "busbw " + ", ".join(parts) + f" (median {median:.3g}, floor {floor:.3g} GB/s)"
        if best[node] < floor or best[node] == 0.0:
            errors = "; ".join(p.error for p in mine if p.error)
            fix = errors or "check this node's NIC, cable, switch port and qdisc (tc qdisc show)"
            rows.append(Check(node, "allreduce", value, FAIL, fix))
        else:
            rows.append(Check(node, "allreduce", value, PASS))
    return rows
