"""The master's port on a node: held from the preflight on, never free until torchrun has it.

Stdlib only, Linux; loaded by gang_runner.py and run_supervisor.py (sent on stdin as a helper).

    bind / Held     the master's runner binds the port in the preflight and answers the
                    workers' checks (reach), then keeps it listening (Held.quiet)
    (attached)      the runner starts torchrun, whose store adopts the socket (part.adopting)
    hand_over       (detached) the runner gives the socket to the run's supervisor, the first
                    root process to connect to an abstract unix socket (SCM_RIGHTS)
    take_over       (detached) the supervisor receives it, checking the runner's pid/uid with
                    SO_PEERCRED, and its torchrun adopts it the same way

So between the check and the run no other process (a second run, `doctor`, a local user) can
take the port.
"""

import array
import os
import select
import socket
import struct
import threading
import time


class Held:
    """The master port, bound and listening from the preflight on: connects from the workers'
    checks are answered until quiet(); then the socket stays listening for torchrun's store to
    adopt (gang_runner; a detached run's supervisor gets it handed over), so the port is never
    free between the check and the run."""

    def __init__(self, sock):
        self.sock = sock
        self.stopped = threading.Event()
        self.server = threading.Thread(target=self.serve, daemon=True)
        self.server.start()

    def serve(self):
        while not self.stopped.is_set():
            if not select.select([self.sock], [], [], 0.1)[0]:
                continue
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            # Wait for the worker to close first, so TIME_WAIT lands on its side, not here.
            conn.settimeout(10)
            try:
                while conn.recv(64):
                    pass
            except OSError:
                pass
            conn.close()

    def quiet(self):
        """Stop answering (a stray check's connection is closed) but keep listening."""
        self.stopped.set()
        self.server.join(timeout=12)
        self.sock.setblocking(False)
        try:
            while True:
                self.sock.accept()[0].close()
        except OSError:
            pass
        self.sock.setblocking(True)

    def close(self):
        self.quiet()
        self.sock.close()


def bind(port):
    """The free-port test: bind like torchrun's store will (all IPv4 addresses) and listen.

    Returns (Held, None) or (None, why).
    """
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        srv.bind(("0.0.0.0", port))
        srv.listen(64)
    except OSError as e:
        srv.close()
        return None, e.strerror or str(e)
    return Held(srv), None


def reach(address, port, timeout):
    """One real TCP connect to the master's listener; retried while its runner may still be
    starting (refused), for `timeout` seconds in all.

    Returns None or why not.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = max(0.1, deadline - time.monotonic())
        try:
            with socket.create_connection((address, port), timeout=left) as s:
                s.sendall(b"ddpfleet preflight\n")
            return None
        except OSError as e:
            why = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        if time.monotonic() > deadline:
            return f"{why} after {timeout:g}s"
        time.sleep(0.05)


def peer(conn):
    """(pid, uid) of the process at the other end of a unix socket, as the kernel says."""
    pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid


def hand_over(listener, name, cancel, ready, timeout):
    """A detached run's master: the preflight's held `listener` (still listening) goes to the
    run's supervisor, the first root process to connect to the abstract unix socket `name`
    (SCM_RIGHTS); anyone else is refused. `ready()` once it can connect; `cancel` (an fd)
    readable: the controller gave up. Returns None, or why the port was not handed over."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind("\0" + name)
        srv.listen(8)
        ready()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = select.select([srv, cancel], [], [], left)[0]
            if cancel in got:
                return "called off before the run's supervisor took it"
            if srv in got:
                conn = srv.accept()[0]
                with conn:
                    if peer(conn)[1] == 0:
                        fds = array.array("i", [listener.fileno()])
                        conn.sendmsg([b"P"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                        return None
        return f"the run's supervisor did not take it within {timeout:g}s"
    except OSError as e:
        return f"{name}: {e.strerror or e}"
    finally:
        srv.close()


def take_over(handoff):
    """In the master's supervisor: the listening socket its preflight runner holds, from the
    runner named in `handoff` ({"name", "pid", "uid", "port"}: the kernel's word on the peer
    must match what that runner told the controller). ValueError naming what went wrong."""
    port, fds = handoff["port"], array.array("i")
    why = f"the master port {port} held since the preflight was not handed over"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        try:
            conn.connect("\0" + handoff["name"])
            who = peer(conn)
            if who != (handoff["pid"], handoff["uid"]):
                raise ValueError(f"{why}: its socket is held by pid {who[0]} uid {who[1]}, "
                                 f"not by the preflight runner (pid {handoff['pid']})")  # fmt: skip
            _, data, _, _ = conn.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
        except OSError as e:
            raise ValueError(f"{why}: {e.strerror or e}") from None
    for level, kind, body in data:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            fds.frombytes(body[: len(body) - len(body) % fds.itemsize])
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"{why}: the preflight runner sent {len(fds)} sockets, not one")
    sock = socket.socket(fileno=fds[0])
    if (
        sock.family != socket.AF_INET
        or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 1
        or sock.getsockname()[1] != port
    ):
        sock.close()
        raise ValueError(f"{why}: what the preflight runner sent does not listen on it")
    return sock
