"""Spares and generations (issue 22): the lifeline's recovery words and its checkpoint fetch on
real sockets of 127.0.0.1 (ddpfleet/node/run_lifeline.py, generation.py, checkpoints.py loaded
as the nodes load them), the verdict of a run that replaced a node (runstate.fold), and the
spares' checks at load (inventory spares:, train --spares)."""

from __future__ import annotations

import importlib.util
import secrets
import socket
import sys
import time
import types
from pathlib import Path

import pytest

from ddpfleet import inventory as inv
from ddpfleet.cli import spares
from ddpfleet.errors import DdpfleetError, InventoryError
from ddpfleet.launch.ssh.runstate import fold

NODE = Path(__file__).resolve().parents[2] / "ddpfleet" / "node"
SECRET = secrets.token_hex(32)


def load(name):
    spec = importlib.util.spec_from_file_location(name, NODE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


L, G, CK = load("run_lifeline"), load("generation"), load("checkpoints")
F, S = load("follower"), load("succession")


class Side:
    """One supervisor's lifeline with spares: what it passed on and whom it reported lost."""

    def __init__(self, node, rank, port=None, workers=(), spare_nodes=(), secret=SECRET):
        self.stops, self.heard, self.lost = [], [], []
        spec = {"node": node, "rank": rank, "master_host": "127.0.0.1", "lifeline_port": port,
                "lifeline_secret": secret, "workers": list(workers),
                "spares": list(spare_nodes)}  # fmt: skip
        lost = (lambda n, why: self.lost.append((n, why))) if rank == 0 else None
        self.line = L.Lifeline(spec, self.stops.append, lambda n, c: None,
                               lambda n, w, r: self.heard.append((n, w, r)), lost)  # fmt: skip
        self.port = self.line.open()
        self.line.run()

    def close(self):
        for s in (self.line.server, getattr(self.line.master, "sock", None)):
            if s is not None:
                s.close()


def until(check, within=5.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def gang():
    made = []
    master = Side("node0", 0, workers=["node1"], spare_nodes=["node3"])
    made.append(master)
    worker = Side("node1", 1, master.port)
    spare = Side("node3", 3, master.port)
    made += [worker, spare]
    assert until(lambda: set(master.line.peers) == {"node1", "node3"})
    yield master, worker, spare
    for side in made:
        side.close()


def test_a_lost_worker_or_spare_is_reported_not_stopped(gang):
    master, worker, spare = gang
    worker.line.master.sock.shutdown(socket.SHUT_RDWR)
    assert until(lambda: [n for n, _ in master.lost] == ["node1"])
    spare.line.master.sock.shutdown(socket.SHUT_RDWR)
    assert until(lambda: [n for n, _ in master.lost] == ["node1", "node3"])
    assert master.stops == []  # with spares the master's supervisor decides (generation.py)
    assert "closed" in master.lost[0][1]


def test_the_recovery_words_go_both_ways(gang):
    master, worker, spare = gang
    master.line.tell("node3", "take 2 1 node1")
    master.line.tell("node1", "fence 1")
    assert until(lambda: ("master", "take", "2 1 node1") in spare.heard)
    assert until(lambda: ("master", "fence", "1") in worker.heard)
    spare.line.say("took 2")
    worker.line.say("fenced 1")
    assert until(lambda: {("node3", "took", "2"), ("node1", "fenced", "1")} <= set(master.heard))
    master.line.tell("node1", "gang stop")  # not a word of the protocol: passed on to no one
    time.sleep(0.2)
    assert not [h for h in worker.heard if h[1] == "gang"] and worker.stops == []


def checkpoint(directory: Path, step: int) -> Path:
    path = directory / CK.step_name(step)
    path.mkdir(parents=True)
    (path / "model.pt").write_bytes(secrets.token_bytes(300_000))
    files = {"model.pt": CK.sha256(str(path), "model.pt")}
    CK.write_manifest(str(path), step, 6, files)
    return path


def test_a_member_fetches_the_masters_checkpoint_verified(gang, tmp_path):
    master, worker, _ = gang
    src = checkpoint(tmp_path / "master", 8)
    master.line.serve_checkpoint = lambda step: CK.pack(str(src))
    dest = tmp_path / "spare"
    manifest = F.fetch_checkpoint(L, worker.line, 8, lambda f: CK.unpack(f, str(dest)))
    assert manifest["step"] == 8
    assert CK.complete(str(dest / "step-00000008")) is not None
    assert (dest / "step-00000008" / "model.pt").read_bytes() == (src / "model.pt").read_bytes()


def test_a_fetch_without_the_secret_gets_nothing(gang, tmp_path):
    master, _, _ = gang
    src = checkpoint(tmp_path / "master", 8)
    master.line.serve_checkpoint = lambda step: CK.pack(str(src))
    spec = {"node": "node1", "rank": 1, "master_host": "127.0.0.1",
            "lifeline_port": master.port, "lifeline_secret": secrets.token_hex(32)}  # fmt: skip
    thief = L.Lifeline(spec, lambda r: None, lambda n, c: None)
    with pytest.raises(ConnectionError):
        F.fetch_checkpoint(L, thief, 8, lambda f: CK.unpack(f, str(tmp_path / "thief")))
    assert not (tmp_path / "thief").exists()


def test_argv_rewrite_and_newer_checkpoints_discarded(tmp_path):
    argv = ["py", "-m", "torch.distributed.run", "--node-rank", "3", "--master-port", "29500"]
    assert G.rewrite(argv, node_rank=1, master_port=4000)[3:] == [
        "--node-rank", "1", "--master-port", "4000",
    ]  # fmt: skip
    for step in (4, 6, 8):
        checkpoint(tmp_path, step)
    (tmp_path / "final.json").write_text("{}")
    assert G.discard_newer(CK, str(tmp_path), 6) == ["step-00000008"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "final.json", "step-00000004", "step-00000006",
    ]  # fmt: skip
    G.discard_newer(CK, str(tmp_path), -1)  # no checkpoint to resume from: none kept
    assert [p.name for p in tmp_path.iterdir()] == ["final.json"]


def test_a_spare_without_the_health_module_is_taken_and_says_why():
    ok, why = G.spare_health(types.SimpleNamespace(), {})
    assert ok and "not checked" in why
    sick = types.SimpleNamespace(health_node=types.SimpleNamespace(
        spare_verdict=lambda gpus: (False, f"{gpus} GPUs expected, 7 found")))  # fmt: skip
    assert G.spare_health(sick, {"recovery": {"expected_gpus": 8}}) == (
        False, "8 GPUs expected, 7 found",
    )  # fmt: skip


def part(status, **kw):
    return {"status": status, "alive": False, "started": 100.0, "rank": 0, "nproc": 2,
            "ended": 120.0, "exit_code": 0, **kw}  # fmt: skip


GENS = [
    {"generation": 1, "nodes": ["node0", "node1"]},
    {"generation": 2, "nodes": ["node0", "node3"], "recovery_s": 21.5,
     "replaced": [{"node_rank": 1, "lost": "node1", "by": "node3", "why": "closed"}]},
]  # fmt: skip


def test_a_replaced_node_is_not_part_of_the_verdict_its_generations_are():
    order = ("node0", "node1", "node3")
    parts = {"node0": part("SUCCEEDED", generations=GENS), "node1": "unreachable (timeout)",
             "node3": part("SUCCEEDED", rank=1)}  # fmt: skip
    v = fold("r", order, parts)
    assert v.state == "SUCCEEDED", v
    assert "gen 2: node3 for node1 (closed), 21.5s to the first step" in v.why
    assert v.as_json()["generations"] == GENS
    standby = {"node0": part("SUCCEEDED", generations=GENS[:1]), "node1": part("SUCCEEDED"),
               "node3": part("STOPPED", reason="unused")}  # fmt: skip
    assert fold("r", order, standby).state == "SUCCEEDED"


def test_inventory_spares_are_checked_at_load(tmp_path):
    path = tmp_path / "inventory.yaml"
    nodes = "nodes: {a: {host: h1}, b: {host: h2}}\n"
    path.write_text("spares: [b]\n" + nodes)
    assert inv.load(path, check_files=False).spares == ("b",)
    for bad, said in (("[c]", "unknown node 'c'"), ("b", "list of node names"),
                      ("[a, b]", "every node is a spare"), ("[b, b]", "named twice")):  # fmt: skip
        path.write_text(f"spares: {bad}\n" + nodes)
        with pytest.raises(InventoryError, match=said):
            inv.load(path, check_files=False)


def test_train_spares_are_for_detached_ssh_runs(tmp_path):
    path = tmp_path / "inventory.yaml"
    path.write_text("spares: [c]\nnodes: {a: {host: h1}, b: {host: h2}, c: {host: h3}}\n")
    loaded = inv.load(path, check_files=False)
    narrowed, standby = spares.split(loaded, None, False, True, "ssh")
    assert [n.name for n in narrowed.nodes] == ["a", "b", "c"] and standby == ("c",)
    attached, standby = spares.split(loaded, None, False, False, "ssh")
    assert [n.name for n in attached.nodes] == ["a", "b"] and standby == ()
    with pytest.raises(DdpfleetError, match="detached runs of the ssh launcher"):
        spares.split(loaded, "b", False, False, "ssh")
    with pytest.raises(DdpfleetError, match="unknown node 'x'"):
        spares.split(loaded, "x", False, True, "ssh")
    with pytest.raises(DdpfleetError, match="--max-recoveries"):
        spares.max_recoveries("many")
    assert spares.max_recoveries(None) == spares.MAX_RECOVERIES


def test_a_loss_the_master_gave_up_on_is_failed_with_its_reason():
    order = ("node0", "node1", "node3")
    parts = {"node0": part("FAILED", generations=GENS, gave_up="node3 lost, no spare left"),
             "node1": "unreachable (timeout)", "node3": "unreachable (timeout)"}  # fmt: skip
    v = fold("r", order, parts)
    assert v.state == "FAILED" and v.why.startswith("node3 lost, no spare left; gen 2:"), v


def test_a_run_being_recovered_is_running():
    order = ("node0", "node1", "node3")
    master = part("RUNNING", alive=True, generations=GENS[:1], recovering="node1 lost: closed")
    v = fold(
        "r",
        order,
        {"node0": master, "node1": "unreachable (x)", "node3": part("STARTING", standby=True)},
    )
    assert v.state == "RUNNING" and v.why == "recovering: node1 lost: closed", v


def test_a_lost_member_of_a_run_with_spares_is_running_while_its_master_lives():
    order = ("node0", "node1", "node3")
    master = part("RUNNING", alive=True, generations=GENS[:1])
    v = fold(
        "r", order, {"node0": master, "node1": "unreachable (timeout)", "node3": part("RUNNING")}
    )
    assert v.state == "RUNNING" and v.why == "recovering: node1: unreachable (timeout)", v
    master = part("STOPPED", generations=GENS[:1])  # the master gone too: nothing decides
    v = fold(
        "r", order, {"node0": master, "node1": "unreachable (timeout)", "node3": part("RUNNING")}
    )
    assert v.state == "LOST", v
