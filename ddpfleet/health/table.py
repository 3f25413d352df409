"""`invoke health`: the quick checks on every node in parallel, one table, the JSON, the history.

    with fleet:
        checks = quick(fleet)                 # probe (one round trip a node) + judge
        report.show(render(checks))           # node, check, value, verdict, fix
        document(checks)                      # --json: HEALTH_SCHEMA
        record(inventory, checks)             # one line per node in .ddpfleet/health.jsonl

A node that could not be probed (SSH failed, the probe timed out) is one `reach` row that
fails; a fail anywhere makes `run` raise after the table, so the exit is non-zero.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from ddpfleet import envs, report
from ddpfleet.errors import ConnectError, DdpfleetError, NodeError
from ddpfleet.health import facts as facts_mod
from ddpfleet.health import judge as judge_mod
from ddpfleet.health import netif, probe, versions
from ddpfleet.health.judge import FAIL, Check
from ddpfleet.hygiene import STATE_DIR, state_dir

if TYPE_CHECKING:
    from ddpfleet.inventory import Inventory
    from ddpfleet.ssh.fleetbase import FleetBase

COLUMNS = ("node", "check", "value", "verdict", "fix")
SCHEMA_ID = "ddpfleet.health/1"
HISTORY = "health.jsonl"
STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red"}


def env_python(inventory: Inventory, name: str) -> str:
    node = next(n for n in inventory.nodes if n.name == name)
    return envs.location(inventory, node).python


def master_first(inventory: Inventory, names: Iterable[str]) -> list[str]:
    """`names` as train would rank them without --nodes: cluster.master first where chosen
    (launch.config.run_order), whose host every node's interface check reaches for."""
    names = list(names)
    master = inventory.cluster.master
    return [master, *(n for n in names if n != master)] if master in names else names


def probe_all(
    fleet: FleetBase, names: Iterable[str] | None = None, master: str | None = None
) -> dict[str, object]:
    """{node: NodeFacts | NodeError}: the probe on every node (or `names`) in parallel.
    `master`: the run's master node (default: master_first's), the host each node reaches."""
    pythons = {n.name: env_python(fleet.inventory, n.name) for n in fleet.nodes}
    names = list(names) if names is not None else [n.name for n in fleet.nodes]
    hosts = {n.name: n.host for n in fleet.inventory.nodes}
    master = master or next(iter(master_first(fleet.inventory, names)), None)
    master_host = hosts[master] if master else None

    def one(conn) -> facts_mod.NodeFacts:
        return facts_mod.parse(probe.run(conn, pythons[conn.name], master_host))

    return fleet.map(one, names)


def judge_all(
    inventory: Inventory,
    results: Mapping[str, object],
    order: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> list[Check]:
    """Every node's rows, in inventory order, the versions held against the fleet's. `order`:
    the run's nodes, the master first (default: master_first's); `env`: the run's --env, for the
    interface NCCL and gloo would use."""
    nodes = {n.name: n for n in inventory.nodes}
    order = list(order or master_first(inventory, results))
    nets = {n: getattr(r, "net", None) for n, r in results.items()}
    interface = netif.rows(order, {n: nodes[n].host for n in order}, nets, env) if order else {}
    checks: list[Check] = []
    probed = {}
    for name, outcome in results.items():
        if isinstance(outcome, NodeError):
            what = "unreachable" if isinstance(outcome, ConnectError) else "not probed"
            checks.append(
                Check(
                    name, "reach", f"{what}: {outcome.message}", FAIL, f"invoke ping --nodes {name}"
                )
            )
            continue
        probed[name] = outcome
        rows = judge_mod.judge(
            name,
            outcome,
            expected_gpus=nodes[name].gpus,
            limits=inventory.health,
            env=env_python(inventory, name),
        )
        if name in interface:  # before the versions row, which is always last
            rows.insert(len(rows) - 1, interface[name])
        checks += rows
    return versions.compare(probed, checks)


def quick(fleet: FleetBase, names: Iterable[str] | None = None) -> list[Check]:
    return judge_all(fleet.inventory, probe_all(fleet, names))


def failures(checks: Iterable[Check]) -> dict[str, Check]:
    """The first failing row of each node that has one: its one-line reason."""
    out: dict[str, Check] = {}
    for c in checks:
        if c.verdict == FAIL:
            out.setdefault(c.node, c)
    return out


# --- the table ---------------------------------------------------------------------------------


def render(checks: Iterable[Check]) -> Table:
    rows = []
    for c in checks:
        rows.append((c.node, c.check, c.value, report.text(c.verdict, STYLE[c.verdict]), c.fix))
    return report.table(None, COLUMNS, rows)


# --- JSON and the history ------------------------------------------------------------------------

_STR = {"type": "string"}
_CHECK = {
    "type": "object",
    "required": ["check", "value", "verdict", "fix"],
    "additionalProperties": False,
    "properties": {
        # quick: reach, probe, gpus, nvidia-smi, ecc, retired pages, remapped rows, throttle,
        # temperature, pcie link, nvlink, xid, interface, versions; --deep adds gemm
        # (TFLOPS per GPU), memory (fill-and-verify per GPU), allreduce in node (NCCL busbw
        # between its GPUs), cuda (torch sees no GPU on a node that has some) or gpu probe (the
        # GPU probe did not finish), and allreduce (gloo busbw between nodes). A per-GPU row
        # names each GPU that is off ("GPU 3: 427 TFLOPS bf16, below 0.8x the node's median
        # 712"), else sums them up; a node without GPUs passes each as "no GPU (...)".
        "check": _STR,
        "value": _STR,
        "verdict": {"enum": ["pass", "warn", "fail"]},
        "fix": _STR,  # empty on a pass
    },
}
_NODE = {
    "type": "object",
    "required": ["node", "verdict", "checks"],
    "additionalProperties": False,
    "properties": {
        "node": _STR,
        "verdict": {"enum": ["pass", "warn", "fail"]},  # the node's worst check
        "checks": {"type": "array", "items": _CHECK},
    },
}

# `invoke health --json`. Stable: fields are only ever added, under a new SCHEMA_ID. `nodes` in
# inventory order; `verdict` is the worst over every node (fail: the exit status is 1).
HEALTH_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "type": "object",
    "required": ["schema", "time", "verdict", "nodes"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "time": _STR,  # ISO 8601, UTC, when the probes returned
        "verdict": {"enum": ["pass", "warn", "fail"]},
        "nodes": {"type": "array", "items": _NODE},
    },
}
# One line of .ddpfleet/health.jsonl: a node's result of one run (health or train's gate).
HISTORY_SCHEMA: dict = {
    **{k: v for k, v in _NODE.items() if k != "required"},
    "$id": "ddpfleet.health-history/1",
    "required": ["schema", "time", "source", "node", "verdict", "checks"],
    "properties": {
        "schema": {"const": "ddpfleet.health-history/1"},
        "time": _STR,
        "source": {"enum": ["health", "train"]},
        **_NODE["properties"],
    },
}


def _by_node(checks: Iterable[Check]) -> dict[str, list[Check]]:
    nodes: dict[str, list[Check]] = {}
    for c in checks:
        nodes.setdefault(c.node, []).append(c)
    return nodes


def _node_json(name: str, rows: list[Check]) -> dict:
    return {
        "node": name,
        "verdict": judge_mod.worst(rows),
        "checks": [
            {"check": c.check, "value": c.value, "verdict": c.verdict, "fix": c.fix} for c in rows
        ],
    }


def _stamp(when: datetime | None) -> str:
    return (when or datetime.now(timezone.utc)).isoformat(timespec="seconds")


def document(checks: list[Check], when: datetime | None = None) -> dict:
    return {
        "schema": SCHEMA_ID,
        "time": _stamp(when),
        "verdict": judge_mod.worst(checks),
        "nodes": [_node_json(n, rows) for n, rows in _by_node(checks).items()],
    }


def history_path(inventory: Inventory) -> Path:
    return inventory.root / STATE_DIR / HISTORY


def record(
    inventory: Inventory, checks: list[Check], source: str = "health", when=None
) -> Path | None:
    """Append one line per node to .ddpfleet/health.jsonl (a node that degrades over days shows
    it there). A history that cannot be written is a warning, never a failed check."""
    path = history_path(inventory)
    stamp = _stamp(when)
    lines = [
        json.dumps(
            {
                "schema": "ddpfleet.health-history/1",
                "time": stamp,
                "source": source,
                **_node_json(n, rows),
            }
        )
        for n, rows in _by_node(checks).items()
    ]
    try:
        state_dir(path.parent)
        with path.open("a") as f:
            f.write("".join(line + "\n" for line in lines))
    except OSError as e:
        report.warn(f"health history not written: {path}: {e.strerror or e}")
        return None
    return path


def deep_checks(fleet: FleetBase, results: Mapping[str, object]) -> list[Check]:
    """--deep on the nodes the quick checks reached: each node's GPUs (deepgpu: GEMM, memory,
    NCCL inside it, all nodes at once), then gloo all_reduce between nodes (deep: the ring)."""
    from ddpfleet.health import deep, deepgpu

    reached = [n.name for n in fleet.nodes if n.name in fleet.conns]
    pythons = {n: env_python(fleet.inventory, n) for n in reached}
    limits = fleet.inventory.health
    gpus, driverless = {}, []
    for node in fleet.inventory.nodes:  # torch seeing no GPU fails where the node has some
        facts = results.get(node.name)
        gpus[node.name] = node.gpus if node.gpus is not None else len(getattr(facts, "gpus", ()))
        if not gpus[node.name] and getattr(facts, "smi", None) == "absent":
            driverless.append(node.name)  # no driver, no CUDA: spare it a torch import
    probed = [n for n in reached if n not in driverless]
    measured = deepgpu.measure(fleet, probed, pythons) if probed else {}
    measured.update({n: deepgpu.NO_DRIVER for n in reached if n in driverless})
    rows = deepgpu.judge({n: measured[n] for n in reached}, limits, gpus)
    return rows + deep.judge(deep.measure(fleet, reached, pythons), limits)


# --- the task ----------------------------------------------------------------------------------


def run(fleet: FleetBase, as_json: bool = False, deep: bool = False) -> list[Check]:
    """The table (or --json), the history; raises naming every failing node after both.
    `deep`: then the GPUs' GEMM, memory and NCCL rows and all_reduce bandwidth between the
    nodes the quick checks reached."""
    results = probe_all(fleet)
    checks = judge_all(fleet.inventory, results)
    if deep:
        checks += deep_checks(fleet, results)
        order = {n.name: i for i, n in enumerate(fleet.nodes)}
        checks.sort(key=lambda c: order.get(c.node, len(order)))  # stable: each node's rows
    record(fleet.inventory, checks)
    if as_json:
        sys.stdout.write(json.dumps(document(checks), indent=2) + "\n")
    else:
        report.show(render(checks))
    bad = failures(checks)
    if bad:
        raise DdpfleetError(
            f"health failed on {len(bad)} of {len(_by_node(checks))} node(s): "
            + "; ".join(f"{c.node}: {c.check}: {c.value}" for c in bad.values())
        )
    return checks
