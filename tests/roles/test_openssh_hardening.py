"""openssh_server's sshd hardening (issue 15): the drop-in's lines for a node's OpenSSH, the
node-to-node client config's algorithm lines, bad values, and what --check says on an old node.
The sandbox test (tests/integration/test_sshd_audit.py) runs ssh-audit against real nodes."""

from __future__ import annotations

from types import SimpleNamespace

import paramiko
import pytest

from ddpfleet import inventory as inv
from ddpfleet.engine.roles import load_role
from tests.roles.test_openssh_server import (
    DEFAULTS,
    DROPIN,
    HARDENING,
    ROLE,
    converged,
    inventory,  # noqa: F401 (a fixture)
    lines,
    logins,  # noqa: F401 (a fixture)
    node,
    run,
)

# What ssh-audit 3.9 rates [fail] on a Debian 12 node before the hardening.
AUDIT_FAILS = (
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "hmac-sha1",
    "hmac-sha1-etm@openssh.com",
)
# OpenSSH 7.4 (CentOS 7): no sntrup761, no chacha20 in FIPS builds, `ssh -Q key` without the
# rsa-sha2 signature names, and sshd -T prints pubkeyacceptedkeytypes.
OPENSSH_74 = {
    "q_kex": "diffie-hellman-group14-sha1,diffie-hellman-group16-sha512,ecdh-sha2-nistp256,"
    "curve25519-sha256,curve25519-sha256@libssh.org",
    "q_cipher": "aes128-ctr,aes256-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com",
    "q_mac": "hmac-sha1,hmac-sha2-256,hmac-sha2-256-etm@openssh.com",
    "q_key": "ssh-ed25519,ssh-rsa,ecdsa-sha2-nistp256",
    "eff_pubkeyacceptedkeytypes": "ssh-ed25519,ssh-rsa",
}
# The drop-in every node got before issue 15: key-only login, nothing else.
OLD_DROPIN = (
    "# Managed by ddpfleet (roles/openssh_server): key-only login. Edits here are overwritten.\n"
    "# The name sorts before 50-cloud-init.conf: sshd keeps the first value it reads.\n"
    "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
    "PermitRootLogin prohibit-password\n"
)


def values(pairs) -> dict[str, str]:
    return dict(pairs)


def test_defaults_on_openssh_92_offer_nothing_ssh_audit_fails():
    got = values(lines())
    offered = ",".join(got[k] for k in ("KexAlgorithms", "Ciphers", "MACs")).split(",")
    assert not set(AUDIT_FAILS) & set(offered)
    assert got["KexAlgorithms"].split(",")[:2] == [
        "sntrup761x25519-sha512",
        "sntrup761x25519-sha512@openssh.com",
    ]  # post-quantum first; 9.2 lacks mlkem768x25519-sha256, so it is left out
    assert "mlkem768x25519-sha256" not in got["KexAlgorithms"]
    assert all(m.endswith("-etm@openssh.com") for m in got["MACs"].split(","))
    assert "umac-64-etm@openssh.com" not in got["MACs"]  # 64-bit tag
    assert not [c for c in got["Ciphers"].split(",") if c.endswith("-cbc")]
    assert "ecdsa" not in got["HostKeyAlgorithms"] and "ssh-rsa," not in got["HostKeyAlgorithms"]
    assert got["PubkeyAcceptedAlgorithms"] == got["HostKeyAlgorithms"]


def test_defaults_set_the_session_limits():
    got = values(lines())
    assert got["MaxAuthTries"] == "4" and got["LoginGraceTime"] == "30"
    assert (got["ClientAliveInterval"], got["ClientAliveCountMax"]) == ("15", "4")  # review #8
    assert got["X11Forwarding"] == "no" and got["AllowAgentForwarding"] == "no"
    assert got["AllowTcpForwarding"] == "local"  # the Jupyter tunnel is a local forward
    assert got["PermitRootLogin"] == "prohibit-password"  # the controller logs in as root


def test_root_login_is_off_once_the_controller_logs_in_as_someone_else():
    assert values(lines(user="ubuntu"))["PermitRootLogin"] == "no"
    assert values(lines(user="ubuntu", permit_root_login="yes"))["PermitRootLogin"] == "yes"


@pytest.mark.parametrize(
    "keyword, mine",
    [
        ("KexAlgorithms", paramiko.Transport._preferred_kex),
        ("Ciphers", paramiko.Transport._preferred_ciphers),
        ("MACs", paramiko.Transport._preferred_macs),
        ("HostKeyAlgorithms", paramiko.Transport._preferred_keys),
        ("PubkeyAcceptedAlgorithms", paramiko.Transport._preferred_pubkeys),
    ],
)
def test_the_controllers_paramiko_can_still_connect(keyword, mine):
    assert set(values(lines())[keyword].split(",")) & set(mine), keyword


def test_an_older_openssh_is_never_given_a_name_it_does_not_know():
    got = lines(state=OPENSSH_74)
    known = {n for k, v in OPENSSH_74.items() if k.startswith("q_") for n in v.split(",")}
    algorithm_lines = HARDENING.client_lines(got)
    assert {k for k, _ in algorithm_lines} >= {"KexAlgorithms", "PubkeyAcceptedKeyTypes"}
    for _, value in algorithm_lines:
        assert set(value.split(",")) <= known
    assert values(got)["KexAlgorithms"] == "curve25519-sha256,curve25519-sha256@libssh.org," + (
        "diffie-hellman-group16-sha512"
    )


def test_a_string_goes_in_as_written_and_null_leaves_the_keyword_out():
    got = values(lines(ciphers="^aes256-gcm@openssh.com", macs=None, max_auth_tries=None))
    assert got["Ciphers"] == "^aes256-gcm@openssh.com"
    assert "MACs" not in got and "MaxAuthTries" not in got


def test_without_an_ssh_q_answer_the_list_stays_whole_for_sshd_t():
    """No `ssh -Q` answer (client not installed): the list stays whole; sshd -t judges it."""
    got = values(lines(state={}))
    assert got["KexAlgorithms"].split(",") == DEFAULTS["kex_algorithms"]


@pytest.mark.parametrize(
    "cfg, says",
    [
        ({"kex_algorithms": ["ecdh-sha2-nistp999"]}, "openssh_server.kex_algorithms: this node"),
        ({"macs": []}, "openssh_server.macs: give a list"),
        ({"ciphers": "aes128-ctr\nPasswordAuthentication yes"}, "openssh_server.ciphers: "),
        ({"options": {"Banner": "x\nPermitRootLogin yes"}}, "openssh_server.options.Banner: "),
        ({"options": {"Allow Users": "root"}}, "not an sshd keyword"),
        ({"login_grace_time": ""}, "openssh_server.login_grace_time: "),
    ],
)
def test_a_bad_value_fails_the_step_and_changes_nothing(inventory, logins, cfg, says):
    h = node(inventory, {**converged(inventory), "dropin": ""})
    statuses, steps = run(h, **cfg)
    assert statuses[-1] == ("hardening", "failed")
    assert says in steps[-1].reason and steps[-1].reason.endswith("nothing was changed")
    assert "\n" not in steps[-1].reason
    assert h.changes == [] and h.written == {}


def test_an_earlier_file_overriding_an_algorithm_line_is_reported(inventory):
    state = {**converged(inventory), "eff_macs": "hmac-sha1,hmac-sha2-256"}
    statuses, steps = run(node(inventory, state))
    assert statuses[-1] == ("hardening", "failed")
    assert "sshd -T says MACs hmac-sha1,hmac-sha2-256" in steps[-1].reason


def test_sshd_T_prints_times_in_seconds(inventory):
    state = {**converged(inventory, login_grace_time="1m"), "eff_logingracetime": "60"}
    statuses, _ = run(node(inventory, state), login_grace_time="1m")
    assert statuses[2] == ("hardening", "ok")


def test_node_to_node_ssh_gets_the_drop_ins_algorithms(inventory, monkeypatch):
    got = []
    monkeypatch.setattr(
        ROLE.peers,
        "Peers",
        lambda t, c, algorithms: got.append(algorithms) or SimpleNamespace(steps=lambda: iter(())),
    )
    run(node(inventory, converged(inventory)))
    assert got == [HARDENING.client_lines(lines())]
    assert "MaxAuthTries" not in dict(got[0])  # server-only settings stay in the drop-in


def test_check_on_a_node_with_the_old_dropin_reports_the_change(inventory):
    state = {**converged(inventory), "dropin": ROLE.sha256(OLD_DROPIN)}
    h = node(inventory, state, check=True, files={DROPIN: OLD_DROPIN.encode()})
    h.diff = True
    statuses, steps = run(h)
    assert statuses[2] == ("hardening", "changed")
    assert steps[2].reason.startswith(f"would install {DROPIN}")
    assert "+KexAlgorithms sntrup761x25519-sha512," in steps[2].diff
    assert "+ClientAliveInterval 15" in steps[2].diff
    assert h.changes == [] and h.written == {}


def test_an_ecdsa_only_pin_is_not_locked_out(inventory, logins):
    """The controller trusts only the node's ECDSA key: the new HostKeyAlgorithms would make
    sshd stop offering it, so the next login would fail; refused before anything changes."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    line = public.public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
    known = inventory.nodes[0].known_hosts
    known.write_text(f"10.9.0.10 {line}\n")
    h = node(inventory, {**converged(inventory), "dropin": ""})
    statuses, steps = run(h)
    assert statuses[-1] == ("hardening", "failed")
    assert "trusts only ecdsa-sha2-nistp256 host keys for 10.9.0.10" in steps[-1].reason
    assert h.changes == [] and h.written == {}
    assert HARDENING.unoffered_pins(lines(), {"ssh-rsa"}) == ""  # RSA: rsa-sha2-* sign it
    assert HARDENING.unoffered_pins(lines(), set()) == ""  # nothing pinned yet: trust decides


def test_a_bad_value_names_its_inventory_line(tmp_path, logins):
    (tmp_path / "inventory.yaml").write_text(
        "cluster: {name: t}\n"
        f"ssh: {{user: root, key: {tmp_path}/id, known_hosts: {tmp_path}/known_hosts}}\n"
        "openssh_server:\n"
        "  kex_algorithms: [ecdh-sha2-nistp999]\n"
        "nodes:\n"
        "  node0: {host: 10.9.0.10, vars: {openssh_server_macs: [hmac-sha3-1024]}}\n"
    )
    loaded = inv.load(tmp_path / "inventory.yaml", check_files=False)
    cfg = load_role("openssh_server").config(loaded, loaded.nodes[0])
    for key, line in (("kex_algorithms", 4), ("macs", 6)):
        h = node(loaded, {**converged(loaded), "dropin": ""})
        _, steps = run(h, **{**DEFAULTS, key: cfg[key]})
        assert steps[-1].reason.startswith(f"inventory.yaml:{line}: openssh_server.{key}: ")
        assert h.changes == []
