"""Driver, torch, CUDA and NCCL: each node's row, then every node held against the fleet's."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import replace

from ddpfleet.health.check import FAIL, PASS, WARN, Check
from ddpfleet.health.facts import NodeFacts


def row(node: str, facts: NodeFacts, env: str | None) -> Check:
    v = facts.versions
    if v is None:
        return Check(
            node,
            "versions",
            f"no python env at {env}" if env else "no python env",
            WARN,
            f"invoke bootstrap --nodes {node}",
        )
    parts = [f"driver {facts.driver}"] if facts.driver else []
    parts += [f"{k} {v.get(k) or '-'}" for k in ("torch", "cuda", "nccl")]
    if not v.get("torch"):
        return Check(node, "versions", ", ".join(parts), WARN, f"invoke bootstrap --nodes {node}")
    return Check(node, "versions", ", ".join(parts), PASS)


def compare(facts: Mapping[str, NodeFacts], checks: list[Check]) -> list[Check]:
    """The versions rows again, a node that differs from the fleet's most common value failed.
    Nodes without GPUs are not held to the GPU nodes' driver (a CPU node has none)."""
    wanted = {}
    for key in ("driver", "torch", "cuda", "nccl"):
        values = {n: _get(f, key) for n, f in facts.items() if _get(f, key)}
        ranked = Counter(values.values()).most_common()
        if len(ranked) > 1:
            common, top = ranked[0]
            tie = ranked[1][1] == top  # no majority: every node is named, none is "right"
            said = (
                "no majority: " + ", ".join(v for v, _ in ranked)
                if tie
                else f"most nodes: {common}"
            )
            wanted[key] = (said, {n: v for n, v in values.items() if tie or v != common})
    out = []
    for c in checks:
        odd = [f"{k} {bad[c.node]} ({said})" for k, (said, bad) in wanted.items() if c.node in bad]
        if c.check == "versions" and odd:
            c = replace(
                c,
                value="differs: " + "; ".join(odd),
                verdict=FAIL,
                fix=f"make the nodes equal: invoke bootstrap --nodes {c.node}",
            )
        out.append(c)
    return out


def _get(f: NodeFacts, key: str) -> str | None:
    if key == "driver":
        return f.driver
    return (f.versions or {}).get(key)
