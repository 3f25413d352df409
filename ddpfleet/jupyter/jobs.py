"""`invoke jupyter`, `jupyter.status`, `jupyter.stop`: the nodes' servers, from the controller.

status(fleet)                {node: row | NodeError}: `jupyter server list` as the user
stop(fleet)                  {node: what happened | NodeError}
open_tunnel(inventory, port) the first node's Jupyter on this machine's loopback, until Ctrl-C
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ddpfleet import report
from ddpfleet.errors import NodeError
from ddpfleet.inventory import Inventory
from ddpfleet.jupyter.node import (
    NodeState,
    Runner,
    as_user,
    hashed_password,
    quick,
    read_config,
    read_state,
    stop_command,
)
from ddpfleet.jupyter.settings import Settings, for_node
from ddpfleet.ssh.connection import Conn, Fleet
from ddpfleet.ssh.tunnel import tunnel

# `jupyter server list` starts a Python that imports jupyter_server: on a busy node that took
# over the 20 s default command_timeout (seen on a loaded sandbox), so it gets its own floor.
LIST_TIMEOUT_S = 60.0


def server_list(node: Runner, s: Settings, state: NodeState) -> list[dict]:
    """`jupyter server list --json` as the Jupyter user (its runtime dir, its pids), tokens
    dropped: they are credentials and nobody here needs them."""
    out = node.run(
        as_user(s, state, state.home or "/", [s.jupyter, "server", "list", "--json"]),
        check=False,
        timeout=max(quick(node), LIST_TIMEOUT_S),
    ).stdout
    servers = []
    for line in out.splitlines():
        try:
            info = json.loads(line)
        except ValueError:
            continue
        if isinstance(info, dict):
            info.pop("token", None)
            servers.append(info)
    return servers


STATUS_COLUMNS = ("node", "state", "pid", "port", "service", "password", "root_dir", "version")


class AsRoot:
    """A Conn whose commands run as root (through sudo for a non-root login): the pidfiles
    are root's, and root drops to the Jupyter user with setpriv."""

    def __init__(self, conn: Conn):
        self.conn, self.node, self.name = conn, conn.node, conn.name

    def run(self, command, **kw):
        return self.conn.run(command, root=True, **kw)


def node_status(conn: Conn | AsRoot, s: Settings) -> dict:
    """One node's row: the service as `jupyter server list` sees it, as the Jupyter user."""
    state = read_state(conn, s)
    row: dict[str, Any] = {
        "node": conn.name,
        "port": s.port,
        "user": s.user,
        "service": "systemd" if state.systemd else "supervised",
    }
    if not state.uid:
        return {**row, "state": f"not installed (no user {s.user})"}
    ours = [x for x in server_list(conn, s, state) if x.get("port") == s.port]
    if not ours:
        return {**row, "state": "starting or failing" if state.running else "stopped"}
    info = ours[0]
    # server list's own "password" field reads the deprecated ServerApp.password: always False
    # with PasswordIdentityProvider.hashed_password, so the config file says it instead
    hashed = hashed_password(read_config(conn, s, state)[1])
    return {
        **row,
        "state": "running",
        "pid": info.get("pid"),
        "url": info.get("url"),
        "root_dir": info.get("root_dir"),
        "password": hashed.split(":")[0] or "none",
        "version": info.get("version"),
    }


def status(fleet: Fleet) -> dict[str, dict | NodeError]:
    return fleet.map(lambda conn: node_status(AsRoot(conn), for_node(fleet.inventory, conn.node)))


def show_status(results: Mapping[str, dict | NodeError], as_json: bool = False) -> None:
    """A table, or with as_json one object per line (keys: STATUS_COLUMNS, url, user, error)."""
    rows = [
        r if isinstance(r, dict) else {"node": n, "state": "error", "error": r.message}
        for n, r in results.items()
    ]
    if as_json:
        for row in rows:
            print(json.dumps(row, sort_keys=True), flush=True)
        return
    report.show(
        report.table(
            "jupyter", STATUS_COLUMNS, [[row.get(c, "") for c in STATUS_COLUMNS] for row in rows]
        )
    )


def stop(fleet: Fleet) -> dict[str, str | NodeError]:
    """Stop each node's server (systemd unit or supervisor); bootstrap starts it again."""

    def one(conn: Conn) -> str:
        s = for_node(fleet.inventory, conn.node)
        state = read_state(AsRoot(conn), s)
        if not state.running:
            return "not running"
        conn.run(stop_command(state), timeout=60, root=True)
        return f"stopped (was pid {state.pid})" if state.pid else "stopped"

    return fleet.map(one)


def open_tunnel(inventory: Inventory, local_port: int) -> None:
    """`invoke jupyter`: the tunnel to the first selected node's Jupyter, until Ctrl-C."""
    node = inventory.nodes[0]
    s = for_node(inventory, node)
    with Fleet(inventory, [node]) as fleet:
        conn = fleet.open()[node.name]
        if isinstance(conn, NodeError):
            raise conn

        def ready(port: int) -> None:
            report.show(
                f"{node.name}: Jupyter (127.0.0.1:{s.port} on the node) is at\n"
                f"  http://127.0.0.1:{port}/lab\n"
                "log in with the Jupyter password; Ctrl-C closes the tunnel"
            )

        start = "start it with `invoke bootstrap --roles jupyter`, see `invoke jupyter.status`"
        tunnel(conn, s.port, local_port, ready, start_hint=start, rerun="invoke jupyter")
    report.show(f"{node.name}: tunnel closed")
