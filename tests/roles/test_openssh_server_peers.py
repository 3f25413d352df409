"""openssh_server's node-to-node SSH (peers.py, cluster.py): probe answers in, steps out."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ddpfleet import inventory as inv
from ddpfleet.engine.roles import load_role
from ddpfleet.errors import DdpfleetError
from tests.roles.fakehost import FakeHost, apply
from tests.roles.test_openssh_server import OFF, converged, host_key, lines, text

ROLE = load_role("openssh_server")
PEERS, CONTROLLER = ROLE.module.peers, ROLE.module.controller
KEY = "ddpfleet_cluster_ed25519"
ON = {"cluster_ssh": True, "cluster_user": "alice"}
NAMES = [
    "cluster user",
    "cluster key",
    "cluster cert",
    "authorized_keys",
    "known_hosts",
    "ssh config",
    "cleanup",
]


def public_line() -> str:
    key = Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()


def write_inventory(tmp_path, nodes: str, user: str = "alice") -> inv.Inventory:
    known = tmp_path / "known_hosts"
    if not known.exists():
        known.write_text(f"10.9.0.10 {host_key()}\n10.9.0.11 {host_key()}\n")
    (tmp_path / "inventory.yaml").write_text(
        "cluster: {name: t}\n"
        f"ssh: {{user: root, key: {tmp_path}/id, known_hosts: {known}}}\n"
        f"openssh_server: {{cluster_ssh: true, cluster_user: {user}}}\n"
        f"nodes:\n{nodes}"
    )
    return inv.load(tmp_path / "inventory.yaml", check_files=False)


TWO = "  node0: {host: 10.9.0.10}\n  node1: {host: 10.9.0.11}\n"


@pytest.fixture
def inventory(tmp_path) -> inv.Inventory:
    return write_inventory(tmp_path, TWO)


class Node(FakeHost):
    """FakeHost that also keeps, in order, what each command got on stdin (the certificate,
    the ssh config)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stdins: list[tuple[str, str]] = []

    def run(self, command, stdin=None, check=True, timeout=None, root=False):
        if stdin is not None:
            text = command if isinstance(command, str) else " ".join(command)
            self.stdins.append((text, stdin if isinstance(stdin, str) else stdin.decode()))
        return super().run(command, stdin=stdin, check=check, timeout=timeout)


# What the role passes: the algorithm lines of the drop-in for a converged OpenSSH 9.2 node.
CLIENT_LINES = load_role("openssh_server").module.hardening.client_lines(lines())


def node(
    inventory, peers: dict, check: bool = False, keygen: str = "", name: str = "node0"
) -> Node:
    return Node(
        answers=[
            (r"root_legacy", 0, text(peers)),
            (r"eff_", 0, text(converged(inventory))),
            (r"ssh-keygen -q", 0, f"pub={keygen}\n"),
        ],
        check=check,
        inventory=inventory,
        node=inventory.node(name),
        name=name,
        role=ROLE,
        files={"/etc/ssh/ssh_known_hosts": b"node0,10.9.0.10 ssh-ed25519 AAAA\n"},
    )


def peers_of(h: Node, **cfg) -> PEERS.Peers:
    return PEERS.Peers(SimpleNamespace(host=h.host, cfg={**ROLE.defaults, **ON, **cfg}), CONTROLLER)


def settled(inventory, pub: str, user: str = "alice", marker: str = "alice") -> dict[str, str]:
    """What a node that is converged with node-to-node ssh on answers to peers.py's probe."""
    h = node(inventory, {})
    p = peers_of(h, cluster_user=user)
    ca = p.ca()
    me = CONTROLLER.principal(h.node)
    lines, _ = CONTROLLER.known_host_lines(inventory.nodes)
    peers = [CONTROLLER.Peer(n.name, *CONTROLLER.resolved(n), user) for n in inventory.nodes]
    return {
        "known_hosts": PEERS.sha256(h.host.template("known_hosts.j2", lines=lines)),
        "marker": marker,
        "user_ok": "1",
        "pub": f"{pub} ddpfleet-key:node0@t",
        "cert": CONTROLLER.sign(ca[0], pub, me, "ddpfleet-key:node0@t"),
        "ak": PEERS.sha256(p.ca_line(ca[1])[0] + "\n"),
        "ssh_config": PEERS.sha256(
            h.host.template("ssh_config.j2", peers=peers, key_name=KEY, algorithms=CLIENT_LINES)
        ),
    }


def run(h: Node, **cfg):
    steps, _ = apply("openssh_server", h, **{**ON, **cfg})
    return [(s.name, s.status) for s in steps[3:]], steps[3:]


def test_converged_node_to_node_ssh_changes_nothing(inventory):
    h = node(inventory, settled(inventory, public_line()))
    statuses, steps = run(h)
    assert statuses == [(n, "ok") for n in NAMES]
    assert h.changes == [] and h.written == {}
    assert "alice (not root)" in steps[0].reason


def test_fresh_node_makes_its_own_key_and_gets_a_restricted_ca_line(inventory):
    pub = public_line()
    h = node(inventory, {"known_hosts": PEERS.EMPTY_BLOCK, "user_ok": "1"}, keygen=pub)
    statuses, _ = run(h)
    assert statuses == [(n, "changed") for n in NAMES[:6]] + [("cleanup", "ok")]
    keygen = next(c for c in h.changes if "ssh-keygen -q" in c)
    assert keygen.startswith("runuser -u alice -- sh -c")  # made on the node, as the user
    cert = next(s for c, s in h.stdins if f"{KEY}-cert.pub" in c)
    assert CONTROLLER.cert_fits(
        cert,
        pub,
        CONTROLLER.ca(inventory.root / ".ddpfleet/cluster_ca", create=False)[1],
        CONTROLLER.principal(inventory.nodes[0]),
    )
    authorize = next(c for c in h.changes if "authorized_keys" in c and "cert-authority" in c)
    assert authorize.startswith("runuser -u alice -- sh -c")
    line = authorize.split(" sh ", 2)[-1]
    assert 'from="10.9.0.10,10.9.0.11",restrict ssh-ed25519 ' in line
    assert 'principals="ddpfleet:node0:' in line and ",ddpfleet:node1:" in line
    assert "ddpfleet-ca@t" in line
    config = next(s for c, s in h.stdins if "'config' 600" in c or " config 600" in c)
    assert "Host node1\n    HostName 10.9.0.11\n    Port 22\n    User alice\n" in config
    assert "cluster_ssh_users" in " ".join(h.changes)  # alice recorded for a later undo


def test_private_key_never_leaves_the_controller_or_goes_to_the_node(inventory):
    h = node(inventory, {"known_hosts": PEERS.EMPTY_BLOCK, "user_ok": "1"}, keygen=public_line())
    run(h)
    ca_private = (inventory.root / ".ddpfleet/cluster_ca").read_bytes()
    assert (inventory.root / ".ddpfleet/cluster_ca").stat().st_mode & 0o777 == 0o600
    sent = " ".join(h.changes) + " ".join(s for _, s in h.stdins) + str(h.written)
    assert "PRIVATE KEY" not in sent and ca_private.decode() not in sent


def test_a_node_removed_from_the_inventory_is_no_longer_authorized(inventory, tmp_path):
    state = settled(inventory, public_line())
    smaller = write_inventory(tmp_path, "  node0: {host: 10.9.0.10}\n")
    h = node(smaller, state)
    statuses, _ = run(h)
    assert ("authorized_keys", "changed") in statuses
    line = next(c for c in h.changes if "cert-authority" in c)
    assert "ddpfleet:node1:" not in line and "10.9.0.11" not in line
    assert 'from="10.9.0.10",restrict' in line
    assert ("ssh config", "changed") in statuses and ("known_hosts", "changed") in statuses
    assert "10.9.0.11" not in h.written["/etc/ssh/ssh_known_hosts"].decode()


def test_root_is_never_the_default_user(inventory):
    # Issue 11: "" means the training user (train, here missing on the node), never root.
    h = node(inventory, {"known_hosts": PEERS.EMPTY_BLOCK})
    statuses, steps = run(h, cluster_user="")
    assert statuses == [("cluster user", "failed")]
    assert "no user 'train' on this node" in steps[0].reason
    assert h.changes == []


def test_root_only_when_named(tmp_path):
    inventory = write_inventory(tmp_path, TWO, user="root")
    pub = public_line()
    h = node(inventory, settled(inventory, pub, user="root", marker="root"))
    statuses, steps = run(h, cluster_user="root")
    assert statuses == [(n, "ok") for n in NAMES]
    assert "root, as the inventory says" in steps[0].reason


def test_missing_user_fails_before_anything_changes(inventory):
    h = node(inventory, {"known_hosts": PEERS.EMPTY_BLOCK})
    statuses, steps = run(h)
    assert statuses == [("cluster user", "failed")]
    assert "no user 'alice' on this node: create it" in steps[0].reason
    assert h.changes == []


def test_the_shared_root_key_of_older_ddpfleet_is_replaced_and_removed(inventory):
    pub = public_line()
    state = {**settled(inventory, pub), "root_legacy": "1"}
    h = node(inventory, state)
    statuses, _ = run(h)
    assert statuses[-1] == ("cleanup", "changed")
    forget = next(c for c in h.changes if "runuser" in c and "ddpfleet-tmp" in c)
    assert forget.endswith(f"sh root {KEY}") or " root " in forget
    legacy_on_user = {**settled(inventory, pub), "legacy": "1"}
    h = node(inventory, legacy_on_user, keygen=public_line())
    statuses, _ = run(h)
    assert ("cluster key", "changed") in statuses and ("cluster cert", "changed") in statuses


def test_turning_it_off_removes_every_recorded_users_files(inventory):
    state = {**settled(inventory, public_line(), marker="alice bob"), "root_legacy": "1"}
    h = node(inventory, state)
    h.files[PEERS.KNOWN_HOSTS] = f"x\n{CONTROLLER.BEGIN}\nold\n{CONTROLLER.END}\n".encode()
    statuses, steps = run(h, cluster_ssh=False)
    assert statuses == [("node-to-node ssh", "changed")]
    assert steps[0].reason.startswith("removed alice's cluster key")
    forgotten = [c for c in h.changes if "getent passwd" in c]
    assert [c.split(" sh ")[-1].split()[0] for c in forgotten] == ["alice", "bob", "root"]
    assert h.written[PEERS.KNOWN_HOSTS] == b"x\n"
    assert any("rm -f /var/lib/ddpfleet/cluster_ssh_users" in c for c in h.changes)


def test_off_and_clean_is_a_no_op(inventory):
    h = node(inventory, OFF)
    statuses, _ = run(h, cluster_ssh=False)
    assert statuses == [("node-to-node ssh", "ok")]
    assert h.changes == []


def test_another_user_named_now_gets_the_old_users_files_removed(tmp_path):
    inventory = write_inventory(tmp_path, TWO, user="bob")
    state = settled(inventory, public_line(), user="bob", marker="alice bob")
    h = node(inventory, state)
    statuses, _ = run(h, cluster_user="bob")
    assert statuses[-1] == ("cleanup", "changed")
    assert any("getent passwd" in c and " alice " in c for c in h.changes)


def test_check_never_makes_the_ca_or_changes_the_node(inventory):
    h = node(inventory, {"known_hosts": PEERS.EMPTY_BLOCK, "user_ok": "1"}, check=True)
    statuses, _ = run(h)
    assert ("cluster key", "changed") in statuses and ("cluster cert", "changed") in statuses
    assert not (inventory.root / ".ddpfleet/cluster_ca").exists()
    assert h.changes == [] and h.written == {}


def test_a_cert_for_another_principal_or_ca_is_replaced(inventory):
    pub = public_line()
    ca = CONTROLLER.ca(inventory.root / ".ddpfleet/cluster_ca", create=True)
    other = CONTROLLER.ca(inventory.root / "other_ca", create=True)
    me = CONTROLLER.principal(inventory.nodes[0])
    assert CONTROLLER.cert_fits(CONTROLLER.sign(ca[0], pub, me, "k"), pub, ca[1], me)
    assert not CONTROLLER.cert_fits(CONTROLLER.sign(ca[0], pub, "x", "k"), pub, ca[1], me)
    assert not CONTROLLER.cert_fits(CONTROLLER.sign(other[0], pub, me, "k"), pub, ca[1], me)
    assert not CONTROLLER.cert_fits(CONTROLLER.sign(ca[0], pub, me, "k"), public_line(), ca[1], me)
    assert not CONTROLLER.cert_fits("garbage", pub, ca[1], me)


def test_a_node_sent_public_key_is_checked_before_use():
    assert CONTROLLER.public_key("ssh-ed25519 AAAA\ncert-authority x") is None
    good = public_line()
    assert CONTROLLER.public_key(f"{good} some comment") == good


def test_a_value_that_would_break_the_options_fails_clearly(inventory):
    h = node(inventory, settled(inventory, public_line()))
    with pytest.raises(DdpfleetError, match="cannot go into an authorized_keys option"):
        peers_of(h, cluster_from=['10.0.0.0/8",command="sh']).ca_line("ssh-ed25519 AAAA")


# -- finding 23: pins by the address connect/trust use; no silent fallback to --nodes ---------


def test_pins_are_found_under_the_ssh_config_hostname(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh/config").write_text("Host alias-n0-peers\n    HostName 10.9.0.10\n")
    inventory = write_inventory(tmp_path, "  node0: {host: alias-n0-peers}\n")
    lines, missing = CONTROLLER.known_host_lines(inventory.nodes)
    assert missing == [] and lines[0].startswith("10.9.0.10,node0 ssh-ed25519 ")
    assert CONTROLLER.principal(inventory.nodes[0]) is not None
    assert CONTROLLER.addresses(inventory.nodes[0]) == ["10.9.0.10"]


def test_a_node_the_controller_does_not_trust_yet_is_left_out(inventory):
    known = inventory.nodes[0].known_hosts
    known.write_text(known.read_text().splitlines()[0] + "\n")
    lines, missing = CONTROLLER.known_host_lines(inventory.nodes)
    assert missing == ["node1"] and len(lines) == 1


def test_an_unreadable_inventory_fails_instead_of_shrinking_the_blocks(inventory):
    state = settled(inventory, public_line())
    subset = inventory.select("node0")
    inventory.path.write_text("nodes: [broken\n")
    h = node(subset, state)
    steps, _ = apply("openssh_server", h, **ON)
    assert steps[-1].status == "failed"
    assert f"cannot read {inventory.path} again to list every node" in steps[-1].reason
    assert h.written == {} and not any("cert-authority" in c for c in h.changes)


def test_the_ssh_config_block_uses_the_drop_ins_algorithms(inventory):
    algorithms = [("KexAlgorithms", "curve25519-sha256"), ("MACs", "hmac-sha2-256-etm@openssh.com")]
    h = node(inventory, {"known_hosts": PEERS.EMPTY_BLOCK, "user_ok": "1"}, keygen=public_line())
    target = SimpleNamespace(host=h.host, cfg={**ROLE.defaults, **ON})
    list(PEERS.Peers(target, CONTROLLER, algorithms).steps())
    config = next(s for c, s in h.stdins if "'config' 600" in c or " config 600" in c)
    block = config[config.index("Host node0 node1\n") :]
    assert "    KexAlgorithms curve25519-sha256\n    MACs hmac-sha2-256-etm@openssh.com\n" in block
