"""`invoke doctor`: what would break training, found before training starts.

checks = diagnose(fleet)    # gather (node.py: three round trips a node) -> evaluate (pure)
report.show(render(checks)) # one table: node, check, status, detail, fix; the counts; invoke health
exit_if_failed(checks)      # non-zero when any check fails
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rich.console import Group
from rich.table import Table
from rich.text import Text

from ddpfleet import envs, trainuser
from ddpfleet.doctor.checks import (
    Check,
    Status,
    check_clock,
    check_disk,
    check_driver,
    check_env,
    check_gpu_count,
    check_port,
    check_ssh,
    check_sudo,
    check_tcp,
    check_train_user,
    check_versions,
    fail,
)
from ddpfleet.doctor.node import (
    NodeFacts,
    PortTest,
    clock_offset,
    gather_facts,
    port_test,
)
from ddpfleet.errors import ConnectError, DdpfleetError, NodeError
from ddpfleet.inventory import Inventory
from ddpfleet.ssh import become
from ddpfleet.ssh.connection import Fleet


def master_of(inventory: Inventory) -> str:
    """The run's master: cluster.master when selected, else the first selected node."""
    names = [n.name for n in inventory.nodes]
    return inventory.cluster.master if inventory.cluster.master in names else names[0]


@dataclass(frozen=True)
class Gathered:
    """Everything the checks read; `facts` holds a NodeError for a node SSH could not reach."""

    master: str
    facts: Mapping[str, NodeFacts | NodeError]
    clocks: Mapping[str, float | NodeError]
    port: PortTest


def evaluate(inventory: Inventory, got: Gathered) -> dict[str, list[Check]]:
    """Pure: every node's checks, in table order. An unreachable node gets its ssh row only,
    one whose facts did not come back its ssh row and why."""
    ok = {name: f for name, f in got.facts.items() if isinstance(f, NodeFacts)}
    counts = {name: len(f.gpus.gpus) for name, f in ok.items()}
    versions = {name: f.env.versions for name, f in ok.items() if f.env.torch and not f.env.error}
    checks: dict[str, list[Check]] = {}
    for node in inventory.nodes:
        facts = got.facts[node.name]
        if isinstance(facts, ConnectError):
            checks[node.name] = [check_ssh(node, facts)]
            continue
        if isinstance(facts, NodeError):  # reached, but the facts script failed or hung
            fix = "run the node's checks by hand to see where it stops (df, python, nvidia-smi)"
            checks[node.name] = [check_ssh(node, None), fail("facts", facts.message, fix)]
            continue
        clock = got.clocks.get(node.name)
        password = bool(os.environ.get(become.PASSWORD_ENV) or node.become_password_file)
        train = trainuser.settings(inventory, node)
        rows = [
            check_ssh(node, None),
            check_sudo(facts.uid, facts.sudo_rc, node.user, node.become, password),
            check_driver(facts.gpus, node.gpus),
            check_gpu_count(node.name, counts, got.master, node.gpus),
            check_env(node.name, facts.env, len(facts.gpus.gpus), envs.manager(inventory, node)),
        ]
        if not train.root:
            ids = {name: f.train_ids for name, f in ok.items()}
            rows.append(check_train_user(node.name, ids, f"{train.uid}:{train.gid}", train.name))
        if node.name in versions:
            rows.append(check_versions(node.name, versions, got.master))
        rows += [
            check_port(node.name, got.port),
            check_clock(clock if isinstance(clock, float) else None),
            check_disk(facts.disk_free_kib, facts.disk_path, envs.env_dir(inventory, node)),
            check_tcp(facts.tcp),
        ]
        checks[node.name] = rows
    return checks


def gather(fleet: Fleet) -> Gathered:
    """The three round trips, each on every node at once."""
    facts = gather_facts(fleet)
    clocks = fleet.map(clock_offset)
    master = master_of(fleet.inventory)
    return Gathered(
        master, facts, clocks, port_test(fleet, master, fleet.inventory.cluster.master_port)
    )


def diagnose(fleet: Fleet) -> dict[str, list[Check]]:
    return evaluate(fleet.inventory, gather(fleet))


_STYLE = {Status.PASS: "green", Status.WARN: "yellow", Status.FAIL: "bold red"}


def render(checks: Mapping[str, Sequence[Check]]) -> Group:
    table = Table(header_style="bold")
    for column in ("node", "check", "status", "detail", "fix"):
        table.add_column(column, overflow="fold", no_wrap=column in ("node", "check", "status"))
    for i, (name, rows) in enumerate(checks.items()):
        if i:
            table.add_section()
        for j, c in enumerate(rows):
            status = Text(c.status.value, style=_STYLE[c.status])
            cells = (name if j == 0 else "", c.name, status, Text(c.message), Text(c.fix))
            table.add_row(*cells)  # Text: "[Errno 111]" in a message is no markup
    return Group(table, Text(summary(checks)), Text(health_hint(checks)))


def health_hint(checks: Mapping[str, Sequence[Check]]) -> str:
    """The line after the counts: doctor checks the setup, `invoke health` the hardware."""
    gpu_failed = sorted(
        name
        for name, rows in checks.items()
        if any(c.status is Status.FAIL and c.name in ("driver", "gpus") for c in rows)
    )
    if gpu_failed:
        return (
            f"invoke health --nodes {','.join(gpu_failed)} names the GPU fault behind it "
            "(ECC, Xid events, remapped rows, PCIe, NVLink)"
        )
    return "next: invoke health (GPU faults, the NCCL/gloo interface; --deep: all_reduce bandwidth)"


def summary(checks: Mapping[str, Sequence[Check]]) -> str:
    counts = Counter(c.status for rows in checks.values() for c in rows)
    return ", ".join(f"{counts[s]} {s.value}" for s in Status)


def exit_if_failed(checks: Mapping[str, Sequence[Check]]) -> None:
    bad = [
        f"{name} {c.name}" for name, rows in checks.items() for c in rows if c.status is Status.FAIL
    ]
    if bad:
        raise DdpfleetError(f"doctor: {len(bad)} check(s) failed: {', '.join(bad)}")
