"""Inventory loading: every bad-input case is one line naming file, line, key and fix."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ddpfleet import inventory as inv
from ddpfleet.errors import InventoryError

ROOT = Path(__file__).resolve().parents[2]

GOOD = """\
cluster:
  name: demo
  master_port: 29500
ssh:
  user: root
  key: id_test
  connect_timeout: 3
nodes:
  node0: {host: 10.0.0.10, gpus: 8}
  node1: {host: 10.0.0.11, gpus: 8, user: ubuntu, port: 2222}
"""


@pytest.fixture
def write(tmp_path):
    (tmp_path / "id_test").write_text("not really a key\n")

    def _write(text: str):
        p = tmp_path / "inventory.yaml"
        p.write_text(textwrap.dedent(text))
        return p

    return _write


def test_good_inventory_resolves_precedence(write, tmp_path):
    i = inv.load(write(GOOD))
    n0, n1 = i.nodes
    assert (n0.user, n0.port, n0.gpus) == ("root", 22, 8)
    assert (n1.user, n1.port) == ("ubuntu", 2222)  # node entry beats top level
    assert n0.key == tmp_path / "id_test"  # relative to the inventory file
    assert n0.known_hosts == tmp_path / ".ddpfleet/known_hosts"
    assert i.cluster.master == "node0"  # default: first node
    assert n0.connect_timeout == 3.0


def test_env_var_and_default_path(write, tmp_path, monkeypatch):
    p = write(GOOD)
    monkeypatch.setenv(inv.ENV_VAR, str(p))
    assert inv.load().path == p
    monkeypatch.delenv(inv.ENV_VAR)
    monkeypatch.chdir(tmp_path)
    assert inv.load().path == p


def test_select_keeps_order_and_rejects_unknown(write):
    i = inv.load(write(GOOD))
    assert [n.name for n in i.select("node1,node0").nodes] == ["node1", "node0"]
    with pytest.raises(InventoryError, match=r"unknown node 'node7'.*known nodes .*node0, node1"):
        i.select("node0,node7")


@pytest.mark.parametrize(
    "text, message",
    [
        ("nodes:\n  node0: {host: [1\n", r"inventory.yaml:\d+: YAML syntax error"),
        (
            "nodes:\n  node0: {host: a}\n  node0: {host: b}\n",
            r"inventory.yaml:3: duplicate key 'node0' \(first at line 2\)",
        ),
        (
            "ssh:\n  user: a\n  user: b\nnodes: {n: {host: a}}\n",
            r"inventory.yaml:3: duplicate key 'user'",
        ),
        (
            "nodes:\n  node0: {host: a, prot: 22}\n",
            r"inventory.yaml:2: nodes.node0.prot: unknown key; did you mean 'port'\?",
        ),
        (
            "sssh: {}\nnodes: {n: {host: a}}\n",
            r"inventory.yaml:1: sssh: unknown key; did you mean 'ssh'",
        ),
        (
            "nodes:\n  a: {host: h1}\n  b: {host: h1}\n",
            r"inventory.yaml:3: nodes.b.host: h1 is already node 'a'",
        ),
        (
            "nodes:\n  a: {host: h1, port: 70000}\n",
            r"inventory.yaml:2: nodes.a.port: must be an integer",
        ),
        (
            "ssh:\n  port: twenty\nnodes: {a: {host: h}}\n",
            r"inventory.yaml:2: ssh.port: must be an integer",
        ),
        (
            "ssh:\n  key: missing_key\nnodes: {a: {host: h}}\n",
            r"inventory.yaml:2: ssh.key: key file .*missing_key not found; create it",
        ),
        ("nodes:\n  a: {gpus: 2}\n", r"inventory.yaml:2: nodes.a: missing host"),
        ("nodes: {}\n", r"nodes: no nodes defined"),
        (
            "cluster: {master: nodeX}\nnodes: {node0: {host: h}}\n",
            r"inventory.yaml:1: cluster.master: 'nodeX' is not a node",
        ),
        ("- just\n- a list\n", r"inventory.yaml:1: the inventory must be a mapping"),
        (
            "health: {temp_warn: 80}\nnodes: {a: {host: h}}\n",
            r"inventory.yaml:1: health.temp_warn: unknown key; did you mean 'temp_warn_c'",
        ),
        (
            "health:\n  busbw_gbps: fast\nnodes: {a: {host: h}}\n",
            r"inventory.yaml:2: health.busbw_gbps: must be a number > 0",
        ),
        (
            "health:\n  busbw_ratio: 1.5\nnodes: {a: {host: h}}\n",
            r"inventory.yaml:2: health.busbw_ratio: must be below 1",
        ),
    ],
)
def test_bad_inventory_is_one_line(write, text, message):
    with pytest.raises(InventoryError, match=message) as e:
        inv.load(write(text))
    assert "\n" not in str(e.value)


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(InventoryError, match="inventory not found; pass --inventory"):
        inv.load(tmp_path / "nope.yaml")


def test_loaded_inventory_is_frozen(write):
    i = inv.load(write(GOOD))
    with pytest.raises(AttributeError):
        i.nodes[0].host = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        i.nodes[0].vars["x"] = 1  # type: ignore[index]


UNSAFE = [  # (inventory text, line, key) for values that would inject or escape (review #13);
    # loopback hosts: a regression must not reach out to anyone's 10.0.0.x
    ('nodes: {"a\\nb": {host: 127.0.0.1}}\n', 1, r"nodes\.'a\\nb': node name"),
    ('nodes:\n  n0: {host: "127.0.0.1 x"}\n', 2, r"nodes\.n0\.host: '127\.0\.0\.1 x' is not an IP"),
    (
        'ssh:\n  user: "root\\nX"\nnodes: {n0: {host: 127.0.0.1}}\n',
        2,
        r"ssh\.user: user 'root\\nX'",
    ),
    (
        "nodes:\n  n0: {host: 127.0.0.1}\n  ../x: {host: 127.0.0.2}\n",
        3,
        r"nodes\.'\.\./x': node name",
    ),
    ('nodes:\n  n0: {host: 127.0.0.1, user: "a b"}\n', 2, r"nodes\.n0\.user: user 'a b'"),
    ("nodes:\n  'node 1': {host: 127.0.0.1}\n", 2, r"nodes\.'node 1': node name"),
    ("nodes:\n  a,b: {host: 127.0.0.1}\n", 2, r"nodes\.'a,b': node name"),
    ('nodes:\n  n0: {host: "-oProxyCommand=x"}\n', 2, r"nodes\.n0\.host: '-oProxyCommand=x'"),
    ('nodes:\n  n0: {host: "h\\n  ProxyCommand x"}\n', 2, r"nodes\.n0\.host:"),
]


@pytest.mark.parametrize("text, line, key", UNSAFE)
def test_unsafe_names_hosts_and_users_are_one_line_with_the_fix(write, text, line, key):
    with pytest.raises(InventoryError) as e:
        inv.load(write(text))
    message = str(e.value)
    assert re.match(rf"inventory\.yaml:{line}: {key}", message), message
    assert "\n" not in message and "use " in message


@pytest.mark.parametrize(
    "text",
    [u[0] for u in UNSAFE[:4]],
    ids=["newline-name", "host-space", "user-newline", "dotdot-name"],
)
def test_invoke_ping_refuses_an_unsafe_inventory_with_one_line(write, text):
    """The task's exit: one 'error: inventory.yaml:N: ...' line, no traceback, no connection."""
    p = write(text)
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "invoke"),
            "-r",
            str(ROOT),
            "ping",
            "--inventory",
            str(p),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"error: inventory\.yaml:\d+: ", lines[0]), proc.stderr


@pytest.mark.parametrize(
    "host", ["10.0.0.10", "fe80::1", "gpu01.example.com", "gpu_box", "node-1.", "localhost"]
)
def test_ordinary_hosts_and_names_are_accepted(write, host):
    i = inv.load(write(f"nodes:\n  gpu-01.rack_2: {{host: '{host}', user: first.last}}\n"))
    assert (i.nodes[0].name, i.nodes[0].host, i.nodes[0].user) == (
        "gpu-01.rack_2",
        host,
        "first.last",
    )


def test_cluster_name_is_checked_and_the_default_made_safe(write, tmp_path):
    with pytest.raises(
        InventoryError,
        match=r"inventory\.yaml:2: cluster\.name: cluster name "
        r"'\.\./\.\./etc' is not allowed",
    ):
        inv.load(write("cluster:\n  name: ../../etc\nnodes: {n0: {host: 127.0.0.1}}\n"))
    odd = tmp_path / "My Cluster\n(2)"
    odd.mkdir()
    (odd / "inventory.yaml").write_text("nodes: {n0: {host: 127.0.0.1}}\n")
    assert inv.load(odd / "inventory.yaml").cluster.name == "My-Cluster-2"


def test_become_defaults_to_auto_and_a_node_may_override_it(write, tmp_path):
    text = GOOD.replace("nodes:", "train_user: {name: trainer}\nnodes:", 1)
    i = inv.load(write(text.replace("user: ubuntu,", "user: ubuntu, become: none,")))
    n0, n1 = i.nodes
    assert (n0.become, n1.become, n0.become_password_file) == ("auto", "none", None)
    assert i.section("train_user")["name"] == "trainer"


def test_a_bad_become_is_one_line(write):
    with pytest.raises(InventoryError, match=r"ssh\.become: must be auto, sudo or none"):
        inv.load(write(GOOD.replace("ssh:", "ssh:\n  become: su", 1)))


def test_health_thresholds_are_read(write):
    i = inv.load(write("health: {temp_warn_c: 80, busbw_gbps: 1.5}\nnodes: {a: {host: h}}\n"))
    assert dict(i.health) == {"temp_warn_c": 80, "busbw_gbps": 1.5}
    assert dict(inv.load(write("nodes: {a: {host: h}}\n")).health) == {}
