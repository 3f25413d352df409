"""The master's own loss in a run with spares: a survivor becomes the new master.

Stdlib only, python 3.8; sent to the nodes as a helper of run_supervisor.py (after
generation.py). The master's supervisor coordinates a run with spares (generation.py); when its
node is lost, the survivors go on without it:

- Who leads: the member with the lowest node_rank after the master's, in the roster of the
  generation that lost it (node_rank 1 in the first generation). Every survivor reads it from the
  same roster, which the master tells every member and spare on each change (`roster JSON`: the
  nodes by node_rank, the spares left, each node's standby address, the generations so far), so
  they all name the same node with no vote that could split. Not a spare: a spare holds no
  checkpoint of the run. Not "the freshest checkpoint": that needs a round of asking first,
  and a node that cannot be asked would make two survivors answer differently.
- Where: every member's and spare's supervisor opens a standby listener when it starts (its own
  address, a free port) and tells the master (`listen HOST:PORT`); the others connect there
  once the master is gone, proving the run's secret as they did to the old master
  (run_lifeline.py). The run id and the secret stay the same.
- Quorum: the successor leads only when more than half of the generation's nodes and spares
  (itself included) joined it within ELECT_S; the old master follows the same rule before it
  replaces anyone (generation.Coordinator.recover). A node cut off alone (the old master or the
  successor) so never trains on beside the others: it stops its own part and ends.
- Ranks: the new master takes node_rank 0 (torchrun's store and its fresh port live on the
  master's supervisor), a spare takes the new master's old node_rank, every other member keeps
  its own. A global rank computes the same shard of every step wherever it runs (the data
  depends on seed, step and rank only), so the run ends with an uninterrupted run's weights.
Then the new master fences, replaces and restarts as generation.Coordinator does for a worker.
"""

import errno
import json
import socket
import time

ELECT_S = 15.0  # the survivors join the successor: a close is seen at once, silence in 4 s,
# then each stops its own part (the grace) before it joins
RETRY_S = 0.2
ROSTER_MAX = 3500  # below the lifeline's MAX_LINE: older generations shrink to their number


def successor(roster):
    """The node that leads once the master (node_rank 0) is lost: the lowest other node_rank.
    `roster`: node_rank -> node of the generation that lost the master. None: no member left."""
    ranks = [r for r in roster if r]
    return roster[min(ranks)] if ranks else None


def majority(reached, voters):
    """True when the nodes `reached` (a leader and those it hears) are more than half of
    `voters` (the generation's nodes and spares): two sides of a partition never both are."""
    return 2 * len(set(reached) & set(voters)) > len(voters)


def standby(spec):
    """A member's or spare's listener for the day it leads (None without spares): on its own
    address, else every interface (behind NAT), the proofs still keeping strangers out."""
    rec = spec.get("recovery")
    if not rec:
        return None
    host = (rec.get("hosts") or {}).get(spec["node"]) or ""
    try:
        return socket.create_server((host, 0), backlog=64)
    except OSError as e:
        if e.errno != errno.EADDRNOTAVAIL:
            raise
    return socket.create_server(("", 0), backlog=64)


def listen_line(spec, server):
    """What a member tells each master it joins: where it would lead."""
    host = (spec["recovery"].get("hosts") or {}).get(spec["node"]) or server.getsockname()[0]
    return f"listen {host}:{server.getsockname()[1]}"


def roster_line(c):
    """The master's roster for every member and spare (generation.Coordinator `c`)."""
    gens = [{k: v for k, v in g.items() if k != "checkpoint_nodes"} for g in c.generations]
    while True:
        said = {"gen": c.gen, "nodes": c.nodes(), "spares": list(c.spares), "listen": c.listen,
                "generations": gens}  # fmt: skip
        line = "roster " + json.dumps(said, separators=(",", ":"))
        full = [i for i, g in enumerate(gens[:-1]) if len(g) > 1]
        if len(line) <= ROSTER_MAX or not full:
            return line
        gens[full[0]] = {"generation": gens[full[0]].get("generation")}


def heard_roster(f, rest):
    """A follower keeps the master's roster, and the generations in its own state.json (the
    controller reads the run there while no master answers)."""
    try:
        said = json.loads(rest)
        f.roster = dict(enumerate(said["nodes"]))
        f.spares, f.listen = list(said["spares"]), dict(said["listen"])
        f.generations = list(said["generations"])
    except (ValueError, KeyError, TypeError):
        return
    f.sup.save(generations=f.generations)


def master_lost(f, why):
    """A follower (generation.Follower `f`) lost the master: True when it leads now (the
    Coordinator's first generation runs), "joined" when it follows the successor, None when it
    ends (f.outcome says why)."""
    old, me = f.roster.get(0), f.sup.spec["node"]
    lead = successor(f.roster)
    f.sup.save(recovering=f"{old} (the master) lost: {why}")
    if lead == me:
        return take_over(f, old, why)
    f.sup.log(f"[ddpfleet recovery] {old} (the master) lost: {why}; following {lead}")
    address = f.listen.get(lead)
    if address is None:
        f.outcome = ("STOPPED", f"{old} (the master) lost, and {lead} never said where it leads")
        return None
    host, _, port = address.rpartition(":")
    spec = dict(f.sup.spec, master_host=host, lifeline_port=int(port))
    line = f.m.run_lifeline.Lifeline(spec, f.sup.stop, f.sup.first_failure, f.heard)
    line.after_join = [listen_line(spec, f.standby)]
    deadline = time.monotonic() + ELECT_S
    while True:
        try:
            line.open()
            break
        except OSError as e:  # ConnectionError included: its accept may not run yet
            if time.monotonic() > deadline or f.final:
                f.outcome = ("STOPPED", f"{old} (the master) lost; {lead} did not lead: {e}")
                return None
            time.sleep(RETRY_S)
    f.sup.lifeline.retire()
    f.sup.lifeline, f.sup.spec["master_host"] = line, host
    line.run()
    return "joined"


def take_over(f, old, why):
    """This follower leads: a generation.Coordinator with the roster it knows, the standby
    listener as its lifeline; then the old master's place is filled as a lost worker's."""
    sup, m, at = f.sup, f.m, time.time()
    me, mine = sup.spec["node"], sup.spec["rank"]
    host = (sup.spec["recovery"].get("hosts") or {}).get(me) or f.standby.getsockname()[0]
    roster = dict(f.roster)
    roster[0], roster[mine] = me, old  # the old master's place: the one a spare fills
    others = [n for r, n in sorted(roster.items()) if r and n != old]
    voters = set(roster.values()) | set(f.spares)
    sup.spec.update(rank=0, master_host=host, workers=others, spares=list(f.spares))
    sup.spec["argv"] = m.generation.rewrite(sup.spec["argv"], node_rank=0, master_addr=host)
    c = m.generation.Coordinator(sup, m)
    c.gen, c.roster, c.voters, c.listen = f.gen, roster, voters, dict(f.listen)
    c.generations = f.generations or [
        dict(c.generations[0], nodes=[n for _, n in sorted(f.roster.items())])
    ]
    line = m.run_lifeline.Lifeline(sup.spec, sup.stop, sup.first_failure, c.heard, c.lost)
    line.adopt(f.standby)
    sup.lifeline.retire()
    sup.lifeline, sup.gen = line, c
    line.run()
    c.log(f"{old} (the master) lost: {why}; {me} leads (node_rank {mine}, the lowest after the "
          f"master's), waiting for {', '.join(others + c.spares) or 'nobody'}")  # fmt: skip
    expected = set(others) | set(c.spares)
    deadline = time.monotonic() + ELECT_S
    while expected - line.joined and time.monotonic() < deadline:
        time.sleep(RETRY_S)
    missing = expected - line.joined
    line.expect -= missing
    reached = {me} | line.joined
    if not majority(reached, voters):
        return c.give_up(
            f"{old} (the master) lost and {me} reached only {len(reached & voters)} of "
            f"{len(voters)} nodes: not a majority, so not leading (cut off?)"
        )
    for node in sorted(missing):
        if node in c.spares:
            c.spares.remove(node)
            c.skipped.append({"node": node, "why": "did not join the new master"})
        else:
            c.lost_now[node] = (f"did not join the new master within {ELECT_S:g}s", at)
    c.lost_now[old] = (f"the master, lost: {why}", at)
    c.master_lost = old
    sup.save(rank=0, master=True, lifeline=line.address, roster=c.nodes(),
             generations=c.generations, recovering=f"{old} (the master) lost: {why}")  # fmt: skip
    # every member stopped its own part when it lost the master; the fence confirms it, and the
    # wait for a lost node's silence is over (the election took longer)
    c.fence(f"{old} (the master) lost: {why}", own=False)
    c.trouble = (c.trouble[0], at, time.monotonic() - m.generation.SETTLE_S)
    return c.settle()
