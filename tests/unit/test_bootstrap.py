"""bootstrap.py without SSH: every node's run gathered (unreachable and failed ones too), the
recap table, the failure lines the task exits with, and what the node lock says when refused."""

from __future__ import annotations

import contextlib
import io
import re
from types import MappingProxyType, ModuleType, SimpleNamespace

import pytest
from rich.console import Console

from ddpfleet import bootstrap as boot
from ddpfleet import report
from ddpfleet.engine.roles import NodeRun, Role, Step, changed, failed, ok
from ddpfleet.errors import NodeError, Unreachable
from tests.roles.fakehost import FACTS, FakeHost

FACTS_TEXT = "".join(f"{k}={v}\n" for k, v in FACTS.items())


class Fleet:
    """What bootstrap() uses of connection.Fleet: nodes, inventory, map(fn) -> node: result."""

    def __init__(self, conns: dict[str, FakeHost | NodeError]):
        self.conns = conns
        self.nodes = [SimpleNamespace(name=n) for n in conns]
        self.inventory = SimpleNamespace(section=lambda name: {})

    def map(self, fn):
        out = {}
        for name, conn in self.conns.items():
            try:
                out[name] = conn if isinstance(conn, NodeError) else fn(conn)
            except NodeError as e:
                out[name] = e
        return out


def role(apply) -> Role:
    module = ModuleType("fake_role")
    module.apply, module.applies = apply, lambda cfg, host: True
    return Role("r", module, MappingProxyType({}), None)


@pytest.fixture
def no_lock(monkeypatch):
    # a held lock with no token: commands run unmarked, as they do for a fake host
    held = SimpleNamespace(token="")
    monkeypatch.setattr(boot, "NodeLock", lambda conn, wait_s: contextlib.nullcontext(held))


def conn(name: str) -> FakeHost:
    return FakeHost(name=name, answers=[(r"os-release", 0, FACTS_TEXT)])


def test_every_node_gets_a_run_and_the_failures_name_node_role_and_step(no_lock, tmp_path):
    def apply(host, cfg):
        yield ok("probe")
        if host.name == "node1":
            yield failed("install", "no space left on /opt")
        else:
            yield changed("install", "installed x")

    fleet = Fleet(
        {
            "node0": conn("node0"),
            "node1": conn("node1"),
            "node2": Unreachable("node2", "no route to host"),
            "node3": NodeError("node3", "auth refused"),
        }
    )
    runs = boot.bootstrap(fleet, [role(apply)], log_dir=tmp_path)
    assert runs["node0"].count("changed") == 1 and not runs["node0"].failed
    assert runs["node1"].failed and runs["node2"].unreachable == "no route to host"
    bad = boot.failures(runs)
    assert [(f.node, f.what, f.reason) for f in bad] == [
        ("node1", "r: install", "no space left on /opt"),
        ("node2", "unreachable", "no route to host"),
        ("node3", "connect", "auth refused"),
    ]
    assert [str(f) for f in bad] == [
        "node1: r: install: no space left on /opt",
        "node2: unreachable: no route to host",
        "node3: connect: auth refused",
    ]
    log = next(tmp_path.glob("bootstrap-*.log")).read_text()
    assert "[node1] r: install: failed (no space left on /opt)" in log


def test_a_converged_cluster_has_no_failures_and_a_zero_changed_recap(no_lock, tmp_path):
    fleet = Fleet({"node0": conn("node0")})
    runs = boot.bootstrap(fleet, [role(lambda h, c: iter([ok("x")]))], log_dir=tmp_path)
    assert boot.failures(runs) == []
    assert re.search(r"node0\W+1\W+0\W+0\W+0\W+0\W+\d+\.\d\b", recap_text(runs))


def test_check_mode_reaches_the_roles(no_lock, tmp_path):
    def apply(host, cfg):
        yield host.changed("x", "install x", lambda: pytest.fail("ran under --check"))

    runs = boot.bootstrap(
        Fleet({"node0": conn("node0")}), [role(apply)], check=True, log_dir=tmp_path
    )
    assert runs["node0"].steps[0].reason == "would install x"


def recap_text(runs: dict[str, NodeRun]) -> str:
    console = Console(file=io.StringIO(), width=200)
    console.print(boot.recap(runs))
    return console.file.getvalue()


def test_recap_has_one_row_per_node_with_its_counts():
    runs = {
        "node0": NodeRun("node0", [Step("r", "a", "ok"), Step("r", "b", "changed")], seconds=1.25),
        "node1": NodeRun("node1", unreachable="no route to host"),
    }
    text = recap_text(runs)
    assert re.search(r"\W+".join(boot.RECAP_COLUMNS), text)
    assert re.search(r"node0\W+1\W+1\W+0\W+0\W+0\W+1\.2\b", text)
    assert re.search(r"node1\W+0\W+0\W+0\W+0\W+no route to host\W+0\.0\b", text)


def test_the_recap_prints_node_text_literally(capsys):
    runs = {"node0": NodeRun("node0", unreachable="[bold]not markup[/bold]")}
    report.show(boot.recap(runs))
    assert "[bold]not markup[/bold]" in " ".join(capsys.readouterr().out.split())


def test_a_held_lock_names_its_holder_and_the_way_out():
    lock = boot.NodeLock(SimpleNamespace(name="node0"), wait_s=30)
    held = lock._refused(1, "held by pid 812 (user root)")
    assert "another bootstrap holds /run/ddpfleet/bootstrap.lock" in held
    assert "held by pid 812 (user root)" in held and "waited 30s" in held
    assert lock._refused(3, "") == (
        "cannot take /run/ddpfleet/bootstrap.lock (exit 3): no reason given"
    )
