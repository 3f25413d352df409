"""The launcher registry: every entry implements the Launcher protocol, and a launcher registered
here (a fake one) is reached by train, runs, logs and stop without an edit at the edge."""

from __future__ import annotations

import inspect
import json

import pytest
from invoke import Context, Exit

from ddpfleet import inventory as inv
from ddpfleet import launchers
from ddpfleet.cli import runs as runtasks
from ddpfleet.cli import tasks
from ddpfleet.errors import DdpfleetError, InventoryError, NodeError
from ddpfleet.launch import launcher
from ddpfleet.launch.launcher import Launcher, NodeStop, Pruned, Stopped
from ddpfleet.launch.verdict import RunState, RunView

PROTOCOL = [
    name
    for name, member in vars(Launcher).items()
    if inspect.isfunction(member) and not name.startswith("_")
]


@pytest.mark.parametrize("name", list(launchers.LAUNCHERS))
def test_every_registered_launcher_implements_the_protocol(name):
    entry = launchers.LAUNCHERS[name]
    assert entry.module == f"ddpfleet.launch.{name}.launcher", "a launcher is a launch/ folder"
    it = launcher.get(name)
    assert isinstance(it, Launcher) and it.name == name and isinstance(it.resumes, bool)
    for method in PROTOCOL:
        want = list(inspect.signature(getattr(Launcher, method)).parameters)[1:]
        assert list(inspect.signature(getattr(it, method)).parameters) == want, method


def test_the_protocol_names_every_job_of_a_launcher():
    assert set(PROTOCOL) == {
        "train", "train_detached", "resumed", "views", "prune", "logs", "stop"
    }  # fmt: skip


def test_a_launcher_that_is_not_registered_is_named_with_the_choices():
    with pytest.raises(DdpfleetError, match=r"^--launcher 'pbs': use one of ssh, slurm$"):
        launcher.get("pbs")


class Fake:
    """A launcher in one class: it records what the edge asked of it."""

    name = "fake"
    resumes = True

    def __init__(self):
        self.calls: list[tuple] = []

    def train(self, fleet, config):
        self.calls.append(("train", config.script, config.order))
        return []

    def train_detached(self, fleet, config, index, resume=None):
        self.calls.append(("train_detached", config.script, config.args, resume))
        self.config = config

    def resumed(self, inventory, run_id, become_password):
        self.calls.append(("resumed", run_id))
        return {"script": "old.py", "args": "--checkpoint-dir ck", "env": ["A=1"]}

    def views(self, runs, only=()):
        return [RunView("f1", RunState.RUNNING, ("node0", "node1"), started=1.0, ended=None)]

    def prune(self, runs, keep, with_outputs=False):
        return {"node0": Pruned(["f0"], ["f0"]), "node1": NodeError("node1", "cannot reach")}

    def logs(self, runs, run_id, node, rank, follow):
        self.calls.append(("logs", run_id, node, rank, follow))
        return []

    def stop(self, runs, run_id, grace):
        self.calls.append(("stop", run_id, grace))
        return Stopped(run_id, {
            "node0": NodeStop.of("stopped its part", [41], []),
            "node1": NodeStop.of("was RUNNING", [42, 43], [44]),
        }, did="the fake's word")  # fmt: skip


LAUNCHER = Fake()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The fake registered (this module is its folder), an inventory that names it."""
    monkeypatch.setitem(launchers.LAUNCHERS, "fake", launchers.Entry(__name__, "a test's"))
    monkeypatch.setattr(LAUNCHER, "calls", [])
    p = tmp_path / "inventory.yaml"
    p.write_text(
        "nodes:\n  node0: {host: 10.0.0.10}\n  node1: {host: 10.0.0.11}\ntrain: {launcher: fake}\n"
    )
    return p


def test_the_inventory_checks_its_launcher_against_the_registry(fake, tmp_path, monkeypatch):
    assert inv.load(fake, check_files=False).launcher == "fake"
    monkeypatch.delitem(launchers.LAUNCHERS, "fake")
    with pytest.raises(InventoryError, match=r"train.launcher: 'fake' is not a launcher"):
        inv.load(fake, check_files=False)


def test_train_starts_the_inventorys_launcher_attached_or_detached(fake, tmp_path, capsys):
    tasks.train(Context(), inventory=str(fake), script="t.py", project_dir=str(tmp_path))
    assert capsys.readouterr().out == ""
    tasks.train(Context(), inventory=str(fake), script="t.py", args="--x 1", detach=True,
                run_id="d1")  # fmt: skip
    assert LAUNCHER.calls == [
        ("train", "t.py", ("node0", "node1")),
        ("train_detached", "t.py", ("--x", "1"), None),
    ]
    # a detached start says what to do next, whichever launcher started it
    assert capsys.readouterr().out == "  invoke runs\n  invoke logs d1 -f\n  invoke stop d1\n"


def test_train_resume_asks_the_launcher_for_the_run_and_the_flags_win(fake):
    tasks.train(Context(), inventory=str(fake), resume="f1", script="new.py")
    assert LAUNCHER.calls == [
        ("resumed", "f1"),
        ("train_detached", "new.py", ("--checkpoint-dir", "ck"), "f1"),
    ]


def test_a_resumed_run_keeps_its_spares_unless_spares_is_given_now(fake, monkeypatch):
    """RUN's spares (the launcher's word on RUN) stand by again; --spares now wins."""
    fake.write_text(fake.read_text().replace("}\ntrain", "}\n  node2: {host: 10.0.0.12}\ntrain"))
    monkeypatch.setattr(LAUNCHER, "name", "ssh")  # spares are the ssh launcher's, for now
    monkeypatch.setitem(launchers.LAUNCHERS, "ssh", launchers.LAUNCHERS["fake"])
    had = {"script": "t.py", "nodes": ["node0"], "spares": ["node1", "node2"]}
    monkeypatch.setattr(LAUNCHER, "resumed", lambda inventory, run_id, password: had)
    (fake.parent / "t.py").write_text("")
    again = {"inventory": str(fake), "resume": "f1", "project_dir": str(fake.parent)}
    tasks.train(Context(), **again, health_gate=False)
    assert (LAUNCHER.config.order, LAUNCHER.config.spares) == (("node0",), ("node1", "node2"))
    tasks.train(Context(), **again, spares="node2", health_gate=False)
    assert (LAUNCHER.config.order, LAUNCHER.config.spares) == (("node0",), ("node2",))


def test_resume_is_refused_for_a_launcher_without_it(fake, monkeypatch):
    monkeypatch.setattr(LAUNCHER, "resumes", False)
    with pytest.raises(Exit, match=r"--resume works for runs of the ssh launcher \(use --launch"):
        tasks.train(Context(), inventory=str(fake), resume="f1")
    assert LAUNCHER.calls == []


def test_resume_of_what_is_no_run_id_asks_no_node(fake):
    """--resume names a directory on every node: a path in it is one line, and no node is
    asked (the nodes' run_ctl reads RUN's spec as root)."""
    with pytest.raises(Exit, match=r"--resume '../x': not a run id; see invoke runs"):
        tasks.train(Context(), inventory=str(fake), resume="../x")
    assert LAUNCHER.calls == []


def test_runs_lists_every_launchers_runs(fake, monkeypatch, capsys):
    for name in ("ssh", "slurm"):  # the real ones would connect: no runs of theirs here
        monkeypatch.setattr(launcher.get(name), "views", lambda runs, only=(): [])
    runtasks.runs(Context(), inventory=str(fake), json=True)
    said = json.loads(capsys.readouterr().out)
    assert [(v["run_id"], v["state"]) for v in said] == [("f1", "RUNNING")]


def test_runs_prune_merges_every_launchers_prune_and_fails_on_an_error(fake, monkeypatch, capsys):
    for name in ("ssh", "slurm"):
        monkeypatch.setattr(launcher.get(name), "views", lambda runs, only=(): [])
        monkeypatch.setattr(launcher.get(name), "prune", lambda runs, keep, outputs=False: {})
    with pytest.raises(Exit, match=r"runs --prune failed on 1 of 2 node\(s\): node1: cannot reach"):
        runtasks.runs(Context(), inventory=str(fake), prune=True)
    out = capsys.readouterr().out
    assert "f0" in out and "runs --prune --with-outputs removes them too" in out


def test_logs_and_stop_go_to_the_launcher_that_started_the_run(fake, capsys):
    launcher.index(inv.load(fake)).add("f1", ["node0", "node1"], launcher="fake")
    runtasks.logs(Context(), "f1", inventory=str(fake), node="node1", rank="3", follow=True)
    with pytest.raises(Exit, match=r"stop f1: not confirmed on node1"):
        runtasks.stop(Context(), "f1", inventory=str(fake), grace="2")
    out = capsys.readouterr().out
    assert LAUNCHER.calls == [("logs", "f1", "node1", 3, True), ("stop", "f1", 2.0)]
    assert "the fake's word" in out
    assert "stopped its part, SIGKILLed leftovers 41, nothing left" in out
    assert "was RUNNING, SIGKILLed leftovers 42 43; STILL THERE: 44" in out


def test_stop_says_each_nodes_answer_from_the_data():
    stopped = Stopped("r", {
        "a": NodeStop.of("none running", [], []),
        "b": NodeStop.failed(NodeError("b", "unreachable (timed out)")),
        "c": NodeStop(launcher.NO_RECORD),
        "d": NodeStop.of("was FAILED", [], [7]),
    })  # fmt: skip
    rows = {n: runtasks._stop_row(s) for n, s in stopped.nodes.items()}
    assert rows == {
        "a": "none running, nothing left",
        "b": "b: unreachable (timed out)",
        "c": "no record of the run",
        "d": "was FAILED; STILL THERE: 7",
    }
    assert stopped.unconfirmed() == ["b", "d"]


def test_a_run_without_a_launcher_in_the_index_is_the_default_launchers(tmp_path):
    index = launcher.index(_inventory(tmp_path))
    index.add("old", ["node0"])
    index.add("s1", ["node0"], launcher="slurm", job_id="7", output_dir="/l")
    assert launcher.of_run(index, "old").name == launchers.DEFAULT == "ssh"
    assert launcher.of_run(index, "nowhere").name == "ssh"  # the nodes may still know it
    assert launcher.of_run(index, "s1").name == "slurm"
    index.add("p1", ["node0"], launcher="pbs")
    with pytest.raises(DdpfleetError, match=r"^p1: its index entry's launcher 'pbs': use one of"):
        launcher.of_run(index, "p1")


def _inventory(tmp_path):
    p = tmp_path / "inventory.yaml"
    p.write_text("nodes:\n  node0: {host: 10.0.0.10}\n")
    return inv.load(p, check_files=False)
