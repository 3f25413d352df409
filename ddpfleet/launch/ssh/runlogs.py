"""`invoke logs RUN [--node N] [--rank R] [-f]`: a detached run's output from its nodes, each
line prefixed with its node and rank as an attached run prints it.

One exec channel per node runs run_ctl.py logs, which sends node.log from the start and, with
-f, what is written after, until the node's supervisor ends. Reading never touches the run:
Ctrl-C (or a lost connection) closes the channels and the run goes on.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

from ddpfleet.errors import NodeError
from ddpfleet.launch import sync
from ddpfleet.launch.clues import split_rank
from ddpfleet.launch.output import LineSplitter, Output
from ddpfleet.launch.ssh import runctl
from ddpfleet.ssh.connection import Fleet


def show(
    fleet: Fleet,
    pythons: Mapping[str, str],
    run_id: str,
    parts: Mapping[str, Mapping],
    rank: int | None = None,
    follow: bool = False,
    out: Output | None = None,
) -> list[str]:
    """Stream every node's lines (parts: node -> its run_ctl.py list entry); returns one
    problem line per node whose reading failed on the way."""
    out = out or Output()
    problems: list[str] = []
    chans = []
    for node, part in parts.items():
        conn = fleet.conns[node]
        command = runctl.ctl_command(pythons[node], "logs", run_id, "1" if follow else "0")
        chan = conn.session(command, root=True)  # node.log is root's: it may show --env values
        chan.sendall(sync.helper_sources(runctl.CTL_FILES))
        chans.append((node, part, chan))
    threads = [
        threading.Thread(target=_pump, args=(n, p, c, rank, out, problems), daemon=True)
        for n, p, c in chans
    ]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    finally:  # Ctrl-C included: only our channels close, never the run
        for _, _, chan in chans:
            chan.close()
    return problems


def _pump(node, part, chan, rank, out: Output, problems: list[str]) -> None:
    nproc, node_rank = part.get("nproc") or 1, part.get("rank") or 0
    lines = LineSplitter()
    try:
        while data := chan.recv(65536):
            for raw in lines.feed(data):
                _line(node, raw, node_rank, nproc, rank, out)
        for raw in lines.end():
            _line(node, raw, node_rank, nproc, rank, out)
    except NodeError as e:
        problems.append(f"{node}: reading its lines failed ({e.message}); the rest are not shown")


def _line(node: str, raw: bytes, node_rank: int, nproc: int, want: int | None, out: Output):
    r, body = split_rank(raw.decode(errors="replace").rstrip("\r"), node_rank, nproc)
    if want is not None and r != want:
        return
    out.line(f"[{node}] {body}" if r is None else f"[{node} r{r}] {body}")


def nodes_of(
    said: Mapping[str, dict | NodeError], run_id: str, order: Sequence[str]
) -> tuple[dict, list[str]]:
    """The run's nodes in `order` whose lines can be read (node -> its run_ctl.py list
    entry), and one problem line for each other one: unreachable, outside this inventory, or
    without the run's record (rebuilt). None of them is left out silently."""
    parts, problems = {}, []
    for n in order:
        answer = said.get(n)
        if answer is None:
            problems.append(f"{n} is not in this inventory; its lines are not shown")
        elif isinstance(answer, NodeError):
            problems.append(f"{n} unreachable ({answer.message}); its lines are not shown")
        elif run_id not in answer:
            problems.append(f"{n} has no record of the run (rebuilt or pruned?); no lines")
        else:
            parts[n] = answer[run_id]
    return parts, problems


def ranks_of(said: Mapping[str, dict | NodeError], run_id: str, order: Sequence[str]) -> dict:
    """node -> its global ranks, from the spec any node of the run still has (its node order
    and processes per node): known for a node that cannot be asked now, too."""
    for answer in said.values():
        part = answer.get(run_id) if isinstance(answer, dict) else None
        if part and part.get("nproc"):
            nodes = part.get("meta", {}).get("nodes") or order
            nproc = int(part["nproc"])
            return {n: range(i * nproc, (i + 1) * nproc) for i, n in enumerate(nodes)}
    return {}
