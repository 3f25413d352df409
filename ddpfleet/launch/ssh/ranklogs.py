"""torchrun's per-rank logs back from the nodes into logs/<run-id>/."""

from __future__ import annotations

import re
import stat as st
from collections.abc import Sequence
from pathlib import Path

from ddpfleet.errors import NodeError
from ddpfleet.hygiene import open_private
from ddpfleet.launch.plan import NodePlan, Plan
from ddpfleet.ssh.connection import NODE_IO_ERRORS, Conn, Fleet

RANK_LOG = re.compile(r"attempt_(\d+)/(\d+)/([^/]+)$")


def local_log_name(node: NodePlan, nproc: int, rel: str) -> str:
    """'<rdzv>_x/attempt_0/1/stderr.log' on node1 (rank 1, 2 procs) -> 'node1-rank3.stderr.log'."""
    m = RANK_LOG.search(rel)
    if not m:
        return f"{node.node}-{rel.rsplit('/', 1)[-1]}"
    attempt = f".attempt{m.group(1)}" if m.group(1) != "0" else ""
    rank = node.rank * nproc + int(m.group(2))
    return f"{node.node}-rank{rank}{attempt}.{m.group(3)}"


def _remote_files(sftp, top: str) -> list[str]:
    """Every regular file under `top`, through the node's Conn.sftp() client."""
    found, todo = [], [top]
    while todo:
        d = todo.pop()
        for a in sftp.listdir_attr(d):
            path = f"{d}/{a.filename}"
            if st.S_ISDIR(a.st_mode or 0):
                todo.append(path)
            elif st.S_ISREG(a.st_mode or 0):
                found.append(path)
    return sorted(found)


def fetch_rank_logs(
    fleet: Fleet, p: Plan, run_dir: Path, nodes: Sequence[str]
) -> dict[str, int | NodeError]:
    """torchrun's per-rank files from these nodes' --log-dir into logs/<run-id>/."""

    def one(conn: Conn) -> int:
        n = p.node(conn.name)
        try:
            sftp = conn.sftp(n.user)
            try:
                paths = _remote_files(sftp, n.log_dir)
            except FileNotFoundError:
                return 0  # torchrun never got as far as making it
            for path in paths:
                local = run_dir / local_log_name(n, p.nproc, path[len(n.log_dir) + 1 :])
                with open_private(local, "wb") as f:
                    sftp.getfo(path, f)
        except NODE_IO_ERRORS as e:  # this node's SFTP (a full disk, a lost channel)
            raise NodeError(conn.name, f"SFTP from {n.log_dir} failed: {e}") from None
        return len(paths)

    return fleet.map(one, [n for n in nodes if fleet.conns[n].active])
