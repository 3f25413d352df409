"""known_hosts bookkeeping shared by connect and trust (review 2026-11-29, #20)."""

from __future__ import annotations

import socket

import paramiko
import pytest

from ddpfleet.ssh import knownhosts


@pytest.fixture(scope="module")
def keys() -> tuple[paramiko.PKey, paramiko.PKey]:
    return paramiko.RSAKey.generate(1024), paramiko.RSAKey.generate(1024)


def line(name: str, key: paramiko.PKey) -> str:
    return f"{name} {key.get_name()} {key.get_base64()}\n"


def test_a_project_pin_is_not_shadowed_by_a_stale_user_entry(tmp_path, monkeypatch, keys):
    good, stale = keys
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "known_hosts").write_text(line("10.0.0.5", stale))
    project = tmp_path / "project_known_hosts"
    project.write_text(line("10.0.0.5", good))
    assert knownhosts.pinned("10.0.0.5", project) == ({"ssh-rsa": good}, project)


def test_the_user_file_answers_for_hosts_the_project_does_not_know(tmp_path, monkeypatch, keys):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    user = tmp_path / ".ssh" / "known_hosts"
    user.write_text(line("[10.0.0.6]:2222", keys[0]))
    found, source = knownhosts.pinned(
        knownhosts.known_hosts_name("10.0.0.6", 2222), tmp_path / "missing"
    )
    assert found == {"ssh-rsa": keys[0]} and source == user


def test_append_keeps_a_last_line_without_newline(tmp_path, keys):
    path = tmp_path / "kh"
    path.write_text(line("10.0.0.7", keys[0]).rstrip("\n"))
    knownhosts.append(path, line("10.0.0.8", keys[1]))
    hk = paramiko.HostKeys(str(path))
    assert hk.lookup("10.0.0.7")["ssh-rsa"] == keys[0]
    assert hk.lookup("10.0.0.8")["ssh-rsa"] == keys[1]


def test_prefer_asks_for_the_pinned_type_first(keys):
    ours, theirs = socket.socketpair()  # a transport never started: no handshake happens
    transport = paramiko.Transport(ours)
    try:
        assert transport.get_security_options().key_types[0] != "ssh-rsa"
        knownhosts.prefer(transport, {"ssh-rsa": keys[0]})
        assert transport.get_security_options().key_types[0] == "ssh-rsa"
    finally:
        transport.close()
        theirs.close()
