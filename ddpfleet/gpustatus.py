"""`invoke gpu-status`: every GPU of every node in one table, one SSH round trip per node.

    with Fleet(inventory) as fleet:
        results = query(fleet)            # {node: NodeGpus | NodeError}, all nodes in parallel
        report.show(render(results))      # one row per GPU, then the totals
        print(json.dumps(document(results)))   # --json, REPORT_SCHEMA

Probing and parsing live in ddpfleet.gpu (nvidia-smi's format is kept in that one place); this
module only runs the probe, adds totals and draws. A NodeError means the node could not be
queried (SSH failed, the probe timed out or printed nothing we know): the only reason for a
non-zero exit. A node whose nvidia-smi is absent or fails is a NodeGpus with `driver_error`
set, which is a state, not an error.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ddpfleet import gpu, report
from ddpfleet.errors import BecomeError, ConnectError, NodeError, Unreachable

if TYPE_CHECKING:  # the warm path (kept.py) must not load paramiko
    from ddpfleet.ssh.connection import Conn, Fleet

PROBE_TIMEOUT_S = 30.0  # a GPU that fell off the bus can hang nvidia-smi for minutes
COLUMNS = ("node", "gpu", "name", "util", "memory", "temp", "power", "processes")
REPORT_ID = "ddpfleet.gpu-status-report/2"

Outcome = gpu.NodeGpus | NodeError


def probe(conn: Conn) -> gpu.NodeGpus:
    """One round trip: gpu.probe_script() under sh, parsed. Unrecognised output is an error."""
    # As root where sudo makes that cheap: the training user's /proc/<pid>/environ (its run id)
    # is unreadable to the login user. A node that cannot become root is still queried.
    try:
        root = conn.escalation.via_sudo
    except BecomeError:
        root = False
    result = conn.run(["sh", "-c", gpu.probe_script()], timeout=PROBE_TIMEOUT_S, root=root)
    node = gpu.parse_probe(result.stdout)
    if node.driver_error and node.exit_code is None:
        raise NodeError(conn.name, node.driver_error)
    return node


def query(fleet: Fleet) -> dict[str, Outcome]:
    return fleet.map(probe)


def is_busy(g: gpu.Gpu) -> bool:
    # Compute apps, or utilisation from work nvidia-smi does not list (graphics, other VMs).
    return bool(g.processes) or (g.util_pct or 0) > 0


def driver_state(node: gpu.NodeGpus) -> str:
    """The row text for a node whose nvidia-smi did not answer."""
    if node.exit_code in gpu.NO_DRIVER_CODES:
        return f"no NVIDIA driver: {node.driver_error}"
    if node.exit_code == gpu.NO_DEVICES_CODE:
        return f"no GPU: the driver is loaded but lists no device ({node.driver_error})"
    return f"nvidia-smi failed (exit {node.exit_code}): {node.driver_error}"


# --- totals and JSON -------------------------------------------------------------------------


@dataclass(frozen=True)
class Totals:
    nodes: int
    unqueried: int  # could not be queried (unreachable, timed out)
    no_gpu: int  # queried, but nvidia-smi absent or failing
    gpus: int
    busy: int
    idle: int
    mem_used_mib: int
    mem_total_mib: int


def totals(results: Mapping[str, Outcome]) -> Totals:
    nodes = [r for r in results.values() if isinstance(r, gpu.NodeGpus)]
    gpus = [g for node in nodes for g in node.gpus]
    busy = sum(is_busy(g) for g in gpus)
    return Totals(
        nodes=len(results),
        unqueried=len(results) - len(nodes),
        no_gpu=sum(1 for node in nodes if node.driver_error),
        gpus=len(gpus),
        busy=busy,
        idle=len(gpus) - busy,
        mem_used_mib=sum(g.mem_used_mib or 0 for g in gpus),
        mem_total_mib=sum(g.mem_total_mib or 0 for g in gpus),
    )


_COUNT = {"type": "integer", "minimum": 0}

# The whole `gpu-status --json` document. Stable: fields are only ever added, under a new
# REPORT_ID. `nodes` holds one gpu.JSON_SCHEMA object per node, in inventory order; a node that
# could not be queried has `reachable` false when SSH failed, or `reachable` true with
# `exit_code` null when the probe itself failed (timeout); `totals` sums what was queried.
REPORT_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": REPORT_ID,
    "type": "object",
    "required": ["schema", "time", "nodes", "totals"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": REPORT_ID},
        "time": {"type": "string"},  # ISO 8601, UTC, when the probes returned
        "nodes": {"type": "array", "items": gpu.JSON_SCHEMA},
        "totals": {
            "type": "object",
            "required": [f.name for f in Totals.__dataclass_fields__.values()],
            "additionalProperties": False,
            "properties": {name: _COUNT for name in Totals.__dataclass_fields__},
        },
    },
}


def node_json(name: str, outcome: Outcome) -> dict:
    if isinstance(outcome, ConnectError):
        return gpu.unreachable_json(name, outcome.message)
    if isinstance(outcome, NodeError):
        return gpu.to_json(name, gpu.NodeGpus((), outcome.message, None))
    return gpu.to_json(name, outcome)


def document(results: Mapping[str, Outcome], when: datetime | None = None) -> dict:
    """`--json`: {"schema", "time", "nodes": [...], "totals": {...}}, matching REPORT_SCHEMA."""
    when = when or datetime.now(timezone.utc)
    return {
        "schema": REPORT_ID,
        "time": when.isoformat(timespec="seconds"),
        "nodes": [node_json(name, outcome) for name, outcome in results.items()],
        "totals": dataclasses.asdict(totals(results)),
    }


# --- the table -------------------------------------------------------------------------------


def _gib(mib: int | None) -> str:
    return "-" if mib is None else f"{mib / 1024:.1f}"


def _unit(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:.0f} {unit}"


def _process(p: gpu.GpuProcess) -> str:
    # The program's base name: the env's path says little and costs most of the column.
    program, _, args = p.command.partition(" ")
    command = f"{program.rsplit('/', 1)[-1]} {args}".strip()
    command = command if len(command) <= 40 else command[:37] + "..."
    mem = "-" if p.mem_mib is None else f"{_gib(p.mem_mib)} GiB"
    run = f" [run {p.run_id}]" if p.run_id else ""
    run += f" [slurm job {p.slurm_job_id}]" if p.slurm_job_id else ""
    return f"{p.pid} {p.user or '?'} {mem} {command}{run}"


def gpu_row(node: str, g: gpu.Gpu) -> tuple[str, ...]:
    power = _unit(g.power_w, "W")
    if g.power_limit_w is not None:
        power += f" / {g.power_limit_w:.0f} W"
    return (
        node,
        f"{g.index}" + (" MIG" if g.mig_mode == "Enabled" else ""),
        g.name,
        _unit(g.util_pct, "%"),
        f"{_gib(g.mem_used_mib)} / {_gib(g.mem_total_mib)} GiB",
        _unit(g.temp_c, "C"),
        power,
        "\n".join(_process(p) for p in g.processes) or "-",
    )


def node_rows(name: str, outcome: Outcome) -> list[tuple[str, ...]]:
    """A node's rows: one per GPU; one for a node without GPUs or not queried."""
    if isinstance(outcome, NodeError):
        what = "unreachable" if isinstance(outcome, ConnectError) else "not queried"
        return [(name, "-", f"{what}: {outcome.message}", "", "", "", "", "")]
    if outcome.driver_error:
        return [(name, "-", driver_state(outcome), "", "", "", "", "")]
    rows = [gpu_row(name, g) for g in outcome.gpus]
    if outcome.unattached:  # apps whose GPU nvidia-smi did not let us find
        procs = "\n".join(_process(p) for p in outcome.unattached)
        rows.append((name, "?", "GPU not known", "", "", "", "", procs))
    return rows


def totals_row(t: Totals) -> tuple[str, ...]:
    parts = [f"{t.nodes} node" + ("s" if t.nodes != 1 else "")]
    parts += [
        f"{n} {what}" for n, what in ((t.no_gpu, "without GPUs"), (t.unqueried, "not queried")) if n
    ]
    nodes = ", ".join(parts)
    return (
        "total",
        f"{t.gpus}",
        f"{t.busy} busy, {t.idle} idle",
        "",
        f"{_gib(t.mem_used_mib)} / {_gib(t.mem_total_mib)} GiB",
        "",
        "",
        nodes,
    )


def render(results: Mapping[str, Outcome], title: str | None = None) -> Group:
    """The table (one row per GPU, the totals last), then any notes the parser left."""
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in COLUMNS:
        table.add_column(column, overflow="fold", no_wrap=column == "node")
    for name, outcome in results.items():
        for row in node_rows(name, outcome):
            table.add_row(*map(Text, row))  # Text: a "[run ...]" or "[N/A]" is no markup
    table.add_section()
    table.add_row(*map(Text, totals_row(totals(results))), style="bold")
    notes = [
        Text(f"{name}: {note}", style="yellow")
        for name, outcome in results.items()
        if isinstance(outcome, gpu.NodeGpus)
        for note in outcome.notes
    ]
    return Group(table, *notes)


# --- the task ----------------------------------------------------------------------------------


def run(fleet: Fleet, as_json: bool = False, every: float | None = None) -> dict[str, Outcome]:
    """The task: once or every `every` seconds, the table or --json; returns the last results."""
    if every:
        return watch(fleet, every, draw=_json_line if as_json else None)
    results = query(fleet)
    if as_json:
        sys.stdout.write(json.dumps(document(results), indent=2) + "\n")
    else:
        report.show(render(results))
    return results


def _json_line(results: Mapping[str, Outcome]) -> None:
    sys.stdout.write(json.dumps(document(results)) + "\n")
    sys.stdout.flush()


def watch(
    fleet: Fleet, seconds: float, draw: Callable[[Mapping[str, Outcome]], None] | None = None
) -> dict[str, Outcome]:
    """Refresh every `seconds` on the fleet's open connections until Ctrl-C; returns the last
    results. `draw` replaces the live table (--json: one document a line per refresh)."""
    results = query(fleet)
    try:
        if draw is not None:
            while True:
                draw(results)
                time.sleep(seconds)
                results = _requery(fleet)
        with Live(_titled(results, seconds), console=report.console, auto_refresh=False) as screen:
            while True:
                time.sleep(seconds)
                results = _requery(fleet)
                screen.update(_titled(results, seconds), refresh=True)
    except KeyboardInterrupt:
        return results


def _requery(fleet: Fleet) -> dict[str, Outcome]:
    # A watch outlives reboots: a node whose connection dropped, or that did not answer, is
    # connected again by Fleet.open(); the others keep their connections.
    for name, conn in list(fleet.conns.items()):
        transport = getattr(conn, "transport", None)  # a kept connection is the keeper's care
        if transport is not None and not transport.is_active():
            conn.close()
            del fleet.conns[name]
    for name, error in list(fleet.errors.items()):
        if isinstance(error, Unreachable):
            del fleet.errors[name]
    return query(fleet)


def _titled(results: Mapping[str, Outcome], seconds: float) -> Group:
    now = datetime.now().strftime("%H:%M:%S")
    return render(results, title=f"every {seconds:g}s, last {now}; Ctrl-C to stop")
