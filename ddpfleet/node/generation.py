"""Generations of a detached run with spares: a lost node replaced without the controller.

Stdlib only, python 3.8; sent to the nodes as a helper of run_supervisor.py. A run started with
spares (spec "recovery") has one generation at a time: a roster (node_rank -> node) running
torchrun. The master's supervisor (node_rank 0) coordinates; every other member and every
spare follows it over the lifelines (run_lifeline.py carries the words, proved by the run's
secret like the lifeline itself):

    master -> member/spare          member/spare -> master
    fence GEN                       fenced GEN          its part stopped, nothing left running
    take GEN RANK LOST              took GEN | sick GEN WHY   a spare, health-checked first
    ckpt GEN STEP                   ready GEN SECONDS FETCHED | unready GEN WHY
    go GEN PORT RANK HOST           (torchrun again: that node_rank, the new master port)
    roster JSON                     listen HOST:PORT    (where it would lead: succession.py)

On trouble (a lost lifeline, a failed rank, its own torchrun's end) the master fences the gang
(every part stopped and confirmed) and waits SETTLE_S from the first sign, so that a dead node's
silence is seen before anything is decided: a rank's own error with every node still there is
no loss (the run ends as without spares: FAILED, naming node and rank); a lost member is
replaced by the first healthy spare (its node_rank taken over), the master's newest complete
checkpoint made the one every node resumes from (newer ones discarded, the missing one fetched
from the master and verified by hash: checkpoints.py pack/unpack), and torchrun started on
every node with a fresh rendezvous (a new master port, held until its store adopts it).
The master's own loss: a survivor leads instead (succession.py).

Policy: at most `max_recoveries`; a generation lost at the same node_rank before its first
step is the same failure twice in a row (the circuit breaker stops there); no healthy spare
left: FAILED "<node> lost, no spare left", every part stopped. Each generation goes into the
master's state.json ("generations"), and a line into node.log.
"""

import os
import queue
import shutil
import socket
import threading
import time

SETTLE_S = 5.0  # from the first sign of trouble: a lost node's silence (4 s) is seen by then
FENCE_S = 20.0  # beyond the grace: every surviving part confirms its stop
TAKE_S = 60.0  # a spare's health check and its answer
READY_S = 180.0  # the checkpoint in place on every node of the new generation
PROGRESS_POLL_S = 0.2


def rewrite(argv, **flags):
    """torchrun's argv with these flags' values replaced (node_rank=1 -> --node-rank 1)."""
    argv = list(argv)
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        i = argv.index(flag)
        argv[i + 1] = str(value)
    return argv


def checkpoint_dir(spec, run_dir):
    return spec["env"].get("DDPFLEET_CHECKPOINT_DIR") or os.path.join(run_dir, "checkpoints")


def discard_newer(ck, directory, step):
    """Every step-<n> newer than `step` removed (-1: all): the gang resumes from one step."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    gone = []
    for name in names:
        found = ck.STEP.match(name)
        if found and int(found.group(1)) > step:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
            gone.append(name)
    return gone


def spare_health(m, spec):
    """(ok, reason) for a spare about to take a place: health_node.spare_verdict (the fail-level
    quick checks of `invoke health`, on the node), its expected GPUs the inventory's gpus:."""
    check = getattr(getattr(m, "health_node", None), "spare_verdict", None)
    if check is None:
        return True, "not checked (health_node.spare_verdict is not shipped)"
    try:
        return check(spec.get("recovery", {}).get("expected_gpus"))
    except Exception as e:  # noqa: BLE001 - a check that breaks is a sick spare, said why
        return False, f"the health check failed: {e}"


class Coordinator:
    """The master's side: fences, decides, replaces, restarts (see the module docstring)."""

    def __init__(self, sup, m):
        self.sup, self.m, spec = sup, m, sup.spec
        self.q = queue.Queue()
        self.lock = threading.Lock()
        self.gen = 1
        self.roster = {0: spec["node"]}
        self.roster.update({i + 1: w for i, w in enumerate(spec.get("workers") or ())})
        self.spares = list(spec.get("spares") or ())
        self.max = int(spec["recovery"].get("max_recoveries", 3))
        self.lost_now = {}  # node -> (why, time): members lost in this generation
        self.trouble = None  # (reason, time, monotonic) of this generation's first trouble
        self.fenced = False
        self.final = None  # a stop that ends the run (invoke stop)
        self.recovering = False
        self.generations = [{"generation": 1, "nodes": self.nodes(), "started": time.time()}]
        self.skipped = []  # spares not taken: {"node", "why"}
        self.outcome = (None, None)  # (status, reason) when the run ends otherwise than usual
        self.listen = {}  # node -> "host:port" where it would lead (succession.py)
        self.voters = set(self.roster.values()) | set(self.spares)  # this generation's
        self.master_lost = None  # the old master, in the generation that replaced it
        self.leaving = None  # SIGTERMed without invoke stop: a survivor leads (succession.py)

    def nodes(self):
        return [self.roster[r] for r in sorted(self.roster)]

    def members(self):
        return [n for r, n in sorted(self.roster.items()) if r]

    # -- from the lifeline's threads ---------------------------------------------------------

    def lost(self, node, why):
        at = time.time()
        if node in self.spares:  # a standby spare gone: one fewer to take a place
            with self.lock:
                self.spares.remove(node)
                self.skipped.append({"node": node, "why": f"lost while standing by: {why}"})
            self.sup.save(spares=list(self.spares), skipped=list(self.skipped))
            return
        if node not in self.roster.values():
            return
        with self.lock:
            self.lost_now.setdefault(node, (why, at))
        self.log(f"{node} lost: {why}")
        self.sup.save(recovering=f"{node} lost: {why}")
        self.q.put(("lost", node, why))
        if not self.recovering:
            self.fence(f"{node} lost: {why}")

    def heard(self, node, word, rest):
        if word == "listen":
            self.listen[node] = rest
            self.broadcast()
        else:
            self.q.put((word, node, rest))

    def broadcast(self):
        line = self.m.succession.roster_line(self)
        for node in list(self.sup.lifeline.peers):
            self.sup.lifeline.tell(node, line)

    # -- the run's own events ----------------------------------------------------------------

    def fence(self, reason, own=True):
        """Stop every part of this generation (once), this node's too unless it ended."""
        with self.lock:
            if self.trouble is None:
                self.trouble = (reason, time.time(), time.monotonic())
            first, self.fenced = not self.fenced, True
        if first:
            for node in self.members():
                self.sup.lifeline.tell(node, f"fence {self.gen}")
        if own:
            self.sup.part.stop()

    def after_part(self, code):
        """After this node's torchrun ended: None (finish as without spares; the status, when
        not the usual one, is in self.outcome) or True (a new generation runs)."""
        self.outcome = (None, None)
        if self.leaving:  # no stop said to anyone: its close is the master's loss to them
            self.outcome = ("STOPPED", self.leaving)
            return None
        if self.final:  # invoke stop: whoever the fence told, every node hears the end
            self.sup.lifeline.stop_all(self.final)
            return None
        if code == 0 and not self.sup.part.stopping.is_set():
            return None
        self.fence(f"{self.roster[0]} exit {code}", own=False)
        return self.settle()

    def settle(self):
        """Every member's fence confirmed (or it is out), then: a loss is recovered from, a
        rank's own error ends the run as without spares (None)."""
        waiting = set(self.members())
        settle = self.trouble[2] + SETTLE_S
        deadline = time.monotonic() + (self.sup.spec.get("grace") or 0) + FENCE_S
        while (waiting or time.monotonic() < settle) and time.monotonic() < deadline:
            if self.final:
                self.sup.lifeline.stop_all(self.final)
                return None
            if self.leaving:  # SIGTERMed meanwhile: said to no one (see after_part)
                self.outcome = ("STOPPED", self.leaving)
                return None
            word, node, _ = self.next(0.2)
            if word in ("fenced", "lost") and node in waiting:
                waiting.discard(node)
            waiting -= set(self.lost_now)
        for node in waiting:  # still running, or cannot say: it is out of the gang
            self.sup.lifeline.tell(node, "stop did not confirm its fence")
            self.lost_now.setdefault(node, ("did not confirm its stop", time.time()))
        if self.leaving:
            self.outcome = ("STOPPED", self.leaving)
            return None
        if not self.lost_now:  # a rank's own error: as without spares
            self.sup.stop_reason = self.trouble[0]
            self.sup.lifeline.stop_all(self.trouble[0])
            return None
        return self.recover()

    def next(self, timeout):
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            return (None, None, None)

    def collect(self, nodes, words, within):
        """{node: (word, rest)} of the first of `words` each of `nodes` says for this
        generation, within `within` seconds; a node lost meanwhile says ("lost", why)."""
        got, deadline = {}, time.monotonic() + within
        while set(nodes) - set(got) and time.monotonic() < deadline and not self.final:
            word, node, rest = self.next(0.2)
            if word == "lost" and node in nodes:
                got[node] = ("lost", rest)
            elif word in words and node in nodes:
                gen, _, rest = (rest or "").partition(" ")
                if gen == str(self.gen):
                    got[node] = (word, rest)
        return got

    def give_up(self, reason):
        self.log(f"no recovery: {reason}")
        self.outcome = ("FAILED", reason)
        self.sup.stop_reason = reason
        self.sup.lifeline.stop_all(reason)
        self.sup.save(generations=self.generations, spares=self.spares, skipped=self.skipped,
                      gave_up=reason, recovering=None)  # fmt: skip
        return None

    def recover(self):
        lost = dict(self.lost_now)
        names = ", ".join(sorted(lost))
        ranks = sorted(r for r, n in self.roster.items() if n in lost)
        last = self.generations[-1]
        if len(self.generations) - 1 >= self.max:
            return self.give_up(f"{names} lost; --max-recoveries {self.max} reached")
        if last.get("lost_ranks") == ranks and last.get("first_step") is None:
            return self.give_up(
                f"{names} lost at node_rank {ranks} again before the new generation's first "
                "step: the same failure twice in a row, not recovering"
            )
        reached = {self.roster[0], *self.sup.lifeline.peers}
        if self.spares and not self.m.succession.majority(reached, self.voters):
            return self.give_up(f"{names} lost and only {len(reached & self.voters)} of "
                                f"{len(self.voters)} nodes answer: cut off, not recovering")  # fmt: skip
        self.recovering = True
        self.gen += 1
        lost_at = min(t for _, t in lost.values())
        replaced = []
        for r in ranks:
            old = self.roster[r]
            new = self.take(r, old)
            if new is None:
                return self.give_up(f"{old} lost, no spare left")
            self.roster[r] = new
            replaced.append({"node_rank": r, "lost": old, "by": new, "why": lost[old][0]})
        step, took = self.checkpoint()
        if step is None:
            return None
        listener = socket.create_server((self.sup.spec["master_host"], 0), backlog=128)
        port = listener.getsockname()[1]
        for r, node in sorted(self.roster.items()):
            if r:
                self.sup.lifeline.reset(node)
                self.sup.lifeline.tell(
                    node, f"go {self.gen} {port} {r} {self.sup.spec['master_host']}"
                )
        entry = {"generation": self.gen, "nodes": self.nodes(), "replaced": replaced,
                 "master": self.roster[0], "master_lost": self.master_lost,
                 "lost_ranks": ranks, "lost_at": lost_at, "resumed_step": step,
                 "checkpoint_s": took, "checkpoint_nodes": self.nodes_ready,
                 "master_port": port, "started": time.time(),
                 "first_step": None, "recovery_s": None}  # fmt: skip
        self.generations.append(entry)
        for rep in replaced:
            self.log(f"generation {self.gen}: {rep['by']} takes node_rank {rep['node_rank']} "
                     f"of {rep['lost']} ({rep['why']})")  # fmt: skip
        self.log(f"generation {self.gen}: resuming from step {step}, master port {port}")
        self.lost_now, self.trouble, self.fenced = {}, None, False
        self.voters, self.master_lost = set(self.roster.values()) | set(self.spares), None
        self.sup.restart(rewrite(self.sup.spec["argv"], master_port=port), listener)
        self.sup.save(generation=self.gen, generations=self.generations, spares=self.spares,
                      skipped=self.skipped, roster=self.nodes(), recovering=None)  # fmt: skip
        self.broadcast()
        self.recovering = False
        threading.Thread(target=self.watch, args=(entry,), daemon=True).start()
        return True

    def take(self, rank, old):
        """The first spare that says it is healthy takes `rank`; None when none is left."""
        while self.spares:
            with self.lock:
                spare = self.spares.pop(0)
            self.sup.lifeline.tell(spare, f"take {self.gen} {rank} {old}")
            said = self.collect([spare], ("took", "sick"), TAKE_S).get(spare)
            if said and said[0] == "took":
                return spare
            why = said[1] if said else f"no answer within {TAKE_S:g}s"
            self.skipped.append({"node": spare, "why": why})
            self.log(f"spare {spare} skipped: {why}")
        return None

    def checkpoint(self):
        """Every member resumes from the master's newest complete checkpoint: (step, seconds
        until every node had it), step -1 for none; (None, _) when a node could not."""
        began, ck = time.monotonic(), self.m.checkpoints
        directory = checkpoint_dir(self.sup.spec, self.sup.run_dir)
        found = ck.newest_complete(directory)
        step = found[1]["step"] if found else -1
        # the training user's dir: changed as that user, never by root (proctree.as_user)
        self.m.proctree.as_user(self.sup.spec.get("user"), discard_newer, ck, directory, step)
        paths = {step: found[0]} if found else {}
        self.sup.lifeline.serve_checkpoint = lambda s: ck.pack(paths[s])
        members, self.nodes_ready = self.members(), {}
        for node in members:
            self.sup.lifeline.tell(node, f"ckpt {self.gen} {step}")
        said = self.collect(members, ("ready", "unready"), READY_S)
        for node in members:
            word, rest = said.get(node) or ("unready", f"no answer within {READY_S:g}s")
            if word != "ready":
                self.give_up(f"{node} could not get the checkpoint of step {step}: {rest}")
                return None, 0
            self.log(f"{node}: checkpoint of step {step} ready ({rest})")
            self.nodes_ready[node] = rest
        return step, round(time.monotonic() - began, 4)

    def watch(self, entry):
        """The new generation's first step: the progress file says a step after the resume."""
        path = self.sup.spec["env"].get("DDPFLEET_PROGRESS_FILE")
        while path and self.gen == entry["generation"] and not self.sup.part.stopping.is_set():
            said = self.m.records.read_json(path) or {}
            if (said.get("time") or 0) > entry["started"] and (said.get("step") or 0) > max(
                entry["resumed_step"], 0
            ):
                entry["first_step"] = said["time"]
                entry["recovery_s"] = round(said["time"] - entry["lost_at"], 3)
                self.log(f"generation {entry['generation']}: first step {said['step']}, "
                         f"{entry['recovery_s']:.1f}s after the loss")  # fmt: skip
                self.sup.save(generations=self.generations)
                self.broadcast()
                return
            time.sleep(PROGRESS_POLL_S)

    def log(self, line):
        self.sup.log(f"[ddpfleet recovery] {line}")
