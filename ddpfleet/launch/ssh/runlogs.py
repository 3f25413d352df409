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
    problem line per node that could not be read."""
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
        problems.append(f"{node}: {e.message}")


def _line(node: str, raw: bytes, node_rank: int, nproc: int, want: int | None, out: Output):
    r, body = split_rank(raw.decode(errors="replace").rstrip("\r"), node_rank, nproc)
    if want is not None and r != want:
        return
    out.line(f"[{node}] {body}" if r is None else f"[{node} r{r}] {body}")


def nodes_of(said: Mapping[str, dict | NodeError], run_id: str, only: Sequence[str]) -> dict:
    return {
        n: a[run_id]
        for n, a in said.items()
        if isinstance(a, dict) and run_id in a and (not only or n in only)
    }
