"""The connection keeper's own rules, without a node (tests/integration/test_keeper.py has the
real thing): it never holds a sudo password, and a changed password file or system ssh config
means a fresh connection. Only the SSH connection is stood in for (StubConn answers the
escalation probe as a sudo that asks a password would)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from ddpfleet import inventory as inv
from ddpfleet.errors import BecomeError
from ddpfleet.inventory import Node
from ddpfleet.ssh import become, connection, dial, keeper, kept
from ddpfleet.ssh.connection import Conn
from ddpfleet.ssh.result import IF_ABLE, Result

PASSWORD = "hunter2-sudo"


class StubConn(Conn):
    """A login user whose sudo asks a password (and takes any); records every stdin."""

    def __init__(self, node: Node):
        alive = SimpleNamespace(is_active=lambda: True)
        super().__init__(node, SimpleNamespace(transport=alive, close=lambda: None))
        self.stdins: list[bytes | None] = []

    def run(self, command, stdin=None, check=True, timeout=None, root=False) -> Result:
        self.stdins.append(stdin.encode() if isinstance(stdin, str) else stdin)
        if command == become.PROBE:
            said = "1000\nsudo: a password is required\nddpfleet-pw-P\n"
            return Result(self.name, command, 0, said, "", 0.0)
        return Result(self.name, command, 0, "", "", 0.0)


@pytest.fixture
def made(monkeypatch) -> list[StubConn]:
    """The keeper's connections, made by StubConn instead of SSH."""
    conns: list[StubConn] = []

    def connect(node: Node) -> StubConn:
        conns.append(StubConn(node))
        return conns[-1]

    monkeypatch.setattr(keeper, "connect", connect)
    monkeypatch.delenv(become.PASSWORD_ENV, raising=False)
    return conns


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    p = tmp_path / "become_password"
    p.write_text(PASSWORD + "\n")
    p.chmod(0o600)
    return p


def spec(password_file: Path) -> dict:
    node = Node("node1", "10.0.0.11", 22, "ubuntu", None, Path("/nonexistent"), 2.0)
    return kept.node_spec(Node(**{**vars(node), "become_password_file": password_file}))


def test_the_keeper_never_reads_the_become_password_file(made, password_file: Path):
    k = keeper.Keeper(60)
    answer = k.handle({"op": "escalation", "node": spec(password_file)})
    sent = b"".join(s or b"" for c in made for s in c.stdins)
    assert PASSWORD.encode() not in sent, "the keeper read the password file and used it"
    assert answer["error"]["class"] == "BecomeError"  # sudo asks a password the keeper lacks
    assert all(c.node.become_password_file is None for c in made)
    assert all(c._escalation is None for c in made)  # nothing cached, no password held
    k.close()


def test_a_changed_password_file_or_system_ssh_config_means_a_new_connection(
    made, password_file: Path, tmp_path: Path, monkeypatch
):
    system = tmp_path / "ssh_config"
    system.write_text("Host *\n")
    monkeypatch.setattr(connection, "SYSTEM_SSH_CONFIG", system)
    k = keeper.Keeper(60)
    s = spec(password_file)
    assert k.conn(s)[1] and not k.conn(s)[1]  # made once, then reused
    password_file.write_text("another-password\n")
    assert k.conn(s)[1], "a changed password file kept the old connection"
    system.write_text("Host *\n  ServerAliveInterval 9\n")
    assert k.conn(s)[1], "a changed /etc/ssh/ssh_config kept the old connection"
    assert k.handshakes == 3
    k.close()


def test_an_inventory_with_a_password_file_goes_direct(tmp_path: Path, monkeypatch):
    (tmp_path / "id").write_text("not really a key\n")
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    (tmp_path / "pw").chmod(0o600)
    path = tmp_path / "inventory.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            cluster: {name: demo}
            ssh: {user: ubuntu, key: id, become_password_file: pw}
            nodes:
              node0: {host: 10.0.0.10}
            """
        )
    )
    asked: list[dict] = []

    def ask(sock, request, timeout=None):  # a keeper that answers
        asked.append(request)
        return {"nodes": {"node0": "ok"}}

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(kept, "ask", ask)
    monkeypatch.setattr(dial, "start", lambda nodes: None)
    started: list = []
    monkeypatch.setattr(kept.atexit, "register", lambda *a: started.append(a))
    f = kept.fleet(inv.load(path))
    assert isinstance(f, connection.Fleet) and asked == [] and started == []


class Channel:
    """A paramiko channel as Conn.run drives it: the command's answer is ready at once."""

    def __init__(self, answer):
        self.answer, self.sent = answer, []
        self.out, self.code = b"", -1
        self.eof_received, self.closed = True, False

    def exec_command(self, wire: str) -> None:
        self.sent.append(wire)
        self.code, out = self.answer(wire)
        self.out = out.encode()

    def recv_ready(self) -> bool:
        return bool(self.out)

    def recv(self, n: int) -> bytes:
        out, self.out = self.out, b""
        return out

    def recv_stderr_ready(self) -> bool:
        return False

    def exit_status_ready(self) -> bool:
        return True

    def recv_exit_status(self) -> int:
        return self.code

    def sendall(self, data: bytes) -> None:
        pass

    def shutdown_write(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def sudo_node(said: str):
    """A real Conn over a stand-in channel: the become probe answers `said` (as ubuntu),
    any other command prints `ran`; every command line sent is kept in `.sent`."""
    channels: list[Channel] = []

    def answer(wire: str) -> tuple[int, str]:
        return (0, said) if "ddpfleet-sudo-ok" in wire else (0, "ran\n")

    def open_session(timeout=None) -> Channel:
        channels.append(Channel(answer))
        return channels[-1]

    transport = SimpleNamespace(is_active=lambda: True, open_session=open_session)
    node = Node("node1", "10.0.0.11", 22, "ubuntu", None, Path("/nonexistent"), 2.0)
    conn = Conn(node, SimpleNamespace(transport=transport, close=lambda: None))
    return conn, lambda: [w for c in channels for w in c.sent]


def test_root_if_able_runs_as_root_where_sudo_allows_else_as_the_login_user():
    conn, sent = sudo_node("1000\nddpfleet-sudo-ok\nddpfleet-pw-P\n")
    assert conn.run("id -u", root=IF_ABLE).stdout == "ran\n"
    assert "sudo -n -H -- /bin/sh -c" in sent()[-1]  # the probe, then the command as root
    conn, sent = sudo_node("1000\nsudo: a password is required\nddpfleet-pw-P\n")
    assert conn.run("id -u", root=IF_ABLE).stdout == "ran\n" and sent()[-1] == "id -u"
    with pytest.raises(BecomeError, match="sudo asks ubuntu's password"):
        conn.run("id -u", root=True)  # root demanded: the node's error, as before


def test_the_keeper_runs_root_if_able_in_the_one_request(monkeypatch):
    """gpu-status's probe through the keeper: one `run` request decides the escalation and
    runs, where the client used to ask `escalation` first."""
    conn, sent = sudo_node("1000\nddpfleet-sudo-ok\nddpfleet-pw-P\n")
    monkeypatch.setattr(keeper, "connect", lambda node: conn)
    k = keeper.Keeper(60)
    s = kept.node_spec(conn.node)
    request = {"op": "run", "node": s, "command": "id -u", "stdin": None, "timeout": None}
    answer = k.handle({**request, "root": IF_ABLE})
    assert answer["result"]["stdout"] == "ran\n" and sent()[-1].startswith("sudo -n -H")
    assert k.handle({**request, "root": False})["result"] and sent()[-1] == "id -u"
    assert k.handle({"op": "stats"})["asked"] == {"run": 2, "stats": 1}
    k.close()
