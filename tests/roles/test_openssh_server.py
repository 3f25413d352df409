"""openssh_server: node state in (one probe's answer), steps and commands out."""

from __future__ import annotations

from types import MappingProxyType

import pytest
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ddpfleet import inventory as inv
from ddpfleet.engine.roles import load_role
from tests.roles.fakehost import FACTS, FakeHost, apply, template

ROLE = load_role("openssh_server").module
CONTROLLER = ROLE.controller
HARDENING = ROLE.hardening
DEFAULTS = load_role("openssh_server").defaults
DROPIN = "/etc/ssh/sshd_config.d/00-ddpfleet-hardening.conf"
PEERS = ROLE.peers
OFF = {"known_hosts": PEERS.EMPTY_BLOCK, "marker": ""}  # node-to-node ssh off, nothing left
SYSTEMD_DEBIAN = MappingProxyType({**FACTS, "pid1": "systemd"})
ROCKY = MappingProxyType(
    {**FACTS, "os_id": "rocky", "os_like": "rhel centos fedora", "pid1": "systemd"}
)
REJECTED = '/dev/stdin line 4: unsupported option "maybe".'
# What Debian 12's OpenSSH 9.2 prints for `ssh -Q kex|cipher|mac|key-sig` (one line each).
OPENSSH_92 = {
    "q_kex": "diffie-hellman-group1-sha1,diffie-hellman-group14-sha1,"
    "diffie-hellman-group14-sha256,diffie-hellman-group16-sha512,diffie-hellman-group18-sha512,"
    "diffie-hellman-group-exchange-sha1,diffie-hellman-group-exchange-sha256,ecdh-sha2-nistp256,"
    "ecdh-sha2-nistp384,ecdh-sha2-nistp521,curve25519-sha256,curve25519-sha256@libssh.org,"
    "sntrup761x25519-sha512,sntrup761x25519-sha512@openssh.com",
    "q_cipher": "3des-cbc,aes128-cbc,aes192-cbc,aes256-cbc,aes128-ctr,aes192-ctr,aes256-ctr,"
    "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com",
    "q_mac": "hmac-sha1,hmac-sha1-96,hmac-sha2-256,hmac-sha2-512,hmac-md5,hmac-md5-96,"
    "umac-64@openssh.com,umac-128@openssh.com,hmac-sha1-etm@openssh.com,"
    "hmac-sha1-96-etm@openssh.com,hmac-sha2-256-etm@openssh.com,hmac-sha2-512-etm@openssh.com,"
    "hmac-md5-etm@openssh.com,hmac-md5-96-etm@openssh.com,umac-64-etm@openssh.com,"
    "umac-128-etm@openssh.com",
    "q_key": "ssh-ed25519,ssh-ed25519-cert-v01@openssh.com,sk-ssh-ed25519@openssh.com,"
    "sk-ssh-ed25519-cert-v01@openssh.com,ecdsa-sha2-nistp256,"
    "ecdsa-sha2-nistp256-cert-v01@openssh.com,ssh-dss,ssh-rsa,ssh-rsa-cert-v01@openssh.com,"
    "rsa-sha2-256,rsa-sha2-256-cert-v01@openssh.com,rsa-sha2-512,"
    "rsa-sha2-512-cert-v01@openssh.com",
}


def host_key() -> str:
    public = Ed25519PrivateKey.generate().public_key()
    return public.public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()


@pytest.fixture
def inventory(tmp_path) -> inv.Inventory:
    known = tmp_path / "known_hosts"
    known.write_text(f"10.9.0.10 {host_key()}\n10.9.0.11 {host_key()}\n")
    (tmp_path / "inventory.yaml").write_text(
        "cluster: {name: t}\n"
        f"ssh: {{user: root, key: {tmp_path}/id, known_hosts: {known}}}\n"
        "nodes:\n  node0: {host: 10.9.0.10}\n  node1: {host: 10.9.0.11}\n"
    )
    return inv.load(tmp_path / "inventory.yaml", check_files=False)


def lines(state=OPENSSH_92, user="root", **cfg) -> list[tuple[str, str]]:
    return HARDENING.settings({**DEFAULTS, **cfg}, state, user)


def dropin_text(state=OPENSSH_92, user="root", **cfg) -> str:
    return template("openssh_server", "hardening.conf.j2", settings=lines(state, user, **cfg))


def sshd_T(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """The probe's eff_* lines for a node where sshd uses every one of these lines."""
    return {f"eff_{k.lower()}": HARDENING.seconds(v) or v.lower() for k, v in pairs}


def converged(inventory: inv.Inventory, **cfg) -> dict[str, str]:
    """What a converged node answers to the probe."""
    return {
        "uid": "0",
        "home": "/root",
        "sshd": "1",
        "active": "active",
        "include": "1",
        "dropin": ROLE.sha256(dropin_text(**cfg)),
        "rundir": "1",
        **sshd_T(lines(**cfg)),
        **OPENSSH_92,
    }


def text(state: dict[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in state.items() if v is not None)


def node(
    inventory,
    state,
    facts=FACTS,
    check=False,
    validate=(0, ""),
    install=(0, ""),
    files=None,
    peers=OFF,
) -> FakeHost:
    return FakeHost(
        answers=[
            (r"root_legacy", 0, text(peers)),  # node-to-node ssh's probe (peers.py)
            (r"eff_", 0, text(state)),
            (r"sshd -t -f /dev/stdin", validate[0], validate[1]),
            (r"ddpfleet-new", install[0], install[1]),
        ],
        facts=facts,
        check=check,
        inventory=inventory,
        node=inventory.nodes[0],
        files=dict(files or {}),
    )


@pytest.fixture
def logins(monkeypatch):
    """fresh_login answers from this list (empty string: the login worked)."""
    answers: list[str] = []
    monkeypatch.setattr(
        ROLE, "fresh_login", lambda node, timeout: answers.pop(0) if answers else ""
    )
    return answers


def run(h: FakeHost, **cfg):
    steps, _ = apply("openssh_server", h, **cfg)
    return [(s.name, s.status) for s in steps], steps


NAMES = ["package", "service", "hardening", "node-to-node ssh"]


def test_converged_node_costs_one_probe_and_changes_nothing(inventory):
    h = node(inventory, converged(inventory))
    statuses, steps = run(h)
    assert statuses == [(n, "ok") for n in NAMES]
    assert h.changes == [] and h.written == {}
    assert len(h.ran) == 2  # the sshd probe and node-to-node ssh's
    assert steps[2].reason == f"{DROPIN} in place ({ROLE.WHAT})"


def test_check_on_a_converged_node_is_all_ok(inventory):
    h = node(inventory, converged(inventory), check=True)
    statuses, _ = run(h)
    assert {s for _, s in statuses} == {"ok"}
    assert h.changes == []


def test_missing_dropin_is_validated_installed_reloaded_and_login_checked(inventory, logins):
    h = node(inventory, {**converged(inventory), "dropin": ""})
    statuses, steps = run(h)
    assert statuses[2:4] == [("hardening", "changed"), ("reload", "changed")]
    assert statuses[4:] == [(n, "ok") for n in NAMES[3:]]
    validate = [c for c in h.ran if "/dev/stdin" in c]
    assert validate == ["/usr/sbin/sshd -t -f /dev/stdin"]
    assert h.ran.index(validate[0]) < next(i for i, c in enumerate(h.ran) if "ddpfleet-new" in c)
    assert any("kill -HUP" in c for c in h.changes)  # no systemd: SIGHUP, not a restart
    assert h.changes[-1] == f"rm -f {DROPIN}.ddpfleet-prev {DROPIN}.ddpfleet-pending"
    assert "a fresh controller login works" in steps[3].reason


def test_dropin_text_is_key_only():
    lines = dropin_text().splitlines()
    for line in (
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
    ):
        assert line in lines


def test_yaml_booleans_become_sshd_words():
    # Contract change (issue 15): X11Forwarding has its own setting now; an option naming a
    # keyword the drop-in already sets replaces that line in place instead of being ignored.
    got = lines(password_authentication=False, options={"X11Forwarding": True, "Banner": "none"})
    assert got[1:4] == [
        ("PasswordAuthentication", "no"),
        ("KbdInteractiveAuthentication", "no"),
        ("PermitRootLogin", "prohibit-password"),
    ]
    assert ("X11Forwarding", "yes") in got and ("X11Forwarding", "no") not in got
    assert got[-1] == ("Banner", "none")


def test_rejected_dropin_is_not_installed(inventory, logins):
    state = {**converged(inventory), "dropin": ""}
    h = node(inventory, state, validate=(255, REJECTED))
    statuses, steps = run(h, permit_root_login="maybe")
    assert statuses[-1] == ("hardening", "failed")
    assert not any("ddpfleet-new" in c for c in h.ran)  # never written
    assert not any("HUP" in c or "reload" in c for c in h.changes)
    assert 'unsupported option "maybe"' in steps[-1].reason
    assert "nothing was installed, the old config stays" in steps[-1].reason


def test_installed_config_rejected_in_place_is_rolled_back_by_the_script(inventory, logins):
    h = node(inventory, {**converged(inventory), "dropin": ""}, install=(3, "bad Match"))
    statuses, steps = run(h)
    assert statuses[-1] == ("hardening", "failed")
    assert "put back at once" in steps[-1].reason
    assert not any("HUP" in c for c in h.changes)
    install = next(c for c in h.changes if "ddpfleet-new" in c)
    assert 'mv -f "$prev" "$d"' in install  # the rollback lives in the same script


def test_failed_fresh_login_restores_the_old_dropin_and_reloads_again(inventory, logins):
    logins.append("authentication failed for root@10.9.0.10:22")
    h = node(inventory, {**converged(inventory), "dropin": ""})
    statuses, steps = run(h)
    assert statuses[-1] == ("login check", "failed")
    assert "put the previous" in steps[-1].reason and "authentication failed" in steps[-1].reason
    after = h.changes[next(i for i, c in enumerate(h.changes) if "HUP" in c) + 1 :]
    assert "ddpfleet-prev" in after[0] and "rm -f" in after[0]  # ROLLBACK
    assert "HUP" in after[1]  # reloaded with the old file


def test_check_validates_but_changes_nothing(inventory, logins):
    h = node(inventory, {**converged(inventory), "dropin": ""}, check=True)
    statuses, steps = run(h)
    assert ("hardening", "changed") in statuses
    assert steps[2].reason.startswith("would install")
    assert any("/dev/stdin" in c for c in h.ran)
    assert h.changes == [] and h.written == {}


def test_check_reports_a_dropin_sshd_would_reject(inventory):
    h = node(
        inventory, {**converged(inventory), "dropin": ""}, check=True, validate=(255, REJECTED)
    )
    statuses, _ = run(h)
    assert statuses[-1] == ("hardening", "failed")
    assert h.changes == []


@pytest.mark.parametrize("facts, unit", [(SYSTEMD_DEBIAN, "ssh"), (ROCKY, "sshd")])
def test_systemd_nodes_reload_their_unit(inventory, logins, facts, unit):
    h = node(inventory, {**converged(inventory), "dropin": ""}, facts=facts)
    run(h)
    assert f"systemctl reload {unit}" in h.changes
    assert not any("restart" in c for c in h.changes)


def test_pending_install_from_a_cut_short_run_is_reloaded_and_checked(inventory, logins):
    h = node(inventory, {**converged(inventory), "pending": "1"})
    statuses, _ = run(h)
    assert statuses[2:4] == [("hardening", "ok"), ("reload", "changed")]


def test_pending_install_under_check_says_it_would_reload_and_logs_in_nowhere(
    inventory, monkeypatch
):
    monkeypatch.setattr(ROLE, "fresh_login", lambda node, timeout: pytest.fail("logged in"))
    h = node(inventory, {**converged(inventory), "pending": "1"}, check=True)
    statuses, steps = run(h)
    assert statuses[2:4] == [("hardening", "ok"), ("reload", "changed")]
    assert steps[3].reason == "would reload sshd and check a fresh controller login"
    assert h.changes == []


def test_a_change_says_what_it_did_and_under_check_what_it_would_do(inventory, logins):
    state = {**converged(inventory), "sshd": None, "active": None}
    done = run(node(inventory, state))[1]
    would = run(node(inventory, state, check=True))[1]
    assert [s.reason for s in done[:2]] == [
        "installed openssh-server (apt-get)",
        "started sshd (pid file /run/sshd.pid)",
    ]
    assert [s.reason for s in would[:2]] == [
        "would install openssh-server (apt-get)",
        "would start sshd (pid file /run/sshd.pid)",
    ]


def test_missing_include_fails_before_anything_is_written(inventory):
    h = node(inventory, {**converged(inventory), "include": None, "dropin": ""})
    statuses, steps = run(h)
    assert statuses[-1] == ("hardening", "failed")
    assert "Include" in steps[-1].reason and h.changes == []


def test_sshd_t_spelling_of_prohibit_password_is_the_same_value(inventory):
    h = node(inventory, {**converged(inventory), "eff_permitrootlogin": "without-password"})
    statuses, _ = run(h)
    assert statuses[2] == ("hardening", "ok")


def test_earlier_file_overriding_the_dropin_is_reported(inventory):
    h = node(inventory, {**converged(inventory), "eff_passwordauthentication": "yes"})
    statuses, steps = run(h)
    assert statuses[-1] == ("hardening", "failed")
    assert "PasswordAuthentication yes" in steps[-1].reason


@pytest.mark.parametrize(
    "facts, command",
    [
        (
            FACTS,
            "env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install "
            "-y -q openssh-server",
        ),  # waits for the dpkg lock (issue 11)
        (ROCKY, "dnf install -y openssh-server"),
    ],
)
def test_missing_package_is_installed_by_the_os_package_manager(inventory, logins, facts, command):
    h = node(inventory, {**converged(inventory), "sshd": None}, facts=facts)
    statuses, _ = run(h)
    assert statuses[0] == ("package", "changed")
    assert h.changes[0] == command


def test_stopped_sshd_is_started(inventory):
    h = node(inventory, {**converged(inventory), "active": "inactive"}, facts=SYSTEMD_DEBIAN)
    statuses, _ = run(h)
    assert statuses[1] == ("service", "changed")
    assert h.changes == ["systemctl enable --now ssh"]


def test_a_node_whose_probe_says_nothing_fails_clearly(inventory):
    statuses, _ = run(node(inventory, {}))
    assert statuses == [("probe", "failed")]


def test_non_root_login_is_refused(inventory):
    h = node(inventory, {**converged(inventory), "uid": "1000"})
    statuses, steps = run(h)
    assert statuses == [("root", "failed")]
    assert "ssh.user: root" in steps[0].reason


@pytest.mark.parametrize(
    "before, top, after",
    [
        ("", True, "B\n"),
        ("a\n", True, "B\na\n"),
        ("a", False, "a\nB\n"),
        (f"a\n{CONTROLLER.BEGIN}\nold\n{CONTROLLER.END}\nb\n", False, "a\nb\nB\n"),
        (f"{CONTROLLER.BEGIN}\nold\n{CONTROLLER.END}\nb\n", True, "B\nb\n"),
    ],
)
def test_with_block_replaces_only_ddpfleets_block(before, top, after):
    assert CONTROLLER.with_block(before, "B\n", top) == after
