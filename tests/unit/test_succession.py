"""The master's loss in a run with spares (issue 22): the election rule and the quorum
(ddpfleet/node/succession.py), a worker's lifeline that reports its master lost instead of
stopping, a survivor that joins the new master's standby listener on real sockets of
127.0.0.1, and the controller's view of a run whose master moved (runstate.fold)."""

from __future__ import annotations

import importlib.util
import json
import secrets
import socket
import time
import types
from pathlib import Path

from ddpfleet.launch.ssh.runstate import fold, leader
from tests.unit.test_generation import until

NODE = Path(__file__).resolve().parents[2] / "ddpfleet" / "node"
SECRET = secrets.token_hex(32)
HOSTS = {"node0": "127.0.0.1", "node1": "127.0.0.1", "node2": "127.0.0.1", "node3": "127.0.0.1"}


def load(name):
    spec = importlib.util.spec_from_file_location(name, NODE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


L, S = load("run_lifeline"), load("succession")


def test_the_successor_is_the_lowest_node_rank_after_the_masters():
    assert S.successor({0: "node0", 1: "node1", 2: "node2"}) == "node1"
    # a spare that took node_rank 1 earlier leads: every survivor reads the same roster
    assert S.successor({0: "node0", 2: "node2", 1: "node3"}) == "node3"
    assert S.successor({0: "node1", 2: "node2"}) == "node2"  # no node_rank 1 in this roster
    assert S.successor({0: "node0"}) is None  # a one-node gang: nobody to lead


def test_only_a_majority_of_the_nodes_and_spares_leads():
    voters = {"node0", "node1", "node2", "node3"}
    assert S.majority({"node1", "node2", "node3"}, voters)  # the master lost: 3 of 4
    assert not S.majority({"node1"}, voters)  # node1 cut off alone: it never leads
    assert not S.majority({"node0", "node3"}, voters)  # a 2/2 split: neither side goes on
    assert not S.majority({"node1", "elsewhere"}, voters)  # only the run's nodes count
    assert S.majority({"node1", "node3"}, {"node0", "node1", "node3"})  # 2 nodes + 1 spare


def coordinator(gens):
    c = types.SimpleNamespace(gen=len(gens), spares=["node4"], generations=gens)
    c.listen = {"node1": "10.0.0.2:4000"}
    c.nodes = lambda: ["node0", "node1", "node2"]
    return c


def test_the_roster_fits_a_lifeline_line_and_keeps_the_generations_count():
    big = {"node_rank": 1, "lost": "nodeX", "by": "nodeY", "why": "x" * 400}
    gens = [{"generation": i + 1, "nodes": ["node0"], "replaced": [big], "checkpoint_nodes": {}}
            for i in range(20)]  # fmt: skip
    line = S.roster_line(coordinator(gens))
    assert line.startswith("roster ") and len(line) <= S.ROSTER_MAX < L.MAX_LINE
    said = json.loads(line.split(" ", 1)[1])
    assert [g["generation"] for g in said["generations"]] == list(range(1, 21))
    assert said["generations"][-1]["replaced"] == [big]  # the newest whole
    assert all("checkpoint_nodes" not in g for g in said["generations"])

    saved = {}
    f = types.SimpleNamespace(sup=types.SimpleNamespace(save=lambda **kw: saved.update(kw)))
    S.heard_roster(f, line.split(" ", 1)[1])
    assert f.roster == {0: "node0", 1: "node1", 2: "node2"} and f.spares == ["node4"]
    assert f.listen == {"node1": "10.0.0.2:4000"} and saved["generations"] == f.generations


def spec(node, rank, port=None, recovery=True, **kw):
    return {"node": node, "rank": rank, "master_host": "127.0.0.1", "lifeline_port": port,
            "lifeline_secret": SECRET, "workers": [], "spares": [],
            "recovery": {"hosts": HOSTS, "gang": ["node0", "node1", "node2"]} if recovery else None,
            **kw}  # fmt: skip


class Master:
    """A master's lifeline (on a standby listener it adopted, as a new master's)."""

    def __init__(self, workers, server=None):
        self.heard, self.lost, self.stops = [], [], []
        s = spec("node1" if server else "node0", 0, workers=workers)
        self.line = L.Lifeline(s, self.stops.append, lambda n, c: None,
                               lambda n, w, r: self.heard.append((n, w, r)),
                               lambda n, why: self.lost.append(n))  # fmt: skip
        if server is None:
            self.port = self.line.open()
        else:
            self.line.adopt(server)
            self.port = server.getsockname()[1]
        self.line.run()


def test_a_worker_with_spares_reports_its_masters_loss_instead_of_stopping():
    master = Master(["node2"])
    heard, stops = [], []
    line = L.Lifeline(spec("node2", 2, master.port), stops.append, lambda n, c: None,
                      lambda n, w, r: heard.append((w, r)))  # fmt: skip
    line.after_join = ["listen 127.0.0.1:5555"]
    line.open()
    line.run()
    assert until(lambda: ("node2", "listen", "127.0.0.1:5555") in master.heard)
    master.line.server.close()
    master.line.peers["node2"].close()  # the master's node is gone
    assert until(lambda: [w for w, _ in heard] == ["lost"])
    time.sleep(0.3)
    assert stops == [] and [w for w, _ in heard] == ["lost"]  # once, and no "closed"
    # without spares the same loss stops the worker's part, as before
    plain = Master(["node2"])
    stops = []
    old = L.Lifeline(spec("node2", 2, plain.port, recovery=False), stops.append,
                     lambda n, c: None)  # fmt: skip
    old.open()
    old.run()
    assert until(lambda: "node2" in plain.line.peers)
    plain.line.peers["node2"].close()
    assert until(lambda: stops and "lost the lifeline to the master" in stops[0])


class Sup:
    """What succession.master_lost uses of a supervisor."""

    def __init__(self, node, rank, old):
        self.spec = spec(node, rank)
        self.lifeline, self.logged, self.saved = old, [], {}
        self.stop = self.first_failure = lambda *a: None

    def save(self, **kw):
        self.saved.update(kw)

    def log(self, line):
        self.logged.append(line)


def test_a_survivor_joins_the_successors_standby_listener():
    standby = S.standby(spec("node1", 1))  # node1's, opened when its supervisor started
    new = Master(["node2"], server=standby)  # node1 leads on it
    retired = []
    old = types.SimpleNamespace(retire=lambda: retired.append(True))
    f = types.SimpleNamespace(sup=Sup("node2", 2, old), m=types.SimpleNamespace(run_lifeline=L),
                              roster={0: "node0", 1: "node1", 2: "node2"}, final=None,
                              listen={"node1": f"127.0.0.1:{new.port}"},
                              standby=S.standby(spec("node2", 2)), heard=lambda *a: None)  # fmt: skip
    assert S.master_lost(f, "its lifeline closed") == "joined"
    assert until(lambda: "node2" in new.line.joined)
    assert retired == [True] and f.sup.lifeline is not old
    mine = f.standby.getsockname()[1]
    assert until(lambda: ("node2", "listen", f"127.0.0.1:{mine}") in new.heard)
    assert f.sup.saved["recovering"] == "node0 (the master) lost: its lifeline closed"
    assert "following node1" in f.sup.logged[0]


def test_a_survivor_whose_successor_never_leads_ends_with_the_reason(monkeypatch):
    monkeypatch.setattr(S, "ELECT_S", 0.5)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nobody listens there once closed
    f = types.SimpleNamespace(sup=Sup("node2", 2, None), m=types.SimpleNamespace(run_lifeline=L),
                              roster={0: "node0", 1: "node1", 2: "node2"}, final=None,
                              listen={"node1": f"127.0.0.1:{port}"}, outcome=None,
                              standby=S.standby(spec("node2", 2)), heard=lambda *a: None)  # fmt: skip
    assert S.master_lost(f, "closed") is None
    assert f.outcome[0] == "STOPPED" and "node1 did not lead" in f.outcome[1]


def part(status, **kw):
    return {"status": status, "alive": False, "started": 100.0, "rank": 0, "nproc": 2,
            "ended": 120.0, "exit_code": 0, **kw}  # fmt: skip


GENS = [
    {"generation": 1, "nodes": ["node0", "node1", "node2"]},
    {"generation": 2, "nodes": ["node1", "node3", "node2"], "recovery_s": 30.5,
     "master": "node1", "master_lost": "node0",
     "replaced": [{"node_rank": 1, "lost": "node0", "by": "node3", "why": "the master, lost"}]},
]  # fmt: skip
ORDER = ("node0", "node1", "node2", "node3")


def test_the_controller_reads_a_run_whose_master_moved_from_its_new_master():
    # the old master back, its stale record (the first generation, its supervisor gone)
    parts = {"node0": part("RUNNING", generations=GENS[:1]),
             "node1": part("SUCCEEDED", generations=GENS),
             "node2": part("SUCCEEDED", rank=2, generations=GENS),
             "node3": part("SUCCEEDED", rank=1)}  # fmt: skip
    assert leader(ORDER, parts) is parts["node1"]
    v = fold("r", ORDER, parts)
    assert v.state == "SUCCEEDED", v
    assert "gen 2: node1 the master for node0, node3 for node0 (the master, lost)" in v.why
    assert v.as_json()["generations"] == GENS
    parts["node0"] = "unreachable (timeout)"  # or still away: the same
    assert fold("r", ORDER, parts).state == "SUCCEEDED"


def test_while_no_new_master_leads_yet_the_run_is_recovering_not_lost():
    parts = {"node0": "unreachable (timeout)",
             "node1": part("RUNNING", alive=True, rank=1, generations=GENS[:1],
                           recovering="node0 (the master) lost: its lifeline closed"),
             "node2": part("RUNNING", alive=True, rank=2, generations=GENS[:1]),
             "node3": part("STARTING", alive=True, rank=3, standby=True)}  # fmt: skip
    v = fold("r", ORDER, parts)
    assert v.state == "RUNNING", v
    assert v.why == "recovering: node0 (the master) lost: its lifeline closed", v
    # the master alive and rank 0 speaks for the run, as before a loss
    parts["node0"] = part("RUNNING", alive=True, generations=GENS[:1])
    assert leader(ORDER, parts) is parts["node0"]


def test_invoke_stop_says_so_before_its_sigterm_so_a_master_tells_it_from_a_shutdown(
    tmp_path, monkeypatch
):
    """run_ctl.py stop leaves STOP_MARK in the run dir before it signals: the master's supervisor
    ends the run on such a SIGTERM, and leaves it to a survivor on any other (a machine going
    down SIGTERMs every process)."""
    ctl = load("run_ctl")
    for name in ctl.HELPERS:
        setattr(ctl.m, name[:-3], load(name[:-3]))
    monkeypatch.setattr(ctl.m.records, "RUNS", str(tmp_path))
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "state.json").write_text(json.dumps({"status": "SUCCEEDED"}))
    assert ctl.stop("r1", 0)["found"]
    assert (tmp_path / "r1" / load("records").STOP_MARK).exists()  # what run_supervisor reads
