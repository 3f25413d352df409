"""`invoke gpu-status`: every GPU of every node in one table, one SSH round trip per node.

    with Fleet(inventory) as fleet:
        results = query(fleet)            # {node: NodeGpus | NodeError}, all nodes in parallel
        report.show(render(results))      # one row per GPU, then the totals
        print(json.dumps(document(results)))   # --json, REPORT_SCHEMA

Probing and parsing live in ddpfleet.gpu (nvidia-smi's format is kept in that one place), each
node's JSON in ddpfleet.gpujson; this module only runs the probe, adds totals and draws. The
table's columns are one list, COLUMNS: a column is its name, its cell for a GPU and its cell in
the totals row, so adding one is one entry. A NodeError means the node could not be
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

from ddpfleet import gpu, gpujson
from ddpfleet.errors import ConnectError, NodeError
from ddpfleet.ssh.result import IF_ABLE

# rich (and report, its user) load where a table is drawn, not with the module: `--json` never
# needs them, and the installed command's lean path loads them while the nodes answer.
if TYPE_CHECKING:  # the warm path (kept.py) must not load the SSH library
    from rich.console import Group

    from ddpfleet.ssh.connection import Conn, Fleet

PROBE_TIMEOUT_S = 30.0  # a GPU that fell off the bus can hang nvidia-smi for minutes

Outcome = gpu.NodeGpus | NodeError


def probe(conn: Conn) -> gpu.NodeGpus:
    """One round trip: gpu.probe_script() under sh, parsed. Unrecognised output is an error."""
    # As root where the connection can become root: the training user's /proc/<pid>/environ
    # (its run id) is unreadable to the login user. A node that cannot is still queried, as
    # the login user. IF_ABLE decides that in the run itself: one keeper request, not two.
    result = conn.run(["sh", "-c", gpu.probe_script()], timeout=PROBE_TIMEOUT_S, root=IF_ABLE)
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

# The whole `gpu-status --json` document, gpujson.SCHEMA_ID (the one id of this output; its
# nodes name it too). Stable: fields are only ever added, under a new id. `nodes` holds one
# gpujson.JSON_SCHEMA object per node, in inventory order; a node that
# could not be queried has `reachable` false when SSH failed, or `reachable` true with
# `exit_code` null when the probe itself failed (timeout); `totals` sums what was queried.
REPORT_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": gpujson.SCHEMA_ID,
    "type": "object",
    "required": ["schema", "time", "nodes", "totals"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": gpujson.SCHEMA_ID},
        "time": {"type": "string"},  # ISO 8601, UTC, when the probes returned
        "nodes": {"type": "array", "items": gpujson.JSON_SCHEMA},
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
        return gpujson.unreachable_json(name, outcome.message)
    if isinstance(outcome, NodeError):
        return gpujson.to_json(name, gpu.NodeGpus((), outcome.message, None))
    return gpujson.to_json(name, outcome)


def document(results: Mapping[str, Outcome], when: datetime | None = None) -> dict:
    """`--json`: {"schema", "time", "nodes": [...], "totals": {...}}, matching REPORT_SCHEMA."""
    when = when or datetime.now(timezone.utc)
    return {
        "schema": gpujson.SCHEMA_ID,
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


def _index(g: gpu.Gpu) -> str:
    return f"{g.index}" + (" MIG" if g.mig_mode == "Enabled" else "")


def _memory(used: int | None, total: int | None) -> str:
    return f"{_gib(used)} / {_gib(total)} GiB"


def _power(g: gpu.Gpu) -> str:
    limit = "" if g.power_limit_w is None else f" / {g.power_limit_w:.0f} W"
    return _unit(g.power_w, "W") + limit


def _processes(processes: tuple[gpu.GpuProcess, ...]) -> str:
    return "\n".join(_process(p) for p in processes)


def _nodes(t: Totals) -> str:
    parts = [f"{t.nodes} node" + ("s" if t.nodes != 1 else "")]
    parts += [
        f"{n} {what}" for n, what in ((t.no_gpu, "without GPUs"), (t.unqueried, "not queried")) if n
    ]
    return ", ".join(parts)


@dataclass(frozen=True)
class Column:
    """One column of the table after `node`: its header, a GPU's cell and the totals' cell."""

    name: str
    cell: Callable[[gpu.Gpu], str]
    total: Callable[[Totals], str] = lambda t: ""


NODE = "node"  # the first column, never wrapped: the node's name, or "total"
COLUMNS: tuple[Column, ...] = (
    Column("gpu", _index, lambda t: f"{t.gpus}"),
    Column("name", lambda g: g.name, lambda t: f"{t.busy} busy, {t.idle} idle"),
    Column("util", lambda g: _unit(g.util_pct, "%")),
    Column(
        "memory",
        lambda g: _memory(g.mem_used_mib, g.mem_total_mib),
        lambda t: _memory(t.mem_used_mib, t.mem_total_mib),
    ),
    Column("temp", lambda g: _unit(g.temp_c, "C")),
    Column("power", _power),
    Column("processes", lambda g: _processes(g.processes) or "-", _nodes),
)


def _row(node: str, cells: Mapping[str, str]) -> tuple[str, ...]:
    """A row from its cells by column name; a column not named is empty."""
    return (node, *(cells.get(c.name, "") for c in COLUMNS))


def gpu_row(node: str, g: gpu.Gpu) -> tuple[str, ...]:
    return (node, *(c.cell(g) for c in COLUMNS))


def node_rows(name: str, outcome: Outcome) -> list[tuple[str, ...]]:
    """A node's rows: one per GPU; one for a node without GPUs or not queried."""
    if isinstance(outcome, NodeError):
        what = "unreachable" if isinstance(outcome, ConnectError) else "not queried"
        return [_row(name, {"gpu": "-", "name": f"{what}: {outcome.message}"})]
    if outcome.driver_error:
        return [_row(name, {"gpu": "-", "name": driver_state(outcome)})]
    rows = [gpu_row(name, g) for g in outcome.gpus]
    if outcome.unattached:  # apps whose GPU nvidia-smi did not let us find
        procs = _processes(outcome.unattached)
        rows.append(_row(name, {"gpu": "?", "name": "GPU not known", "processes": procs}))
    return rows


def totals_row(t: Totals) -> tuple[str, ...]:
    return ("total", *(c.total(t) for c in COLUMNS))


def render(results: Mapping[str, Outcome], title: str | None = None) -> Group:
    """The table (one row per GPU, the totals last), then any notes the parser left."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column(NODE, overflow="fold", no_wrap=True)
    for column in COLUMNS:
        table.add_column(column.name, overflow="fold")
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
        from ddpfleet import report

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
    from rich.live import Live

    from ddpfleet import report

    results = query(fleet)
    if draw is None and not report.console.is_terminal:
        # A pipe or a file: no screen to redraw in place, so one whole table per refresh.
        draw = lambda results: report.show(_titled(results, seconds))  # noqa: E731
    try:
        if draw is not None:
            while True:
                draw(results)
                sys.stdout.flush()
                time.sleep(seconds)
                results = _requery(fleet)
        with Live(_framed(results, seconds), console=report.console, auto_refresh=False) as screen:
            while True:
                time.sleep(seconds)
                results = _requery(fleet)
                screen.update(_framed(results, seconds), refresh=True)
    except KeyboardInterrupt:
        return results


def _requery(fleet: Fleet) -> dict[str, Outcome]:
    # A watch outlives reboots: a node whose connection dropped, or that did not answer, is
    # connected again; the others keep their connections (a kept one is the keeper's care).
    fleet.reconnect_lost()
    return query(fleet)


def _framed(results: Mapping[str, Outcome], seconds: float) -> Group:
    """The live table, fitted to the terminal's width now (it may have been resized)."""
    from ddpfleet import report

    return report.fit(_titled(results, seconds), report.console.width)


def _titled(results: Mapping[str, Outcome], seconds: float) -> Group:
    now = datetime.now().strftime("%H:%M:%S")
    return render(results, title=f"every {seconds:g}s, last {now}; Ctrl-C to stop")
