"""The lifelines between a detached run's supervisors: one gang without a controller.

Stdlib only; run_supervisor.py receives this file on stdin after part.py. Every worker's
supervisor keeps one TCP connection to the master's (node_rank 0). Lines both ways:

    challenge MNONCE         the master, on accept: a fresh random nonce
    hello NODE WNONCE PROOF  a worker: its name, a nonce of its own, and
                             PROOF = HMAC-SHA256(secret, "worker", MNONCE, WNONCE, NODE)
    welcome PROOF            the master: HMAC-SHA256(secret, "master", WNONCE, MNONCE, NODE)
    hb                       every HEARTBEAT_S, both ways
    fail NODE CODE           a worker's torchrun failed: the master stops the gang
    left NODE REASON         with spares: a worker's or spare's supervisor was stopped (SIGTERM)
    done NODE                a worker's torchrun ended (any other way): its close is no loss
    done                     the master's torchrun succeeded: the workers finish on their own
    stop REASON              the master stops the gang: every worker stops its part

A run with spares (spec "recovery") adds the words of generation.py's protocol (fence, take,
ckpt, go, roster one way; fenced, took, sick, ready, unready, listen the other): the lifeline
only passes them on (`heard`); a worker's or spare's loss goes to `lost`, the master's to
heard("master", "lost", why) (succession.py: a survivor leads), instead of stopping the run. A
member of the gang fetches a checkpoint on a connection of its own: `fetch NODE WNONCE PROOF
STEP` instead of hello (role "fetch"), answered by welcome and the checkpoint's pack stream.

The secret is the run's own (32 random bytes from the controller, in the spec on stdin and the
root-only spec.json). No line counts before the proofs: a connection that has not proved the
secret within AUTH_S is closed, each expected worker joins once and names only itself, and the
worker checks the master's proof too (it never obeys a `stop` from whoever else answers).
Lines are at most MAX_LINE bytes; the master holds one connection per expected worker plus
SPARE. Only the other end is checked, not each line: whoever can rewrite the TCP stream can
still cut it, which stops the run (as a lost lifeline always does). A lifeline that closes
before "done", or is silent for SILENCE_S, stops the run on both sides (without spares); a
worker that never says hello within HELLO_S stops the master.
"""

import errno
import hashlib
import hmac
import secrets
import socket
import threading
import time

HEARTBEAT_S = 0.5
SILENCE_S = 4.0
HELLO_S = 60.0
CONNECT_S = 15.0
AUTH_S = 2.0  # a connection has this long to prove the secret
MAX_LINE = 4096
SPARE = 4  # connections beyond one per expected worker (a worker's proof still in flight)
WORDS_DOWN = ("fence", "take", "ckpt", "go", "roster")  # master -> worker, with spares
WORDS_UP = ("fenced", "took", "sick", "ready", "unready", "listen")  # worker -> master


def proof(secret, role, *parts):
    """The role names who proves (worker or master), so one side's proof never serves the other."""
    return hmac.new(secret, "\n".join((role, *parts)).encode(), hashlib.sha256).hexdigest()


def proved(said, secret, role, *parts):
    return hmac.compare_digest(said.encode(), proof(secret, role, *parts).encode())


class Peer:
    def __init__(self, sock, name=None):
        self.sock, self.name = sock, name
        self.last = time.monotonic()
        self.done = False
        self.lock = threading.Lock()
        self.buf = bytearray()  # never more than MAX_LINE plus one recv

    def send(self, line):
        try:
            with self.lock:
                self.sock.sendall(line.encode() + b"\n")
        except OSError:
            pass  # its reader sees the close

    def read_line(self, deadline=None):
        """The next line; None at a close, a line over MAX_LINE, or the deadline (monotonic)."""
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 1]
                return line.decode(errors="replace") if end <= MAX_LINE else None
            if len(self.buf) > MAX_LINE:
                return None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except OSError:  # socket.timeout included
                return None
            if not data:
                return None
            self.last = time.monotonic()
            self.buf += data

    def lines(self):
        while (line := self.read_line()) is not None:
            yield line

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class Lifeline:
    """`stop(reason)` ends this node's part; `failed(node, code)` records the first failure."""

    def __init__(self, spec, stop, failed, heard=None, lost=None):
        self.node, self.rank = spec["node"], spec["rank"]
        self.master_host, self.port = spec.get("master_host"), spec.get("lifeline_port")
        self.secret = bytes.fromhex(spec.get("lifeline_secret") or "")
        self.expect = set(spec.get("workers") or ()) | set(spec.get("spares") or ())
        self.stop, self.failed = stop, failed
        # With spares (generation.py): its words go to heard(node, word, rest), a peer's loss
        # to lost(node, why) (the master) and the master's close to heard("master", "closed").
        self.heard, self.lost = heard, lost
        self.gone = set()  # master: the peers already reported lost (once each)
        self.serve_checkpoint = None  # master: step -> pack() stream, set by generation.py
        self.peers = {}  # master: worker name -> Peer, once it proved the secret
        self.joined = set()  # master: the names that proved it (each joins once)
        self.conns = 0  # master: connections open, pending or joined
        self.guard = threading.Lock()
        self.master = None  # worker: the Peer of the master
        self.server = None
        self.address = None  # master: where it listens, for state.json
        self.ended = False  # this node's torchrun is done: closes are expected now
        self.started = time.monotonic()
        self.recovery = bool(spec.get("recovery"))
        self.after_join = []  # a worker's lines once joined (succession.py's listen)
        self.orphaned = self.retired = False  # the master lost; a new lifeline replaced this

    @property
    def is_master(self):
        return self.rank == 0

    def open(self):
        """The master listens (a free port, reported to the controller); a worker connects and
        the two prove the run's secret to each other. Raises when that cannot be done."""
        if self.is_master and not self.expect:
            return None  # a one-node run: no worker to hear from
        if len(self.secret) < 16:
            raise ValueError("the spec has no lifeline_secret (start the run from this ddpfleet)")
        if self.is_master:
            self.server = self._listen()
            host, port = self.server.getsockname()[:2]
            self.address = f"{host}:{port}"
            return port
        sock = socket.create_connection((self.master_host, self.port), timeout=CONNECT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.master = Peer(sock, "master")
        try:
            self._join()
        except Exception:
            self.master.close()
            raise
        sock.settimeout(None)
        return None

    def _listen(self):
        """On the master's address the workers use, not every interface. Behind NAT that address
        is not this node's own: then every interface, the proofs still keeping strangers out."""
        try:
            return socket.create_server((self.master_host, 0), backlog=64)
        except OSError as e:
            if e.errno != errno.EADDRNOTAVAIL:
                raise
        return socket.create_server(("", 0), backlog=64)

    def _join(self):
        """The worker's half of the handshake (see the module docstring)."""
        where = f"the master's lifeline at {self.master_host}:{self.port}"
        deadline = time.monotonic() + CONNECT_S
        word, _, theirs = (self.master.read_line(deadline) or "").partition(" ")
        if word != "challenge" or not theirs:
            raise ConnectionError(f"{where} sent no challenge: not this run's master")
        mine = secrets.token_hex(16)
        said = proof(self.secret, "worker", theirs, mine, self.node)
        self.master.send(f"hello {self.node} {mine} {said}")
        word, _, said = (self.master.read_line(deadline) or "").partition(" ")
        if word != "welcome" or not proved(said, self.secret, "master", mine, theirs, self.node):
            raise ConnectionError(f"{where} refused {self.node} or did not prove the run's secret")
        for line in self.after_join:
            self.master.send(line)

    def adopt(self, server):
        """A new master (succession.py): its standby listener is where the workers come in."""
        self.server, self.started = server, time.monotonic()
        host, port = server.getsockname()[:2]
        self.address = f"{host}:{port}"

    def retire(self):
        """Replaced by a new lifeline (the master moved): nothing of this one counts now."""
        self.retired = self.ended = True
        if self.master is not None:
            self.master.close()

    def run(self):
        if self.is_master:
            if self.server is not None:
                self._thread(self._accept)
        else:
            self._thread(self._read_master)
        self._thread(self._beat)

    @staticmethod
    def _thread(target, *args):
        threading.Thread(target=target, args=args, daemon=True).start()

    def _accept(self):
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            with self.guard:
                full = self.conns >= len(self.expect) + SPARE
                self.conns += not full
            if full:
                sock.close()
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._thread(self._serve, Peer(sock))

    def _serve(self, peer):
        try:
            if self._admit(peer):
                self._read_worker(peer)
        finally:
            peer.close()
            with self.guard:
                self.conns -= 1

    def _admit(self, peer):
        """The master's half: True once `peer` proved the secret for an expected worker that
        had not joined yet; no line of a connection counts before."""
        mine = secrets.token_hex(16)
        peer.send(f"challenge {mine}")
        hello = (peer.read_line(time.monotonic() + AUTH_S) or "").split(" ")
        if len(hello) == 5 and hello[0] == "fetch":
            self._serve_fetch(peer, mine, *hello[1:])
            return False
        if len(hello) != 4 or hello[0] != "hello":
            return False
        _, node, theirs, said = hello
        if not proved(said, self.secret, "worker", mine, theirs, node):
            return False
        with self.guard:
            if node not in self.expect or node in self.joined:
                return False
            self.joined.add(node)
        peer.sock.settimeout(None)
        peer.name = node
        peer.send(f"welcome {proof(self.secret, 'master', theirs, mine, node)}")
        with self.guard:
            self.peers[node] = peer
        return True

    def _serve_fetch(self, peer, mine, node, theirs, said, step):
        """A member proved the secret (role "fetch"): the checkpoint of `step`, then the close."""
        if not proved(said, self.secret, "fetch", mine, theirs, node, step):
            return
        if node not in self.expect or self.serve_checkpoint is None or not step.isdigit():
            return
        peer.sock.settimeout(None)
        peer.send(f"welcome {proof(self.secret, 'master', theirs, mine, node)}")
        try:
            with peer.lock:
                for data in self.serve_checkpoint(int(step)):
                    peer.sock.sendall(data)
        except (OSError, ValueError):
            pass  # the receiver's unpack sees the short stream and says so

    def say(self, line):
        """A worker: one line to the master (generation.py's words)."""
        if self.master is not None:
            self.master.send(line)

    def tell(self, node, line):
        """The master: one line to `node`, if it is connected."""
        peer = self.peers.get(node)
        if peer is not None:
            peer.send(line)

    def reset(self, node):
        """The master: `node` starts a new generation; its close is a loss again."""
        peer = self.peers.get(node)
        if peer is not None:
            peer.done = False

    def _lose(self, peer, why):
        """The master: `peer` closed or went silent; with spares, generation.py decides."""
        with self.guard:
            if peer.name in self.gone:
                return
            self.gone.add(peer.name)
            self.peers.pop(peer.name, None)
        self.lost(peer.name, why)

    def _read_worker(self, peer):
        for line in peer.lines():
            word, _, rest = line.partition(" ")
            node, _, code = rest.partition(" ")
            if word == "hb":
                continue
            if self.lost is not None and word in WORDS_UP:
                self.heard(peer.name, word, rest)
            elif self.lost is not None and word == "left" and node == peer.name:
                peer.done = True  # its close is said for: once, here
                self._lose(peer, f"its supervisor was stopped ({rest.partition(' ')[2]})")
            elif word == "fail" and node == peer.name and code.lstrip("-").isdigit():
                peer.done = True
                self.failed(node, int(code))
                self.stop(f"{node} failed (exit {code})")
            elif word == "done" and node == peer.name:
                peer.done = True
            else:  # another node's name, or no line of this protocol: blame nobody, drop it
                if not peer.done and not self.ended:
                    self.stop(f"{peer.name} broke the lifeline protocol ({line[:60]!r})")
                return
        if self.lost is not None and not self.ended:
            if not peer.done:
                self._lose(peer, "its lifeline closed (its supervisor or node is gone)")
        elif not peer.done and not self.ended:
            self.stop(f"lost the lifeline to {peer.name} (its supervisor or node is gone)")

    def _read_master(self):
        for line in self.master.lines():
            word, _, rest = line.partition(" ")
            if word == "stop":
                self.stop(f"gang: {rest}")
            elif word == "done":
                self.master.done = True
            elif self.heard is not None and word in WORDS_DOWN:
                self.heard("master", word, rest)
        if self.retired:
            return
        why = "lost the lifeline to the master (its supervisor or node is gone)"
        if not self.master.done and not self.ended and self._orphan(why):
            return
        if self.heard is not None:
            self.heard("master", "closed", "")

    def _orphan(self, why):
        """A worker lost its master: with spares a survivor leads (True), else the part stops."""
        if not (self.recovery and self.heard is not None):
            return self.stop(why)
        with self.guard:
            first, self.orphaned = not self.orphaned, True
        if first and not self.retired:
            self.heard("master", "lost", why)
        return True

    def _beat(self):
        while not self.retired:
            time.sleep(HEARTBEAT_S)
            now = time.monotonic()
            with self.guard:
                peers = list(self.peers.values()) if self.is_master else [self.master]
            for peer in peers:
                peer.send("hb")
                if not peer.done and not self.ended and now - peer.last > SILENCE_S:
                    if self.lost is not None and self.is_master:
                        self._lose(peer, f"no word from it for {SILENCE_S:g}s")
                    else:  # a worker: its master (with spares a survivor leads)
                        (self._orphan if self.master is peer else self.stop)(
                            f"no word from {peer.name} for {SILENCE_S:g}s"
                        )
            missing = self.expect - self.joined
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
