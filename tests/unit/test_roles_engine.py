"""The roles engine itself (ddpfleet.roles), over a fake connection and made-up roles: steps in
order, handlers once after the role, a failure stops the role and the node, check mode changes
nothing, put is idempotent."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType, ModuleType, SimpleNamespace

import pytest

from ddpfleet.engine.roles import Role, Step, changed, failed, ok, past, run_roles
from ddpfleet.errors import CommandError, Unreachable
from tests.roles.fakehost import FACTS, FakeHost

FACTS_TEXT = "".join(f"{k}={v}\n" for k, v in FACTS.items())
INVENTORY = SimpleNamespace(section=lambda name: {})


def role(name: str, apply, handlers=None, applies=lambda cfg, host: True, **defaults) -> Role:
    module = ModuleType(f"fake_role_{name}")
    module.apply, module.applies = apply, applies
    if handlers is not None:
        module.HANDLERS = handlers
    return Role(name, module, MappingProxyType(defaults), Path("/nonexistent"))


def node(check: bool = False, answers=()) -> FakeHost:
    fake = FakeHost(
        answers=[(r"os-release", 0, FACTS_TEXT), *answers], check=check, inventory=INVENTORY
    )
    return fake


def run(fake: FakeHost, *roles: Role):
    out = run_roles(fake.host, list(roles))
    return [(s.role, s.name, s.status) for s in out.steps], out


def test_past_tense_of_an_action():
    assert past("install sshd (apt-get)") == "installed sshd (apt-get)"
    assert past("create /opt/venv") == "created /opt/venv"
    assert past("write /etc/x") == "wrote /etc/x"
    assert past("run bash installer -b") == "ran bash installer -b"
    assert past("send 3 wheels") == "sent 3 wheels"


def test_steps_are_recorded_in_order_with_their_role():
    first = role("a", lambda host, cfg: iter([ok("one"), changed("two", "did it")]))
    second = role("b", lambda host, cfg: iter([ok("three")]))
    steps, out = run(node(), first, second)
    assert steps == [("a", "one", "ok"), ("a", "two", "changed"), ("b", "three", "ok")]
    assert out.count("changed") == 1 and not out.failed


def test_settings_reach_the_role_with_flags_on_top():
    seen = {}

    def apply(host, cfg):
        seen.update(cfg)
        yield ok("x")

    run_roles(node().host, [role("a", apply, size=1, env="d")], flags={"size": 2})
    assert seen == {"size": 2, "env": "d"}


def test_a_role_that_does_not_apply_is_left_out():
    steps, _ = run(node(), role("a", lambda h, c: iter([ok("x")]), applies=lambda c, h: False))
    assert steps == []


def test_handlers_run_once_after_the_role():
    calls = []

    def apply(host, cfg):
        host.notify("restart")
        yield changed("config", "wrote it")
        host.notify("restart")
        yield changed("unit", "wrote it")

    def restart(host, cfg):
        calls.append(1)
        yield changed("restart", "restarted")

    steps, _ = run(node(), role("a", apply, {"restart": restart}))
    assert steps == [
        ("a", "config", "changed"),
        ("a", "unit", "changed"),
        ("a", "restart", "changed"),
    ]
    assert calls == [1]


def test_a_failed_step_stops_the_role_its_handlers_and_the_later_roles():
    later = []

    def apply(host, cfg):
        host.notify("restart")
        yield failed("config", "bad")
        later.append("step after the failure")
        yield ok("never")

    def restart(host, cfg):
        later.append("handler")
        yield ok("restart")

    steps, out = run(
        node(), role("a", apply, {"restart": restart}), role("b", lambda h, c: iter([ok("never")]))
    )
    assert steps == [("a", "config", "failed")]
    assert later == [] and out.failed


def test_a_failed_command_is_the_roles_failed_step():
    def apply(host, cfg):
        host.run(["false"])
        yield ok("never")

    steps, out = run(node(answers=[(r"^false$", 1, "nope")]), role("a", apply))
    assert steps == [("a", "error", "failed")]
    assert "nope" in out.steps[0].reason


def test_an_unreachable_node_is_unreachable_not_a_failed_step():
    def apply(host, cfg):
        raise Unreachable("node0", "connection lost")
        yield  # a generator, like every role's apply

    steps, out = run(node(), role("a", apply))
    assert steps == [] and out.unreachable == "connection lost" and out.failed


def test_check_mode_changes_nothing_and_says_would():
    done = []

    def apply(host, cfg):
        host.change(["touch", "/x"])
        wrote, _ = host.put("/etc/y", "new\n")
        yield host.changed("y", "write /etc/y", diff="d") if wrote else ok("y")
        yield host.changed("z", "install z", lambda: done.append("z"))

    fake = node(check=True)
    fake.files["/etc/y"] = b"old\n"
    _, out = run(fake, role("a", apply))
    assert [(s.status, s.reason, s.diff) for s in out.steps] == [
        ("changed", "would write /etc/y", "d"),
        ("changed", "would install z", ""),
    ]
    assert done == [] and fake.changes == [] and fake.written == {}
    assert fake.files == {"/etc/y": b"old\n"}
    assert all("touch" not in c for c in fake.ran)


def test_a_change_reads_in_the_past_once_made_or_as_do_says():
    def apply(host, cfg):
        yield host.changed("a", "install a", lambda: host.change(["apt", "a"]))
        yield host.changed("b", "install b", lambda: failed("b", "no such package"))

    fake = node()
    _, out = run(fake, role("r", apply))
    assert [(s.status, s.reason) for s in out.steps] == [
        ("changed", "installed a"),
        ("failed", "no such package"),
    ]
    assert fake.changes == ["apt a"]


def test_put_writes_once_then_is_ok():
    host = node().host
    assert host.put("/etc/x", "one\n", mode=0o600) == (True, "")
    assert host.put("/etc/x", "one\n", mode=0o600) == (False, "")
    assert host.put("/etc/x", "one\n", mode=0o644)[0]  # the mode alone is a change
    assert host.put("/etc/x", "two\n", mode=0o644)[0]
    fake = host.conn
    assert fake.files["/etc/x"] == b"two\n" and fake.modes["/etc/x"] == 0o644
    assert [p for p in fake.files if "ddpfleet" in p] == []  # no temp file left behind


def test_put_shows_a_diff_when_asked():
    fake = node()
    fake.diff = True
    fake.files["/etc/x"] = b"a\n"
    _, diff = fake.host.put("/etc/x", "b\n")
    assert "-a\n" in diff and "+b\n" in diff


def test_change_reports_progress_and_keeps_its_commands():
    seen = []
    host = node().host
    host.on_progress = seen.append
    host.change(["systemctl", "restart", "x"])
    assert seen == host.changes == ["systemctl restart x"]


def test_a_failed_change_raises_a_command_error():
    host = node(answers=[(r"^boom", 2, "bad")]).host
    with pytest.raises(CommandError):
        host.change(["boom"])
    assert host.change(["boom"], check=False).exit_code == 2


def test_a_role_step_keeps_the_roles_name_whatever_the_role_set():
    steps, _ = run(node(), role("a", lambda h, c: iter([Step("other", "x", "ok")])))
    assert steps == [("a", "x", "ok")]


def test_facts_are_gathered_once_per_node_for_every_role():
    fake = node()
    seen = []
    probe = role("a", lambda h, c: iter([ok(h.facts["os_id"])]))
    run(fake, probe, role("b", lambda h, c: iter([seen.append(h.facts["arch"]) or ok("x")])))
    assert sum("os-release" in c for c in fake.ran) == 1 and seen == ["x86_64"]
