"""A port on this machine's loopback forwarded to a port on a node, over the run's SSH connection.

    tunnel(conn, remote_port, local_port, on_ready, start_hint=..., rerun=...)

127.0.0.1:local_port here -> 127.0.0.1:remote_port on the node until Ctrl-C (or SIGTERM), each
local client one Conn.forward() channel: what `ssh -L` does, with the run's host-key checks and
keepalives. Both ends are loopback only: nothing else on either network can use the tunnel.
"""

from __future__ import annotations

import select
import signal
import socket
import threading
from collections.abc import Callable

from ddpfleet import report
from ddpfleet.errors import DdpfleetError, NodeError, Unreachable
from ddpfleet.ssh.connection import Conn, Forwarded


def tunnel(
    conn: Conn,
    remote_port: int,
    local_port: int,
    on_ready: Callable[[int], None],
    start_hint: str = "start what should listen there",
    rerun: str = "the command",
) -> None:
    """Serve until Ctrl-C. on_ready gets the local port (0 picks one) once the node's side was
    seen answering; `start_hint` ends the error when nothing answers there, `rerun` names what
    to run again when the SSH connection is lost."""
    listener = _listen(local_port)
    previous = _term_as_interrupt()
    try:
        _open(conn, remote_port, ("127.0.0.1", 0), start_hint, rerun).close()  # fail now
        on_ready(listener.getsockname()[1])
        _serve(conn, listener, remote_port, start_hint, rerun)
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _term_as_interrupt():
    """SIGTERM (a script's `kill`) closes the tunnel the way Ctrl-C does; main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, signal.default_int_handler)


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))  # this machine only, like the node's side
    except OSError as e:
        sock.close()
        raise DdpfleetError(
            f"cannot listen on 127.0.0.1:{port} here ({e.strerror or e}); pass "
            "--local-port with a free port (0 picks one)"
        ) from None
    sock.listen(16)
    return sock


def _open(conn: Conn, port: int, origin: tuple[str, int], start_hint: str, rerun: str) -> Forwarded:
    try:
        return conn.forward(port, origin)
    except Unreachable as e:
        raise Unreachable(conn.name, f"{e.message}; run {rerun} again") from None
    except NodeError as e:
        raise NodeError(conn.name, f"{e.message}; {start_hint}") from None


def _serve(conn: Conn, listener: socket.socket, port: int, start_hint: str, rerun: str) -> None:
    while conn.active:
        if not select.select([listener], [], [], 1.0)[0]:
            continue
        client, origin = listener.accept()
        try:
            stream = _open(conn, port, origin, start_hint, rerun)
        except Unreachable:
            client.close()
            raise
        except NodeError as e:  # the server restarting: this request fails, the tunnel stays
            client.close()
            report.warn(str(e))
            continue
        threading.Thread(target=_pump, args=(client, stream), daemon=True).start()
    raise Unreachable(conn.name, f"the SSH connection closed; run {rerun} again")


def _pump(client: socket.socket, stream: Forwarded) -> None:
    """Bytes both ways until either side closes."""
    try:
        while True:
            ready = select.select([client, stream], [], [], 30)[0]
            if client in ready:
                data = client.recv(65536)
                if not data:
                    break
                stream.sendall(data)
            if stream in ready:
                data = stream.recv(65536)
                if not data:
                    break
                client.sendall(data)
    except OSError:
        pass
    finally:
        stream.close()
        client.close()
