"""The lifelines between a detached run's supervisors: one gang without a controller.

Stdlib only; run_supervisor.py receives this file on stdin after proctree.py. Every worker's
supervisor keeps one TCP connection to the master's (node_rank 0). Lines both ways:

    hello NODE          a worker, once, when it connects
    hb                  every HEARTBEAT_S, both ways
    fail NODE CODE      a worker's torchrun failed: the master stops the gang
    done NODE           a worker's torchrun ended (any other way): its close is no loss
    done                the master's torchrun succeeded: the workers finish on their own
    stop REASON         the master stops the gang: every worker stops its part

A lifeline that closes before "done", or is silent for SILENCE_S (a dead node, a partition),
stops the run on both sides. A worker that never says hello within HELLO_S stops the master.
So a failed rank or a dead node ends every node's part within SILENCE_S plus the grace.
"""

import socket
import threading
import time

HEARTBEAT_S = 0.5
SILENCE_S = 4.0
HELLO_S = 60.0
CONNECT_S = 15.0


class Peer:
    def __init__(self, sock, name=None):
        self.sock, self.name = sock, name
        self.last = time.monotonic()
        self.done = False
        self.lock = threading.Lock()

    def send(self, line):
        try:
            with self.lock:
                self.sock.sendall(line.encode() + b"\n")
        except OSError:
            pass  # its reader sees the close

    def lines(self):
        buf = b""
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            if not data:
                return
            self.last = time.monotonic()
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                yield line.decode(errors="replace")


class Lifeline:
    """`stop(reason)` ends this node's part; `failed(node, code)` records the first failure."""

    def __init__(self, spec, stop, failed):
        self.node, self.rank = spec["node"], spec["rank"]
        self.master_host, self.port = spec.get("master_host"), spec.get("lifeline_port")
        self.expect = set(spec.get("workers") or ())
        self.stop, self.failed = stop, failed
        self.peers = {}  # master: worker name -> Peer
        self.master = None  # worker: the Peer of the master
        self.server = None
        self.ended = False  # this node's torchrun is done: closes are expected now
        self.started = time.monotonic()

    @property
    def is_master(self):
        return self.rank == 0

    def open(self):
        """The master listens (a free port, reported to the controller); a worker connects."""
        if self.is_master:
            self.server = socket.create_server(("", 0), backlog=256)
            return self.server.getsockname()[1]
        sock = socket.create_connection((self.master_host, self.port), timeout=CONNECT_S)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.master = Peer(sock, "master")
        self.master.send(f"hello {self.node}")
        return None

    def run(self):
        if self.is_master:
            self._thread(self._accept)
        else:
            self._thread(self._read_master)
        self._thread(self._beat)

    @staticmethod
    def _thread(target, *args):
        threading.Thread(target=target, args=args, daemon=True).start()

    def _accept(self):
        if not self.expect:
            return
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._thread(self._read_worker, Peer(sock))

    def _read_worker(self, peer):
        for line in peer.lines():
            word, _, rest = line.partition(" ")
            if word == "hello":
                peer.name = rest
                self.peers[rest] = peer
            elif word == "fail":
                node, _, code = rest.partition(" ")
                peer.done = True
                self.failed(node, int(code))
                self.stop(f"{node} failed (exit {code})")
            elif word == "done":
                peer.done = True
        if peer.name is not None and not peer.done and not self.ended:
            self.stop(f"lost the lifeline to {peer.name} (its supervisor or node is gone)")

    def _read_master(self):
        for line in self.master.lines():
            word, _, rest = line.partition(" ")
            if word == "stop":
                self.stop(f"gang: {rest}")
            elif word == "done":
                self.master.done = True
        if not self.master.done and not self.ended:
            self.stop("lost the lifeline to the master (its supervisor or node is gone)")

    def _beat(self):
        while True:
            time.sleep(HEARTBEAT_S)
            now = time.monotonic()
            peers = list(self.peers.values()) if self.is_master else [self.master]
            for peer in peers:
                peer.send("hb")
                if not peer.done and not self.ended and now - peer.last > SILENCE_S:
                    self.stop(f"no word from {peer.name} for {SILENCE_S:g}s")
            missing = self.expect - set(self.peers)
            if self.is_master and missing and now - self.started > HELLO_S:
                self.stop(f"{', '.join(sorted(missing))} never joined within {HELLO_S:g}s")

    def stop_all(self, reason):
        """The master passes a stop on to every worker."""
        if self.is_master:
            for peer in list(self.peers.values()):
                peer.send(f"stop {reason}")

    def finished(self, node, code, status):
        """This node's torchrun ended: tell the other side, then expect the close."""
        self.ended = True
        if self.is_master:
            word = "done" if status == "SUCCEEDED" else f"stop {node} failed (exit {code})"
            if status != "STOPPED":  # a stop has told every worker already
                for peer in list(self.peers.values()):
                    peer.send(word)
        elif status == "FAILED":
            self.master.send(f"fail {node} {code}")
        else:
            self.master.send(f"done {node}")
