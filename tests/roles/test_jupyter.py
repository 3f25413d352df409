"""jupyter: the node's state in (one probe, the config file), steps and commands out."""

from __future__ import annotations

import base64
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, SimpleNamespace

import pytest

from ddpfleet import jupyter
from ddpfleet.engine.roles import load_role
from ddpfleet.jupyter import jobs as jupyter_jobs
from ddpfleet.ssh.connection import Result
from tests.roles.fakehost import FACTS, FakeHost, apply, template

ROLE = load_role("jupyter").module
ENV = "/opt/ddpfleet/venv"
HOME = "/home/jupyter"
CONFIG = f"{HOME}/.jupyter/jupyter_server_config.json"
SECRET = "correct horse battery staple"
HASH = "argon2:$argon2id$v=19$m=10240,t=10,p=8$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"
NEW_HASH = "argon2:$argon2id$v=19$m=10240,t=10,p=8$bmV3c2FsdA$bmV3aGFzaA"
USER = jupyter.NodeState(uid="999", gid="999", home=HOME, shell="/bin/bash")
SUPERVISE = (load_role("jupyter").directory / "files" / "jupyter-supervise").read_bytes()
PROCTREE = jupyter.PROCTREE_SOURCE.read_bytes()
SYSTEMD = MappingProxyType({**FACTS, "pid1": "systemd"})


def settings(**cfg) -> jupyter.Settings:
    merged = {**load_role("jupyter").defaults, "env_dir": ENV, **cfg}
    return jupyter.settings(merged, merged["env_dir"])


def probe(
    user: bool = True,
    lab: bool = True,
    running: bool = False,
    port_open: bool | None = None,
    pid1: str = "sandbox-init",
    argv: list[str] | None = None,
    files: bool = True,
    unit: str = "",
) -> str:
    """What the node answers to the role's probe (see jupyter.PROBE_SH)."""
    lines = {"pid1": pid1}
    if user:
        lines.update(uid=USER.uid, gid=USER.gid, home=HOME, shell=USER.shell)
    if lab:
        lines["lab"] = "1"
    if files:
        lines.update(state_dir="1", libexec="1")
    if running and pid1 != "systemd":
        cmdline = ["/bin/sh", *(argv or jupyter.supervisor_argv(settings(), USER, HOME))]
        lines.update(
            supervisor_pid="812",
            server_pid="815",
            supervisor_argv=base64.b64encode("\0".join(cmdline).encode() + b"\0").decode(),
        )
    if pid1 == "systemd":
        lines.update(
            unit_active="active" if running else "inactive",
            unit_enabled=unit,
            unit_pid="815" if running else "0",
        )
    if running if port_open is None else port_open:
        lines["port_open"] = "1"
    return "".join(f"{k}={v}\n" for k, v in lines.items())


@dataclass
class Node(FakeHost):
    """A FakeHost whose probe answers follow the role's changes (one per probe, the last
    repeats) and which keeps what each command got on stdin."""

    probes: list[str] = field(default_factory=list)
    stdin: dict[str, str] = field(default_factory=dict)

    def _answer(self, command) -> Result:
        cmd = command if isinstance(command, str) else " ".join(command)
        if "getent passwd" in cmd:
            self.ran.append(cmd)
            out = self.probes.pop(0) if len(self.probes) > 1 else self.probes[0]
            return Result(self.name, cmd, 0, out, "", 0.0)
        return super()._answer(command)

    def run(self, command, stdin=None, check=True, timeout=None, root=False) -> Result:
        if stdin is not None:
            cmd = command if isinstance(command, str) else " ".join(command)
            self.stdin[cmd] = stdin.decode() if isinstance(stdin, bytes) else stdin
        return super().run(command, stdin=stdin, check=check, timeout=timeout)


def config_text(**cfg) -> str:
    return ROLE.render_config(settings(**cfg), cfg.get("root_dir") or HOME, HASH)


def node(
    *probes: str,
    config: str | None = None,
    mode: str = "600 jupyter",
    hashed: str = HASH,
    facts=FACTS,
    check: bool = False,
    diff: bool = False,
    tmp: Path = Path("/nonexistent"),
    installed: bool = True,
) -> Node:
    answers = [(r"passwd_check", 0, hashed + "\n")]
    if config is not None:
        answers.append((r"stat -c", 0, f"{mode}\n{config}"))
    else:
        answers.append((r"stat -c", 3, ""))
    files = {jupyter.SUPERVISOR: SUPERVISE, jupyter.PROCTREE: PROCTREE} if installed else {}
    return Node(
        answers=answers,
        probes=list(probes),
        facts=facts,
        check=check,
        diff=diff,
        inventory=SimpleNamespace(root=tmp),
        node=SimpleNamespace(command_timeout=20.0),  # read_state bounds its probe with it
        files=files,
        modes={jupyter.SUPERVISOR: 0o755, jupyter.PROCTREE: 0o644},
    )


@pytest.fixture
def password(monkeypatch):
    monkeypatch.setenv("DDPFLEET_JUPYTER_PASSWORD", SECRET)
    monkeypatch.setitem(sys.modules, "jupyter_server", None)  # hash on the node, as a rule
    monkeypatch.setitem(sys.modules, "jupyter_server.auth", None)


@pytest.fixture
def no_password(monkeypatch):
    monkeypatch.delenv("DDPFLEET_JUPYTER_PASSWORD", raising=False)
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(isatty=lambda: False))


def run(h: Node, **cfg):
    # these tests name the user: the default ("" = the training user) is test_train_user's
    steps, _ = apply("jupyter", h, env_dir=ENV, **{"user": "jupyter", **cfg})
    return [(s.name, s.status) for s in steps], steps


def written_config(h: Node) -> dict:
    [text] = [v for k, v in h.stdin.items() if CONFIG in k and "cat >" in k]
    return json.loads(text)


def assert_secret_kept(h: Node, steps) -> None:
    """The password's text: never in a command or a step; only on the hashing command's stdin."""
    assert not [c for c in h.ran if SECRET in c]
    assert not [s for s in steps if SECRET in s.reason + s.diff]
    assert [k for k, v in h.stdin.items() if SECRET in v] == [
        k for k in h.stdin if "passwd_check" in k
    ]


# -- a fresh node, a converged one, a changed one --------------------------------------------


def test_fresh_node_gets_user_config_and_a_started_server(password):
    h = node(
        probe(user=False, files=False), probe(files=False), probe(running=True), installed=False
    )
    statuses, steps = run(h)
    assert statuses == [
        ("user", "changed"),
        ("jupyterlab", "ok"),
        ("root_dir", "ok"),
        ("password", "changed"),
        ("config", "changed"),
        ("service files", "changed"),
        ("service", "changed"),
    ]
    assert h.changes[0] == (
        "useradd --create-home --shell /bin/bash --comment Jupyter (ddpfleet) jupyter"
    )
    assert steps[-1].reason == "started (pid 815) on 127.0.0.1:8888"
    assert h.files[jupyter.SUPERVISOR].startswith(b"#!/usr/bin/env python3")
    assert h.files[jupyter.PROCTREE] == PROCTREE  # the supervisor's, installed as it is
    start = [c for c in h.changes if "setsid -f" in c]
    supervise = f"{ENV}/bin/python -I {jupyter.SUPERVISOR} {jupyter.STATE_DIR} setpriv"
    assert len(start) == 1 and supervise in start[0]
    assert f"--reuid=jupyter --regid=999 --init-groups env -i -C {HOME}" in start[0]
    assert start[0].endswith(f"{ENV}/bin/jupyter-lab")
    assert h.notified == []  # a fresh start needs no restart
    assert_secret_kept(h, steps)


def test_config_is_loopback_only_with_an_argon2_password():
    cfg = json.loads(config_text())
    server = cfg["ServerApp"]
    assert server["ip"] == "127.0.0.1" and server["port"] == 8888
    assert server["port_retries"] == 0 and server["open_browser"] is False
    assert server["allow_remote_access"] is False and server["allow_root"] is False
    assert server["allow_origin"] == "" and server["allow_origin_pat"] == ""
    assert server["disable_check_xsrf"] is False and server["root_dir"] == HOME
    assert cfg["IdentityProvider"] == {"token": ""}
    ident = cfg["PasswordIdentityProvider"]
    assert ident["hashed_password"].startswith("argon2:$argon2id$")
    assert ident["password_required"] is True and ident["allow_password_change"] is False
    assert "NotebookApp" not in config_text() and "'*'" not in config_text()


def test_config_is_written_as_the_user_mode_0600_from_stdin(password):
    h = node(probe(running=True))
    run(h, port=8890)
    [write] = [c for c in h.changes if CONFIG in c and "cat >" in c]
    assert write.startswith("setpriv --reuid=jupyter --regid=999 --init-groups env -i")
    assert "umask 077" in write and 'chmod 600 "$2.ddpfleet-tmp"' in write
    cfg = written_config(h)
    assert cfg["ServerApp"]["port"] == 8890 and cfg["ServerApp"]["ip"] == "127.0.0.1"
    assert cfg["PasswordIdentityProvider"]["hashed_password"] == HASH


def test_converged_node_changes_nothing_and_keeps_the_server(password):
    h = node(probe(running=True), config=config_text())
    statuses, steps = run(h)
    assert statuses == [
        ("user", "ok"),
        ("jupyterlab", "ok"),
        ("root_dir", "ok"),
        ("password", "ok"),
        ("config", "ok"),
        ("service files", "ok"),
        ("service", "ok"),
    ]
    assert h.changes == [] and h.written == {} and h.notified == []
    assert steps[-1].reason == "running (pid 815) on 127.0.0.1:8888"
    assert_secret_kept(h, steps)


def test_the_hash_is_kept_while_the_password_matches(password):
    h = node(probe(running=True), config=config_text())
    run(h)
    [hash_cmd] = [k for k in h.stdin if "passwd_check" in k]
    assert json.loads(h.stdin[hash_cmd]) == {"existing": HASH, "secret": SECRET}
    assert hash_cmd.startswith(f"{ENV}/bin/python -I -c")


def test_config_mode_or_owner_drift_is_rewritten(password):
    h = node(probe(running=True), config=config_text(), mode="644 jupyter")
    statuses, _ = run(h)
    assert ("config", "changed") in statuses and h.notified == [ROLE.RESTART]


@pytest.mark.parametrize("change", [{"port": 8890}, {"root_dir": "/srv/notebooks"}])
def test_config_change_restarts_the_running_server_once(password, change):
    h = node(probe(running=True), config=config_text())
    statuses, steps = run(h, **change)
    assert ("config", "changed") in statuses
    assert statuses[-1] == ("restart", "changed")
    stop = [i for i, c in enumerate(h.changes) if "kill -TERM" in c]
    start = [i for i, c in enumerate(h.changes) if "setsid -f" in c]
    assert len(stop) == 1 and len(start) == 1 and stop[0] < start[0]
    port = change.get("port", 8888)
    assert steps[-1].reason == f"restarted: config changed (pid 815) on 127.0.0.1:{port}"


def test_new_password_rehashes_and_restarts(password):
    h = node(probe(running=True), config=config_text(), hashed=NEW_HASH)
    statuses, _ = run(h)
    assert ("password", "changed") in statuses and ("config", "changed") in statuses
    assert written_config(h)["PasswordIdentityProvider"]["hashed_password"] == NEW_HASH
    assert statuses[-1] == ("restart", "changed")


def test_a_server_started_with_another_command_is_restarted(password):
    stale = jupyter.supervisor_argv(settings(env_dir="/opt/old"), USER, HOME)
    h = node(probe(running=True, argv=stale), config=config_text())
    statuses, steps = run(h)
    assert "restart queued: its command changed" in steps[-2].reason
    assert statuses[-1] == ("restart", "changed")


def test_a_supervisor_whose_server_does_not_answer_is_started_afresh(password):
    h = node(probe(running=True, port_open=False), probe(running=True), config=config_text())
    statuses, steps = run(h)
    assert statuses[-1] == ("service", "changed")
    assert steps[-1].reason.startswith("restarted (it was not answering)")


def test_busy_port_fails_with_the_fix(password):
    h = node(probe(port_open=True), config=config_text())
    statuses, steps = run(h)
    assert statuses[-1] == ("service", "failed")
    assert "127.0.0.1:8888 on the node is taken" in steps[-1].reason
    assert "jupyter.port" in steps[-1].reason


def test_server_that_never_answers_fails_with_its_log(password):
    h = node(probe(), config=config_text())
    h.answers.insert(0, (r"create_connection", 1, ""))
    h.answers.insert(0, (r"tail -n 5", 0, "OSError: [Errno 98] Address already in use\n"))
    statuses, steps = run(h)
    assert statuses[-1] == ("service", "failed")
    assert "Address already in use" in steps[-1].reason


# -- the password's sources ------------------------------------------------------------------


def test_no_password_and_no_hash_fails_naming_where_to_put_it(no_password):
    h = node(probe(running=False))
    statuses, steps = run(h)
    assert statuses[-1] == ("password", "failed")
    assert "$DDPFLEET_JUPYTER_PASSWORD" in steps[-1].reason
    assert "jupyter.password_file" in steps[-1].reason
    assert h.changes == []


def test_no_password_keeps_the_nodes_hash(no_password):
    h = node(probe(running=True), config=config_text())
    statuses, steps = run(h)
    assert ("password", "ok") in statuses and h.changes == []
    assert "kept the node's argon2 hash" in steps[3].reason
    assert not [k for k in h.ran if "passwd_check" in k]


def test_password_file_is_read_relative_to_the_inventory(no_password, tmp_path):
    secret_file = tmp_path / "jupyter.secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    h = node(probe(running=True), config=config_text(), tmp=tmp_path)
    statuses, steps = run(h, password_file="jupyter.secret")
    assert ("password", "ok") in statuses
    [hash_cmd] = [k for k in h.stdin if "passwd_check" in k]
    assert json.loads(h.stdin[hash_cmd])["secret"] == SECRET
    assert_secret_kept(h, steps)


def test_password_file_readable_by_others_is_refused(no_password, tmp_path):
    secret_file = tmp_path / "jupyter.secret"
    secret_file.write_text(SECRET)
    secret_file.chmod(0o644)
    h = node(probe(), tmp=tmp_path)
    statuses, steps = run(h, password_file="jupyter.secret")
    assert statuses[-1] == ("password", "failed")
    assert "chmod 600" in steps[-1].reason and SECRET not in steps[-1].reason


def test_hash_on_the_controller_when_jupyter_server_is_here(monkeypatch):
    auth = types.ModuleType("jupyter_server.auth")
    auth.passwd = lambda text, algorithm: NEW_HASH if text == SECRET else "argon2:wrong"
    auth.passwd_check = lambda hashed, text: False
    monkeypatch.setitem(sys.modules, "jupyter_server", types.ModuleType("jupyter_server"))
    monkeypatch.setitem(sys.modules, "jupyter_server.auth", auth)
    monkeypatch.setenv("DDPFLEET_JUPYTER_PASSWORD", SECRET)
    h = node(probe(running=True), config=config_text())
    statuses, _ = run(h)
    assert ("password", "changed") in statuses
    assert not [v for v in h.stdin.values() if SECRET in v]  # the text never left
    assert written_config(h)["PasswordIdentityProvider"]["hashed_password"] == NEW_HASH


def test_secret_never_prints():
    s = jupyter.Secret(SECRET)
    assert SECRET not in f"{s} {s!r} {[s]} {s:>40}" and s.reveal() == SECRET


def test_diff_hides_the_hash(password):
    h = node(probe(running=True), config=config_text(port=8890), diff=True, hashed=NEW_HASH)
    _, steps = run(h)
    [config] = [s for s in steps if s.name == "config"]
    assert '-    "port": 8890' in config.diff and "argon2:***" in config.diff
    assert HASH.split("$")[-1] not in config.diff


# -- settings, systemd, --check --------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg,message",
    [
        ({"user": "root"}, "never runs as root"),
        ({"port": 70000}, "jupyter.port 70000"),
        ({"user": "Bad User"}, "not a valid user name"),
    ],
)
def test_bad_settings_fail_before_anything_runs(password, cfg, message):
    h = node(probe())
    statuses, steps = run(h, **cfg)
    assert statuses == [("settings", "failed")] and message in steps[0].reason
    assert h.ran == []


def test_uid_0_user_is_refused(password):
    h = node(probe().replace("uid=999", "uid=0"))
    statuses, steps = run(h, user="toor")
    assert statuses == [("user", "failed")] and "uid 0" in steps[0].reason


def test_missing_user_without_create_user_fails(password):
    statuses, steps = run(node(probe(user=False)), create_user=False)
    assert statuses == [("user", "failed")] and "jupyter.create_user" in steps[0].reason


def test_env_without_jupyterlab_fails_with_the_fix(password):
    statuses, steps = run(node(probe(lab=False)))
    assert statuses[-1] == ("jupyterlab", "failed")
    assert "python_env.packages" in steps[-1].reason


def test_systemd_node_gets_an_enabled_unit(password):
    h = node(
        probe(pid1="systemd"), probe(pid1="systemd", running=True, unit="enabled"), facts=SYSTEMD
    )
    statuses, steps = run(h)
    assert statuses[-2:] == [("service files", "changed"), ("service", "changed")]
    assert steps[-1].reason == "started (pid 815) on 127.0.0.1:8888"
    unit = h.files[jupyter.UNIT_PATH].decode()
    assert "User=jupyter\n" in unit and f"ExecStart={ENV}/bin/jupyter-lab\n" in unit
    assert f"WorkingDirectory={HOME}\n" in unit and "Restart=on-failure" in unit
    assert "TimeoutStopSec=20\n" in unit  # a kernel ignoring SIGTERM: killed within stop's time
    assert [c for c in h.changes if c.startswith("systemctl")] == [
        "systemctl daemon-reload",
        "systemctl enable ddpfleet-jupyter",
        "systemctl start ddpfleet-jupyter",
    ]


def unit_text() -> str:
    return template(
        "jupyter",
        "ddpfleet-jupyter.service.j2",
        user="jupyter",
        group="999",
        port=8888,
        root_dir=HOME,
        lab=f"{ENV}/bin/jupyter-lab",
        path=jupyter.user_path(settings()),
    )


def test_systemd_converged_changes_nothing(password):
    h = node(
        probe(pid1="systemd", running=True, unit="enabled"), config=config_text(), facts=SYSTEMD
    )
    h.files[jupyter.UNIT_PATH] = unit_text().encode()
    statuses, _ = run(h)
    assert all(status == "ok" for _, status in statuses) and h.changes == []


def test_systemd_config_change_restarts_the_unit(password):
    h = node(
        probe(pid1="systemd", running=True, unit="enabled"), config=config_text(), facts=SYSTEMD
    )
    h.files[jupyter.UNIT_PATH] = unit_text().encode()
    statuses, _ = run(h, port=8890)
    assert statuses[-1] == ("restart", "changed")
    assert [c for c in h.changes if c.startswith("systemctl")] == [  # the unit names the port
        "systemctl daemon-reload",
        "systemctl restart ddpfleet-jupyter",
    ]


def test_check_mode_reports_and_changes_nothing(password):
    h = node(probe(user=False, files=False), check=True, installed=False)
    statuses, steps = run(h)
    assert statuses == [
        ("user", "changed"),
        ("jupyterlab", "ok"),
        ("root_dir", "changed"),
        ("password", "changed"),
        ("config", "changed"),
        ("service files", "changed"),
        ("service", "changed"),
    ]
    assert h.changes == [] and h.written == {}
    assert all(
        s.reason.startswith("would")
        for s in steps
        if s.status == "changed" and s.name != "password"
    )


def test_status_round_trips_are_bounded_by_the_command_timeout():
    """jupyter.status never hangs on a node: the probe gets command_timeout, `server list` (a
    Python start) at least LIST_TIMEOUT_S."""
    timeouts: list[float | None] = []

    class Conn:
        name, node = "node0", SimpleNamespace(command_timeout=7.0)

        def run(self, command, stdin=None, check=True, timeout=None, root=False) -> Result:
            timeouts.append(timeout)
            text = command if isinstance(command, str) else " ".join(command)
            out = probe(running=True) if "getent passwd" in text else ""
            return Result(self.name, "", 0, out, "", 0.0)

    row = jupyter.node_status(Conn(), settings())
    assert row["state"] == "starting or failing"
    assert timeouts == [7.0, jupyter_jobs.LIST_TIMEOUT_S]
