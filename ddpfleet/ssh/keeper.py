"""The connection keeper: holds SSH connections for later commands (kept.py is its client).

    python -m ddpfleet.keeper SOCKET IDLE_SECONDS

One per user, inventory file and $HOME (the socket's name says which). It serves one JSON
request per Unix connection: `open` (connect the nodes it is given), `run` (a command on one
node, exactly as Conn.run, root=IF_ABLE included), `escalation`, `stats`, `exit`. Every
node arrives with its full spec; a connection is reused only while that spec, the key file and
the known_hosts files are unchanged and its transport is alive, else it is replaced through
connect(), which checks the host key exactly as a direct connection does. Nodes no longer in
the inventory file are dropped. The keeper exits when nothing asked for IDLE_SECONDS, and
accepts only its own user (SO_PEERCRED), on a 0600 socket in a 0700 directory.

It never holds a sudo password: it never reads ssh.become_password_file (nor the password's
environment variable), so its root work is only what a passwordless sudo (or a root login)
allows; kept.fleet sends an inventory that names a password file to direct connections.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import socket
import socketserver
import struct
import sys
import threading
import time
from pathlib import Path

import yaml

from ddpfleet.errors import DdpfleetError, NodeError, Unreachable
from ddpfleet.inventory import Node
from ddpfleet.ssh import connection, knownhosts
from ddpfleet.ssh.become import PASSWORD_ENV
from ddpfleet.ssh.connection import Conn, connect
from ddpfleet.ssh.parallel import parallel
from ddpfleet.ssh.result import IF_ABLE

PATHS = ("key", "known_hosts", "become_password_file")  # the Node fields that are Paths


def node_of(spec: dict) -> Node:
    """The node to connect to, without its become password file (the keeper never reads it)."""
    node = {k: Path(v) if k in PATHS and v is not None else v for k, v in spec.items()}
    return Node(**{**node, "become_password_file": None})


def _stamp(path: str | os.PathLike | None) -> tuple | None:
    return knownhosts.file_version(path) if path else None


def fingerprint(spec: dict) -> str:
    """What a connection was made from: a change in any of it means a new handshake (and a
    new escalation probe): the spec, the key, the known_hosts files, both ssh configs (Fabric
    reads /etc/ssh/ssh_config too) and the become password file (never read here; a change
    to it still means root work is found out afresh)."""
    files = (
        spec["key"],
        spec["known_hosts"],
        knownhosts.USER_KNOWN_HOSTS,
        "~/.ssh/config",
        connection.SYSTEM_SSH_CONFIG,
        spec.get("become_password_file"),
    )
    return json.dumps([spec, [_stamp(f) for f in files]], sort_keys=True, default=str)


def error_dict(e: DdpfleetError) -> dict:
    attrs = {k: v for k, v in vars(e).items() if isinstance(v, (str, int, float, type(None)))}
    return {
        "class": type(e).__name__,
        "node": getattr(e, "node", "?"),
        "message": str(e),
        "attrs": attrs,
        "args": [str(a) for a in e.args],
    }


class Keeper:
    def __init__(self, idle: float):
        self.idle = idle
        self.last = time.monotonic()
        self.conns: dict[str, tuple[str, Conn]] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.lock = threading.Lock()
        self.handshakes = 0
        self.asked: dict[str, int] = {}  # requests per op, for `stats` (tests count round trips)
        self.inventory_stamp: tuple | None = None

    def conn(self, spec: dict, fresh: bool = False) -> tuple[Conn, bool]:
        """The node's live connection, made anew when its spec or files changed, its transport
        died, or `fresh` is asked; and whether it was made just now."""
        name, fp = spec["name"], fingerprint(spec)
        with self.lock:
            node_lock = self.locks.setdefault(name, threading.Lock())
        with node_lock:
            held = self.conns.get(name)
            if held and not fresh and held[0] == fp and held[1].active:
                return held[1], False
            if held:
                self.conns.pop(name)
                held[1].close()
            conn = connect(node_of(spec))
            self.handshakes += 1
            self.conns[name] = (fp, conn)
            return conn, True

    def prune(self, inventory: str) -> None:
        """Drop the connections of nodes the inventory file no longer has."""
        stamp = _stamp(inventory)
        if stamp == self.inventory_stamp:
            return
        try:
            with open(inventory) as f:
                names = set((yaml.safe_load(f) or {}).get("nodes") or {})
        except (OSError, yaml.YAMLError, AttributeError):
            names = set()
        self.inventory_stamp = stamp
        for name in [n for n in self.conns if n not in names]:
            self.conns.pop(name)[1].close()

    def open(self, request: dict) -> dict:
        self.prune(request["inventory"])

        def one(spec):
            try:
                self.conn(spec)
                return "ok"
            except DdpfleetError as e:
                return error_dict(e)

        specs = request["nodes"]
        return {"nodes": dict(zip((s["name"] for s in specs), parallel(one, specs, 32)))}

    def run(self, request: dict) -> dict:
        """Conn.run on the kept connection. Only read-only jobs come here, so a reused
        connection that turns out dead (a node restarted, a silent peer: its channel does not
        open within connect_timeout) is replaced and the command tried once more, and the
        node's failure then reads as a direct connection's would."""
        stdin = request["stdin"]
        data = None if stdin is None else base64.b64decode(stdin)
        root = request.get("root")
        # True, False, or IF_ABLE: the escalation decided here, in the same request
        how = {"timeout": request["timeout"], "root": root if root == IF_ABLE else bool(root)}
        try:
            conn, fresh = self.conn(request["node"])
            try:
                r = conn.run(request["command"], stdin=data, check=False, **how)
            except Unreachable:
                if fresh:
                    raise
                conn, _ = self.conn(request["node"], fresh=True)
                r = conn.run(request["command"], stdin=data, check=False, **how)
        except DdpfleetError as e:
            return {"error": error_dict(e)}
        except (OSError, EOFError, ValueError) as e:
            return {"error": error_dict(NodeError(request["node"]["name"], str(e)))}
        keep = ("command", "exit_code", "stdout", "stderr")
        return {"result": {**{k: getattr(r, k) for k in keep}, "s": r.seconds}}

    def handle(self, request: dict) -> dict:
        self.last = time.monotonic()
        op = request.get("op")
        with self.lock:
            self.asked[str(op)] = self.asked.get(str(op), 0) + 1
        if op == "open":
            return self.open(request)
        if op == "run":
            return self.run(request)
        if op == "escalation":
            try:
                return {"via_sudo": self.conn(request["node"])[0].escalation.via_sudo}
            except DdpfleetError as e:
                return {"error": error_dict(e)}
        if op == "stats":
            nodes, pid = sorted(self.conns), os.getpid()
            return {
                "handshakes": self.handshakes,
                "nodes": nodes,
                "pid": pid,
                "asked": dict(self.asked),
            }
        if op == "exit":
            return {"closed": self.close()}
        return {"error": {"class": "DdpfleetError", "message": f"unknown op {op!r}"}}

    def close(self) -> int:
        with self.lock:
            held, self.conns = list(self.conns.values()), {}
        for _, conn in held:
            conn.close()
        return len(held)


class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        _, uid, _ = struct.unpack("3i", creds)
        if uid != os.getuid():  # the directory keeps others out; this is the second lock
            return
        request: dict = {}
        try:
            request = json.loads(self.rfile.readline())
            answer = self.server.keeper.handle(request)
        except (ValueError, KeyError, TypeError) as e:
            answer = {"error": {"class": "DdpfleetError", "message": f"bad request: {e}"}}
        self.wfile.write(json.dumps(answer).encode() + b"\n")
        if request.get("op") == "exit":
            threading.Thread(target=self.server.shutdown, daemon=True).start()


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def serve(path: Path, idle: float) -> int:
    os.umask(0o077)
    os.environ.pop(PASSWORD_ENV, None)  # kept.start leaves it out; never hold one anyway
    lock = open(f"{path}.lock", "w")  # noqa: SIM115 -- held for the keeper's whole life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another keeper serves this socket
    path.unlink(missing_ok=True)
    server = Server(str(path), Handler)
    os.chmod(path, 0o600)
    server.keeper = Keeper(idle)

    def watch():
        while time.monotonic() - server.keeper.last < idle:
            time.sleep(min(1.0, idle / 4))
        server.shutdown()

    threading.Thread(target=watch, daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        path.unlink(missing_ok=True)
        Path(lock.name).unlink(missing_ok=True)  # still held: a newcomer waits for none
        server.server_close()
        server.keeper.close()
    return 0


if __name__ == "__main__":
    sys.exit(serve(Path(sys.argv[1]), float(sys.argv[2])))
