"""A member's or a spare's side of a run with spares: it obeys the master's words.

Stdlib only, python 3.8; sent to the nodes as a helper of run_supervisor.py (after
generation.py, whose protocol and helpers it uses). The master fences, asks a spare to take a
lost node's place, names the checkpoint every node resumes from and starts the next generation
(generation.Coordinator); a follower stops its part, checks its health, fetches the checkpoint
from the master and starts torchrun again with the node_rank and master port it is given. When
the master itself is lost it follows (or becomes) the new master (succession.py).
"""

import os
import queue
import secrets
import time


class Follower:
    """A member's or a spare's side: obeys the master's fence, take, ckpt and go."""

    def __init__(self, sup, m):
        self.sup, self.m = sup, m
        self.q = queue.Queue()
        self.gen = 1
        self.fenced = 0
        self.final = None
        self.outcome = (None, None)
        rec = sup.spec.get("recovery") or {}  # the roster until the master tells one
        self.roster, self.spares = dict(enumerate(rec.get("gang") or ())), rec.get("spares", [])
        self.listen, self.generations, self.orphaned = {}, [], None
        self.standby = m.succession.standby(sup.spec)  # where it would lead, if ever

    def heard(self, node, word, rest):
        if word == "roster":
            return self.m.succession.heard_roster(self, rest)
        if word == "lost":  # the master's lifeline: closed or silent
            self.orphaned = rest
            if self.sup.part is not None:
                self.sup.part.stop()
        if word == "fence" and rest == str(self.gen):
            self.fenced = self.gen
            if self.sup.part is not None:
                self.sup.part.stop()
        self.q.put((word, rest))

    def stopped(self, reason):
        self.final = reason
        self.q.put(("final", reason))

    def after_part(self, code):
        """After this node's torchrun ended (None: a spare standing by): True when a new
        generation runs here; else None, with self.outcome = (status or None, reason)."""
        sup = self.sup

        def say(line):  # the lifeline of the moment: a new one once the master moved
            sup.lifeline.say(line)

        own = None
        self.outcome = (None, None)
        if code is not None and not self.final and not self.orphaned:
            if self.fenced == self.gen:
                say(f"fenced {self.gen}")
            elif code == 0 and not sup.part.stopping.is_set():
                return None
            else:
                own = code
                say(f"fail {sup.spec['node']} {code}")
        while True:
            if self.final:
                self.outcome = ("FAILED" if own else None, None)
                return None
            word, rest = self.q.get()
            if word == "fence" and rest == str(self.gen):
                say(f"fenced {self.gen}")
            elif word == "closed":
                self.outcome = ("FAILED" if own else "STOPPED", "the master's lifeline closed")
                return None
            elif word == "lost":
                led = self.m.succession.master_lost(self, rest)
                if led != "joined":
                    return led
                self.orphaned = None
            elif word == "take":
                if not self.take(*rest.split(" ")):
                    return None
            elif word == "ckpt":
                self.checkpoint(*rest.split(" "))
            elif word == "go":
                gen, port, rank, *host = rest.split(" ")
                self.gen, self.fenced = int(gen), 0
                host = host[0] if host else sup.spec["master_host"]
                argv = self.m.generation.rewrite(
                    sup.spec["argv"], master_port=port, node_rank=rank, master_addr=host
                )
                sup.spec["rank"] = int(rank)
                sup.restart(argv, None)
                sup.save(generation=self.gen, rank=int(rank), recovering=None)
                return True

    def take(self, gen, rank, lost):
        ok, why = self.m.generation.spare_health(self.m, self.sup.spec)
        self.gen = int(gen)
        if not ok:
            self.sup.lifeline.say(f"sick {gen} {why}")
            self.sup.log(f"[ddpfleet recovery] not taking {lost}'s place: {why}")
            self.outcome = ("STOPPED", f"spare not healthy: {why}")
            return False
        self.sup.spec["rank"] = int(rank)
        self.sup.save(status="STARTING", standby=False, rank=int(rank), replaces=lost, health=why)
        self.sup.log(f"[ddpfleet recovery] taking node_rank {rank} of {lost} (health: {why})")
        self.sup.lifeline.say(f"took {gen}")
        return True

    def keep_only(self, ck, directory, step, fetch):
        """As the training user: nothing newer than `step` kept, and `step` fetched from the
        master when `fetch` (checkpoints.unpack: verified, renamed into place only whole)."""
        self.m.generation.discard_newer(ck, directory, step)
        if fetch:
            fetch_checkpoint(
                self.m.run_lifeline, self.sup.lifeline, step, lambda f: ck.unpack(f, directory)
            )

    def checkpoint(self, gen, step):
        """The checkpoint of `step` here (fetched from the master when missing), nothing
        newer: ready GEN SECONDS FETCHED, or unready GEN WHY."""
        ck, spec, began = self.m.checkpoints, self.sup.spec, time.monotonic()
        directory, step = self.m.generation.checkpoint_dir(spec, self.sup.run_dir), int(step)
        try:
            here = os.path.join(directory, ck.step_name(step))
            fetched = int(step >= 0 and ck.complete(here) is None)
            # The training user's dir: the discard and the fetched files are that user's work
            # (a child dropped to it), so a symlink planted there reaches nothing of root's.
            self.m.proctree.as_user(spec.get("user"), self.keep_only, ck, directory, step, fetched)
            took = time.monotonic() - began
            self.sup.lifeline.say(f"ready {gen} {took:.3f}s fetched={fetched}")
        except (OSError, ValueError, KeyError) as e:
            self.sup.lifeline.say(f"unready {gen} {e}")


def fetch_checkpoint(L, line, step, readable_into):
    """The master's checkpoint of `step` on a connection of its own, proved like the lifeline
    `line` (L: run_lifeline, role "fetch"); `readable_into(file)` reads the stream
    (checkpoints.unpack)."""
    sock = L.socket.create_connection((line.master_host, line.port), timeout=L.CONNECT_S)
    peer = L.Peer(sock, "master")
    try:
        deadline = time.monotonic() + L.CONNECT_S
        word, _, theirs = (peer.read_line(deadline) or "").partition(" ")
        if word != "challenge" or not theirs:
            raise ConnectionError("the master's lifeline sent no challenge")
        mine = secrets.token_hex(16)
        said = L.proof(line.secret, "fetch", theirs, mine, line.node, str(step))
        peer.send(f"fetch {line.node} {mine} {said} {step}")
        word, _, said = (peer.read_line(deadline) or "").partition(" ")
        if word != "welcome" or not L.proved(said, line.secret, "master", mine, theirs, line.node):
            raise ConnectionError("the master refused the checkpoint fetch")
        sock.settimeout(L.CONNECT_S * 4)
        rest = bytes(peer.buf)
        with sock.makefile("rb") as f:
            return readable_into(_Prefixed(rest, f))
    finally:
        peer.close()


class _Prefixed:
    """A readable: what the handshake's reader had already buffered, then the file."""

    def __init__(self, head, f):
        self.head, self.f = head, f

    def read(self, n):
        if self.head:
            data, self.head = self.head[:n], self.head[n:]
            return data
        return self.f.read(n)
